"""Launch step, in this process: train, evaluate, generate or export on the written mindformers.yaml.

MindFormers picks its output and log folders when it is first imported, so the environment is set before
that import, and the working directory is the run dir while it runs (MindSpore drops rank_*/ and
kernel_meta/ into it). Each function returns the launch step's one record, `Launched`.
"""
from __future__ import annotations

import time
from pathlib import Path

from qwen15_exp import run_files
from qwen15_exp.launch.launched import Launched
from qwen15_exp.launch.start import in_run_dir, peak_rss_mb


def run_train(plan, exp, yaml_path: Path, request) -> Launched:
    """Train in this process; a graceful stop on `request` (StopControl agrees on a step and checkpoints)."""
    from qwen15_exp.console import Progress, mindformers_output
    with in_run_dir(plan.run_dir, {**run_files.mindformers_env(plan.run_dir), **plan.env}):
        from qwen15_exp.launch.start import start_mindformers, train
        from qwen15_exp.mindformers_ext import StepRecorder, StopControl
        progress = Progress(plan.steps, plan.layout.tokens_per_step, plan.steps_done)
        recorder = StepRecorder(run_files.steps_log(plan.run_dir), progress)
        t_call = time.perf_counter()
        try:
            with mindformers_output(plan.run_dir):
                train(start_mindformers(yaml_path), callbacks=[recorder, StopControl(plan.run_dir, request)])
        finally:
            progress.close()
        call_s = time.perf_counter() - t_call
    return Launched("local", "train", call_s=call_s, peak_rss_mb=peak_rss_mb(),
                    first_step_unix=recorder.step_end_unix[0] if recorder.step_end_unix else None)


def final_eval(run_dir: Path) -> dict:
    """The figures of the last evaluation the metric wrote."""
    from qwen15_exp.result import eval_log
    records = eval_log(run_dir)
    if not records:
        raise RuntimeError(f"the evaluation wrote no figures ({run_files.eval_log_path(run_dir)} is missing)")
    r = records[-1]
    return {"eval_loss": r["loss"], "perplexity": r["PPL"], "eval_tokens": r["tokens"], "eval_rows": r["batches"]}


def run_eval(plan, exp, yaml_path: Path, request) -> Launched:
    """Score the configured weights on the dataset (perplexity, mean loss) in this process."""
    from qwen15_exp.console import mindformers_output
    with in_run_dir(plan.run_dir, {**run_files.mindformers_env(plan.run_dir), **plan.env}):
        from qwen15_exp.launch.start import evaluate, start_mindformers
        t_call = time.perf_counter()
        with mindformers_output(plan.run_dir):
            evaluate(start_mindformers(yaml_path))
        call_s = time.perf_counter() - t_call
    peak = peak_rss_mb()
    return Launched("local", "eval", call_s=call_s, peak_rss_mb=peak,
                    figures={**final_eval(plan.run_dir), "seconds": round(call_s, 3), "peak_rss_mb": round(peak, 1)})


def run_benchmark(plan, exp, yaml_path: Path, request) -> Launched:
    """eval.tasks through lm-evaluation-harness, our model answering (its files in <run dir>/lm_eval)."""
    from qwen15_exp.benchmark import read_spec, run_harness
    from qwen15_exp.console import mindformers_output
    spec = read_spec(plan.run_dir)        # written where the command was typed (task YAMLs' relative paths)
    with in_run_dir(plan.run_dir, {**run_files.mindformers_env(plan.run_dir), **plan.env}), \
            mindformers_output(plan.run_dir):
        summary = run_harness(plan.mindformers, exp.phase.load_checkpoint, spec, plan.run_dir, exp.verbose,
                              check_tasks=False)      # the run's tasks step did, before the weights
    peak = peak_rss_mb()
    return Launched("local", "benchmark", call_s=summary["seconds"], peak_rss_mb=peak, benchmark=summary,
                    figures=benchmark_figures(summary, exp.phase.load_checkpoint, peak))


