"""What msrun starts on every device: the run_mindformer.py calls on the run's mindformers.yaml.

`run_mindformer.py` is not shipped in the MindFormers wheel, so each run dir gets a 2-line worker.py that
calls this. Each rank records its losses and step times in rank_<N>.json beside the YAML, which the
launcher gathers into result.json.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from qwen15_exp import run_files

WORKER_STUB = """# Started by msrun on every device: trains mindformers.yaml (see qwen15_exp/launch/worker.py).
from qwen15_exp.launch.worker import main

main()
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="qwen15_exp msrun worker")
    ap.add_argument("--config", required=True, help="mindformers.yaml")
    ap.add_argument("--train_dataset_dir", default="", help="override train_dataset.data_loader.dataset_dir")
    ap.add_argument("--load_checkpoint", default="", help="override load_checkpoint")
    ap.add_argument("--resume", default="", help="continue training from this checkpoint folder (rank_*/...), "
                                                 "through MindFormers' resume (meta.json names the step)")
    ap.add_argument("--src_strategy", default="", help="the strategy files the checkpoint was saved with, when "
                                                       "the layout changed: MindFormers re-shards it (auto_trans_ckpt)")
    return ap.parse_args(argv)


def rank_id() -> int:
    for key in ("RANK_ID", "MS_NODE_ID", "RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def predict_on_cpu(config, run_dir: Path, spec: dict) -> dict:
    """A CPU worker generates as the in-process predict does (launch/generate.py: the CPU KV cache), in batches
    of the plan's batch size. Trainer.predict builds its own pipeline around MindFormers' Ascend attention."""
    from tokenizers import Tokenizer

    from qwen15_exp.launch.generate import Generator
    from qwen15_exp.launch.start import peak_rss_mb
    tok = Tokenizer.from_file(str(run_dir / run_files.TOKENIZER))
    generator = Generator(config, config.load_checkpoint or "", quiet=True)
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in spec["inputs"]]
    eos = [tok.token_to_id(spec["eos_token"])]
    generated, seconds = [], 0.0
    for start in range(0, len(prompts), spec["batch_size"]):
        group = prompts[start:start + spec["batch_size"]]
        longest = max(map(len, group))
        new = spec["max_new_tokens"] or max(1, spec["max_length"] - longest)
        done = generator.generate_batch(group, new, eos_token_id=eos, do_sample=False)
        seconds += done.seconds
        generated += [{"text": tok.decode(ids), "new_tokens": len(ids)} for ids in done.new_ids]
    return {"rank": rank_id(), "generated": generated, "seconds": seconds, "peak_rss_mb": round(peak_rss_mb(), 1)}


def predict(config, run_dir: Path) -> dict:
    """Trainer.predict on the prompts the plan wrote (predict_data.json), with its tokenizer.json."""
    import json

    from mindformers.models import PreTrainedTokenizerFast
    from mindformers.trainer import Trainer

    from qwen15_exp.data.chatml import eos_token
    from qwen15_exp.launch.generate import use_cpu_argmax

    spec = json.loads((run_dir / run_files.PREDICT_DATA).read_text())
    if config.context.device_target == "CPU":
        use_cpu_argmax()
        if config.model.model_config.use_past:
            return predict_on_cpu(config, run_dir, spec)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(run_dir / run_files.TOKENIZER), eos_token=spec["eos_token"],
                                  pad_token=eos_token(False), additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    t0 = time.time()
    # MindFormers' own reading of the two: max_new_tokens when given, else max_length (prompt + answer)
    lengths = {"max_new_tokens": spec["max_new_tokens"]} if spec.get("max_new_tokens") else \
        {"max_length": spec["max_length"]}
    out = Trainer(config, tokenizer=tok).predict(input_data=spec["inputs"], **lengths)
    seconds = time.time() - t0
    texts = [o["text_generation_text"][0] if isinstance(o, dict) else str(o) for o in out]
    generated = []
    for prompt, text in zip(spec["inputs"], texts):      # generate() returns the prompt and the new tokens
        answer = text[len(prompt):] if text.startswith(prompt) else text
        generated.append({"text": answer, "new_tokens": len(tok(answer, add_special_tokens=False)["input_ids"])})
    from qwen15_exp.launch.start import peak_rss_mb
    return {"rank": rank_id(), "generated": generated, "seconds": seconds, "peak_rss_mb": round(peak_rss_mb(), 1)}


def die_with_parent() -> None:
    """Started by our launcher: die when msrun dies (even by SIGKILL), never train on as an orphan."""
    if os.environ.get("QWEN15_EXP_PARENT_DEATH") != "1":
        return                                   # a cluster's msrun with --join=False exits by design
    import signal

    from qwen15_exp.lifecycle import set_parent_death_signal
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if parent == 1:                              # msrun already gone before the signal was armed
        os._exit(1)


