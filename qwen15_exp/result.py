"""Result step: what one run measured and estimated, as result.json, plus its one-screen summary."""
from __future__ import annotations

import functools
import platform
import shlex
import statistics
from importlib import metadata
from pathlib import Path

from qwen15_exp import run_files


def versions() -> dict:
    return dict(_installed_versions())


@functools.lru_cache(maxsize=None)
def _installed_versions() -> tuple:
    """Read from the installed packages' metadata once per process (every plan asks, for the compile cache)."""
    out = {"python": platform.python_version()}
    for pkg in ("qwen15_exp", "mindspore", "mindformers", "hydra-core", "omegaconf", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return tuple(out.items())


def measured_figures(losses, step_times, tokens_per_step, devices, first_step_s, train_call_s,
                     peak_rss_mb) -> dict:
    """Steady figures leave out the first step (graph compile and dataset start)."""
    steady = step_times[1:] if len(step_times) > 1 else step_times
    step_s = statistics.median(steady) if steady else None
    tokens_per_s = tokens_per_step / step_s if step_s else None
    k = max(1, min(5, len(losses) // 4))
    return {
        "steps": len(losses),
        "loss": [round(x, 6) for x in losses],
        "step_times_s": step_times,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "loss_decreased": bool(losses) and statistics.fmean(losses[-k:]) < statistics.fmean(losses[:k]),
        "time_to_first_step_s": round(first_step_s, 3) if first_step_s is not None else None,
        "steady_step_s": round(step_s, 6) if step_s else None,
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "tokens_per_s_per_device": round(tokens_per_s / devices, 1) if tokens_per_s else None,
        "train_call_s": round(train_call_s, 3),
        "peak_rss_mb": round(peak_rss_mb, 1),
    }


def measured_from_logs(run_dir, ranks: int, tokens_per_step: int, first_step_s, train_call_s, peak_rss_mb) -> dict:
    """The whole loss curve from the ranks' step logs (every segment of a resumed run, numbered as one
    uninterrupted run): per step the mean loss over ranks and the slowest rank's time (a step ends on all)."""
    from qwen15_exp.lifecycle import read_steps
    logs = [read_steps(run_files.steps_log(run_dir, r)) for r in range(ranks)]
    by_step = [{rec["step"]: rec for rec in log} for log in logs]
    steps = sorted(set(by_step[0]).intersection(*by_step[1:])) if by_step else []
    losses = [sum(r[s]["loss"] for r in by_step) / len(by_step) for s in steps]
    times = [max(r[s]["step_s"] for r in by_step) for s in steps]
    figures = measured_figures(losses, times, tokens_per_step, ranks, first_step_s, train_call_s, peak_rss_mb)
    figures["step_numbers"] = steps
    evals = eval_log(run_dir)
    if evals:
        figures["eval"] = evals
    if ranks > 1:
        figures["ranks"] = [{"rank": i, "loss": [r[s]["loss"] for s in steps]} for i, r in enumerate(by_step)]
    return figures


def eval_log(run_dir, rank: int = 0) -> list[dict]:
    """The evaluations of a run, oldest first (mindformers_ext.TokenPerplexity appends one per evaluation)."""
    import json
    path = run_files.eval_log_path(run_dir, rank)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def fit_verdict(mem: dict) -> str:
    """One word for tables and job lines: fits, tight (over the budget, within the estimate's uncertainty) or OVER."""
    return "OVER" if not mem["fits"] else "tight" if mem.get("tight") else "fits"


def fit_word(mem: dict) -> str:
    if not mem["fits"]:
        return "OVER"
    return "tight: over budget, within the estimate uncertainty" if mem.get("tight") else "fits"


def metric_text(metric: dict) -> str:
    """0.7917 +- 0.0847 (a metric of lm-eval's and its standard error, where it has one)."""
    stderr = metric.get("stderr")
    return f"{metric['value']:.4f}" + (f" +- {stderr:.4f}" if isinstance(stderr, (int, float)) else "")


def benchmark_lines(bench: dict | None, measured: dict) -> list[str]:
    """lm-eval's metrics, one per line, with how many documents, shots and requests."""
    if not bench:
        return []
    lines = [f"  benchmark (lm-evaluation-harness): {bench['requests']:,} requests in {bench['seconds']:.1f} s "
             f"({bench['requests_per_s'] or 0:,.1f}/s once the model was built, in {bench.get('build_s', 0):.1f} s), "
             f"weights {measured.get('weights', '?')}"]
    width = max((len(n) for n in bench["metrics"]), default=0)
    for name, metric in bench["metrics"].items():
        task = name.split("/", 1)[0]
        docs, shots = bench["samples"].get(task), bench["num_fewshot"].get(task)
        arrow = {True: "higher is better", False: "lower is better"}.get(metric.get("higher_is_better"), "")
        detail = ", ".join(x for x in (f"{docs} docs" if docs else "", f"{shots}-shot" if shots is not None else "",
                                       arrow) if x)
        lines.append(f"    {name:<{width}}  {metric_text(metric)}" + (f"   ({detail})" if detail else ""))
    lines.append(f"  lm-eval's files (results, samples): {bench['output_dir']}")
    return lines


def summary_text(result: dict) -> str:
    """One screen: what ran, on what, and what came out."""
    p, m = result["plan"], result.get("measured") or {}
    mem = p["memory"]
    lines = [
        f"qwen15_exp  {result['experiment']}  [{result['status']}]",
        f"  model {result['model']}  phase {result['phase']}  parallel {result['parallel']}  "
        f"hardware {result['hardware']}",
        f"  devices {p['devices']} = {p['nodes']} node(s) x up to {p['devices_per_node']}   "
        f"global batch {p['global_batch']}   tokens/step {p['tokens_per_step']:,}",
        f"  parameters {p['params_total']:,}  ({mem['params_per_device']:,} per device"
        + (f"; {p['params_trainable']:,} trainable" if p.get("params_trainable") and
           p["params_trainable"] != p["params_total"] else "") + ")   memory/device "
        f"{mem['total_gb']:.2f} GB of {mem['budget_gb']:.0f} GB budget ({fit_word(mem)})",
        f"  launcher {p['launcher']}: {p['why']}",
    ]
    for key, (old, new) in (result.get("hardware_changes") or {}).items():
        lines.append(f"  hardware.{key}: {old} -> {new} (overridden)")
    lines += training_lines(result)
    est = p.get("throughput")
    if est:
        unit = "tokens/s/p" if est["kind"] == "train" else "tokens/s"
        figure = est["tokens_per_s_per_device"] if est["kind"] == "train" else est["tokens_per_s"]
        terms = "  ".join(f"{k} {v:.3g}s" for k, v in est["terms_s"].items() if v)
        within = f" +-{est['uncertainty']:.0%}" if est.get("uncertainty") else " (uncertainty not known)"
        lines.append(f"  estimate {figure:,.0f} {unit}{within}  ({terms})")
    ref = result.get("reference") or {}
    if ref.get("figure"):
        lines.append(f"  published {ref['figure']:,} {ref['unit']} on {ref['table']}")
    for a in p.get("adaptations", []):
        lines.append(f"  adapted: {a}")
    if m and "steps" in m:
        which = f"mean loss of {len(m['ranks'])} ranks" if m.get("ranks") else "loss"
        lines.append(f"  steps {m['steps']}   {which} {m['first_loss']:.4f} -> {m['last_loss']:.4f}"
                     f" ({'down' if m['loss_decreased'] else 'NOT down'})")
        if m.get("tokens_per_s"):
            first = m.get("time_to_first_step_s")
            wall = result.get("wall_time_s")
            per_device = (f" ({m['tokens_per_s_per_device']:,.0f} tokens/s/p)"
                          if m.get("ranks") and m.get("tokens_per_s_per_device") else "")
            lines.append(f"  steady {m['steady_step_s'] * 1000:.0f} ms/step   {m['tokens_per_s']:,.0f} tokens/s"
                         f"{per_device}   "
                         + (f"first step at {first:.1f} s   " if first is not None else "")
                         + (f"wall {wall:.1f} s" if wall is not None else ""))
    if result.get("calibration"):
        from qwen15_exp.estimate.cpu_calibration import note_of
        lines.append(f"  calibration: {note_of(result['calibration'])}")
    if result.get("compile_cache"):
        lines.append(f"  compile cache: {result['compile_cache']['use']} ({result['compile_cache']['dir']})")
    for e in m.get("eval") or []:
        lines.append(f"  eval after step {e['step']}: loss {e['loss']:.4f}   perplexity {e['PPL']:,.2f}   "
                     f"({e['tokens']:,} tokens)")
    if "perplexity" in m:
        lines.append(f"  eval: perplexity {m['perplexity']:,.4f}   mean loss {m['eval_loss']:.4f}   "
                     f"{m['eval_tokens']:,} tokens scored in {m['eval_rows']} rows")
    lines += benchmark_lines(result.get("benchmark"), m)
    if m.get("mindir"):
        check = m.get("check")
        lines.append(f"  exported MindIR ({m['mindir_mb']:,.1f} MB): " + ", ".join(m["mindir"]))
        lines.append(f"  reloaded with mindspore.load + nn.GraphCell: max |logits - eager| = {check['max_abs_diff']:.2e}"
                     if check else "  not reloaded here (KV-cache graphs run on Ascend only)")
    if result.get("generated"):
        lines.append(f"  {generation_line(m)} (weights: {m['weights']})")
        for g in result["generated"]:
            lines.append(f"  > {g['prompt']!r} -> {g['text'][:120]!r}")
    if result["status"] == "planned":
        version = (result.get("versions") or {}).get("qwen15_exp") or "this version"
        lines.append(f"  NOTHING WAS EXECUTED. Every node needs qwen15_exp {version} installed (`pip install -e .` "
                     "of this checkout) with MindSpore and MindFormers for Ascend.")
        if result.get("data") is None and result.get("phase") not in ("predict", "chat", "export", "eval"):
            lines.append("  the dataset, once, on shared storage: python -m qwen15_exp.prepare data=<alpaca|wiki|chatml> "
                         "data.input=<raw file> data.seq_length=<seq_length> output=<dataset dir>")
        lines.append("  On the cluster, from a copy of the run dir on every node:")
        master = "" if result.get("launch_by") == "rank_table" else "MASTER_ADDR=<node 0 address> "
        for i, script in enumerate(result.get("launch_scripts", [])):
            lines.append(f"    node {i}: {master}TRAIN_DATA=<dataset dir> bash {shlex.quote(script)}")
        if master and result.get("launch_scripts"):
            folder = shlex.quote(str(Path(result["launch_scripts"][0]).parent))
            lines.append(f"  or on a Slurm cluster (shared storage): cd {folder} && TRAIN_DATA=<dataset dir> "
                         "sbatch slurm.sbatch")
        k8s = result.get("k8s")
        if k8s:
            table = ", the operator's HCCL rank table" if k8s.get("networking") == "rank_table" else ""
            lines.append(f"  or on Kubernetes with MindCluster (AscendJob {k8s['job']}{table}, the run dir on shared "
                         "storage at the same path in every pod):")
            lines += [f"    {cmd}" for cmd in k8s["submit"]]
        if result.get("phase") != "predict" and result.get("launch_scripts"):
            lines.append("  to continue after a stop, add RESUME=<run dir>/output/checkpoint (and SRC_STRATEGY=<its "
                         "output/strategy> if the layout changed)")
    point = result.get("checkpoint")
    if point and result["status"] != "planned":
        lines.append(f"  checkpoint kept: {point['file']} (step {point['step']}); train on from it with "
                     f"phase.load_checkpoint={shlex.quote(result['run_dir'])}")
    lines.append(f"  files: {result['run_dir']}")
    return "\n".join(lines)


def training_lines(result: dict) -> list[str]:
    """The learning rate and steps people set first, and the base weights, said loudly when there are none."""
    t = result.get("training")
    if not t:
        return []
    steps = f"max_steps {t['max_steps']}" if t.get("max_steps") else f"epochs {t['epochs']}"
    lora = f"   LoRA rank {t['lora_rank']}" if t.get("lora_rank") else ""
    lines = [f"  learning rate {t['learning_rate']:g} ({t['lr_schedule']})   {steps}{lora}"]
    ck = t.get("load_checkpoint")
    if ck:
        here = Path(ck).exists()
        lines.append(f"  base weights: {ck}" + ("" if here else "  (not on this machine: taken as a path on the "
                                                           "cluster; the node scripts check it before starting)"))
    elif result.get("phase") != "pretrain":
        lines.append(f"  base weights: NONE - phase {result.get('phase')} starts from random weights; set "
                     "phase.load_checkpoint=<checkpoint, Hugging Face folder or run dir>")
    return lines


def generation_line(m: dict) -> str:
    """'generated 256 tokens, batch 8 (1 batch): 41.2 tokens/s; first token 0.35 s, then 45.0 tokens/s'."""
    head = f"generated {m['generated_tokens']} tokens"
    if m.get("batch_size"):
        head += f", batch {m['batch_size']} ({m['batches']} batch{'es' if m['batches'] != 1 else ''})"
    if m.get("tokens_per_s"):
        head += f": {m['tokens_per_s']:,.1f} tokens/s"
    if m.get("time_to_first_token_s") is not None:
        head += f"; first token {m['time_to_first_token_s']:.2f} s"
    if m.get("decode_tokens_per_s"):
        head += f", then {m['decode_tokens_per_s']:,.1f} tokens/s"
    return head


def job_line(result: dict) -> str:
    """A sweep job in one line: what ran, how it ended, its loss, speed (vs the estimate) and times."""
    p, m = result.get("plan") or {}, result.get("measured") or {}
    what = f"{result.get('model')} {result.get('parallel')} {result.get('phase')} {result.get('hardware')}"
    parts = [f"{Path(result['run_dir']).name:>3}  {result['status']:<8} {what}"]
    est = (p.get("throughput") or {})
    if m.get("last_loss") is not None:
        parts.append(f"loss {m['first_loss']:.3f} -> {m['last_loss']:.3f}")
    # one convention with the sweep report: training per device (tokens/s/p), generation for the job (tokens/s)
    key, unit = (("tokens_per_s_per_device", "tokens/s/p") if est.get("kind", "train") == "train"
                 and p.get("tokens_per_step") else ("tokens_per_s", "tokens/s"))
    if m.get(key):
        parts.append(f"{m[key]:,.0f} {unit}" + (f" (est {est[key]:,.0f})" if est.get(key) else ""))
    elif est.get(key):
        parts.append(f"est {est[key]:,.0f} {unit}")
    if m.get("eval"):
        parts.append(f"eval loss {m['eval'][-1]['loss']:.3f} (step {m['eval'][-1]['step']})")
    if m.get("perplexity") is not None:
        parts.append(f"perplexity {m['perplexity']:,.3f}")
    for name, metric in list(((result.get("benchmark") or {}).get("metrics") or {}).items())[:3]:
        parts.append(f"{name} {metric_text(metric)}")
    if p.get("memory"):
        parts.append(f"{p['memory']['total_gb']:.2f}/{p['memory']['budget_gb']:.0f} GB {fit_verdict(p['memory'])}")
    if m.get("time_to_first_step_s") is not None:
        parts.append(f"first step {m['time_to_first_step_s']:.1f} s")
    if result.get("wall_time_s") is not None:
        parts.append(f"wall {result['wall_time_s']:.1f} s")
    return "job " + "   ".join(parts)