def benchmark_figures(summary: dict, weights: str, peak_rss_mb: float) -> dict:
    return {"seconds": summary["seconds"], "requests": summary["requests"],
            "requests_per_s": summary["requests_per_s"], "peak_rss_mb": round(peak_rss_mb, 1),
            "weights": weights or "random (no phase.load_checkpoint)"}


def run_predict(plan, exp, yaml_path: Path, request) -> Launched:
    """Generate for phase.predict_data in batches of phase.batch_size (ChatML-wrapped for phase=chat)."""
    from qwen15_exp.console import mindformers_output
    from qwen15_exp.data.chatml import cut_at_stop, make_context
    from qwen15_exp.data.tokenizer import load_tokenizer
    from qwen15_exp.launch.generate import Generator, answer_tokens, generation_kwargs

    tok = load_tokenizer(exp.data.tokenizer_dir or None)
    kwargs = generation_kwargs(exp)
    g, batch = exp.phase.generation, exp.phase.batch_size
    prompts = list(exp.phase.predict_data)
    generated, batches = [], []
    t_call = time.perf_counter()
    env = {**run_files.mindformers_env(plan.run_dir), **plan.env}       # the compile cache: graphs of earlier runs
    with in_run_dir(plan.run_dir, env), mindformers_output(plan.run_dir):
        ckpt = exp.phase.load_checkpoint          # a MindFormers checkpoint by now (weights step)
        generator = Generator(plan.mindformers, ckpt)
        for start in range(0, len(prompts), batch):
            group = prompts[start:start + batch]
            if exp.phase.chat:
                window = exp.data.seq_length - answer_tokens(g, 0, exp.data.seq_length) - 1
                ids = [make_context(tok, p, [], exp.phase.system_prompt, window) for p in group]
            else:
                ids = [tok.encode(p, add_special_tokens=False).ids for p in group]
            done = generator.generate_batch(ids, answer_tokens(g, max(map(len, ids)), exp.data.seq_length), **kwargs)
            batches.append(done)
            for prompt, new in zip(group, done.new_ids):
                text_ids = cut_at_stop(new) if exp.phase.chat else new
                generated.append({"prompt": prompt, "text": tok.decode(text_ids), "new_tokens": len(new)})
    peak = peak_rss_mb()
    figures = {**generation_figures(batches, batch), "weights": ckpt or "random (no phase.load_checkpoint)",
               "peak_rss_mb": round(peak, 1)}
    return Launched("local", "predict", call_s=time.perf_counter() - t_call, peak_rss_mb=peak, figures=figures,
                    generated=generated)


def generation_figures(batches: list, batch_size: int) -> dict:
    """Tokens/s over every sequence of every batch; the prefill (time to first token) and the decode rate
    apart, as a server's users see them."""
    tokens = sum(len(ids) for b in batches for ids in b.new_ids)
    seconds = sum(b.seconds for b in batches)
    firsts = [b.first_token_s for b in batches if b.first_token_s is not None]
    decode_tokens = sum(max(0, max(map(len, b.new_ids)) - 1) * len(b.new_ids) for b in batches)
    decode_s = seconds - sum(firsts)
    rate = round(tokens / seconds, 2) if seconds else None
    return {"generated_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": rate,
            "tokens_per_s_per_device": rate, "batch_size": batch_size, "batches": len(batches),
            "time_to_first_token_s": round(firsts[0], 3) if firsts else None,
            "decode_tokens_per_s": round(decode_tokens / decode_s, 2) if decode_s > 0 and decode_tokens else None}


def run_export(plan, exp, yaml_path: Path, request) -> Launched:
    """The predict network as MindIR, reloaded and checked against eager where it can be."""
    from qwen15_exp.launch.export import run_export as export
    t_call = time.perf_counter()
    figures = export(plan, exp)
    return Launched("local", "export", call_s=time.perf_counter() - t_call, peak_rss_mb=peak_rss_mb(),
                    figures=figures)