def scheduler_elsewhere() -> bool:
    """msrun starts the cluster's scheduler (this script with MS_ROLE=MS_SCHED) on every node whose address is
    the master address: on one machine standing in for several nodes, every node. It belongs to node 0."""
    node = os.environ.get("QWEN15_EXP_NODE_RANK", "0")
    if os.environ.get("MS_ROLE") != "MS_SCHED":
        return False
    # in an AscendJob the Scheduler pod runs it (launch/k8s.py); msrun in a Worker pod must not
    return os.environ.get("QWEN15_EXP_SCHEDULER_ELSEWHERE") == "1" or (node.isdigit() and int(node) != 0)


def overrides_of(args) -> dict:
    """The MindFormers keys the launch script's options set on top of mindformers.yaml."""
    out = {}
    if args.load_checkpoint:
        out["load_checkpoint"] = args.load_checkpoint
    if args.resume:
        out.update(load_checkpoint=args.resume, resume_training=True)
    if args.src_strategy:
        out.update(src_strategy_path_or_dir=args.src_strategy, auto_trans_ckpt=True)
    return out


def main(argv=None) -> None:
    t0 = time.time()
    if scheduler_elsewhere():
        print(f"node {os.environ['QWEN15_EXP_NODE_RANK']}: the scheduler runs on node 0; not starting another")
        return
    die_with_parent()
    from qwen15_exp.launch.start import prepare_process
    prepare_process()
    args = parse_args(argv)
    yaml_path = Path(args.config).resolve()
    run_dir = yaml_path.parent
    for key, value in run_files.mindformers_env(run_dir).items():
        os.environ.setdefault(key, value)

    from qwen15_exp.atomic import write_json
    from qwen15_exp.launch.start import evaluate, peak_rss_mb, start_mindformers, train

    config = start_mindformers(yaml_path, **overrides_of(args))
    if os.environ.get("MS_ROLE") == "MS_SCHED" and not config.get("use_parallel"):
        # msrun starts a scheduler beside even one worker; without parallel init() it would run the job itself
        print("scheduler: a one-device job has no cluster to coordinate")
        return
    if args.train_dataset_dir:
        config.train_dataset.data_loader.dataset_dir = args.train_dataset_dir
        config.train_dataset_task.dataset_config.data_loader.dataset_dir = args.train_dataset_dir
    rank = rank_id()
    if config.get("export_mindir"):
        from qwen15_exp.launch.export import export_mindir
        from qwen15_exp.launch.generate import Generator
        network = Generator(config, config.load_checkpoint, quiet=True).model
        files = export_mindir(network, config.model.model_config, run_files.output_dir(run_dir), rank)
        write_json(run_files.rank_record(run_dir, rank), {"rank": rank, "mindir": [str(f) for f in files]})
        return
    if config.run_mode == "predict":
        write_json(run_files.rank_record(run_dir, rank), predict(config, run_dir))
        return
    if config.run_mode == "eval":
        from qwen15_exp.benchmark import read_spec
        spec = read_spec(run_dir)
        if spec is not None:              # eval.tasks: lm-evaluation-harness on this (one) device
            from qwen15_exp.benchmark import run_harness
            summary = run_harness(config, config.load_checkpoint or "", spec, run_dir)
            write_json(run_files.rank_record(run_dir, rank), {"rank": rank, "benchmark": summary,
                                                              "peak_rss_mb": round(peak_rss_mb(), 1)})
            return
        evaluate(config)                  # figures in eval_rank<r>.jsonl (mindformers_ext.TokenPerplexity)
        return
    from qwen15_exp.lifecycle import StopRequest, stop_on_signals
    from qwen15_exp.mindformers_ext import StepRecorder, StopControl, skip_checkpoint_preload
    if config.context.device_target == "CPU":
        skip_checkpoint_preload()
    recorder = StepRecorder(run_files.steps_log(run_dir, rank))
    request = StopRequest()
    ranks = int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1)
    with stop_on_signals(request):          # SIGTERM from the launcher: stop at an agreed step, checkpointed
        train(config, callbacks=[recorder, StopControl(run_dir, request, ranks)])
    write_json(run_files.rank_record(run_dir, rank), {
        "rank": rank, "steps": recorder.steps, "losses": recorder.losses, "step_times_s": recorder.step_times(),
        "first_step_unix": recorder.step_end_unix[0] if recorder.step_end_unix else None, "start_unix": t0,
        "stopped_by": request.name or None,
        "peak_rss_mb": round(peak_rss_mb(), 1)})


if __name__ == "__main__":
    main()
