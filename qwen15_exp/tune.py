"""Tune: every valid layout of a job on a device budget, filtered by the memory estimate, ranked by the
throughput estimate. Pure arithmetic (no MindSpore import): 72B over 64 nodes is searched in seconds.

    python -m qwen15_exp.tune +experiment=recipe/finetune_72b hardware=atlas_900_a2_podc tune.nodes=8
    python -m qwen15_exp -m +experiment=tuned/<name>          # plan (or run) the top k as a sweep

The global batch stays what the job asks (tokens per step are the optimisation's, not the layout's): a
layout only splits it into data-parallel ranks x micro-batches x micro-batch size. Searched: dp, mp (dividing
the heads and KV heads, within a node), pp (with MindFormers' balanced split and a searched `offset` that
evens out the embedding and lm_head), micro-batch count and size (with micro_batch_interleave_num 1 or 2 under
model parallel), gradient accumulation, recompute (none / selective / full), sequence parallel, the parallel
optimizer and vocab_emb_dp.
"""
from __future__ import annotations

import itertools
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from qwen15_exp.errors import UserError
from qwen15_exp.estimate.memory import estimate_memory, kv_heads, layer_params, stage_layers
from qwen15_exp.estimate.throughput import estimate_train, stated_error
from qwen15_exp.layout import layout_name, layout_of, npus_present
from qwen15_exp.report import tied_ranks
from qwen15_exp.validate import divisors

RECOMPUTE = {"none": (False, False), "selective": (False, True), "full": (True, False)}


@dataclass(frozen=True)
class Candidate:
    dp: int
    mp: int
    pp: int
    batch_size: int               # samples per micro-batch per data-parallel rank
    accumulation: int             # micro_batch_num under a pipeline, gradient_accumulation_steps without
    recompute: str                # none | selective | full
    seq_parallel: bool
    parallel_optimizer: bool
    vocab_emb_dp: bool
    offset: tuple | int = 0
    interleave: int = 1           # micro_batch_interleave_num: batch_size x interleave samples per micro-batch

    @property
    def name(self) -> str:
        return layout_name(self.dp, self.mp, self.pp)

    def overrides(self) -> dict:
        """The keys this layout sets, as dotted config keys."""
        full, select = RECOMPUTE[self.recompute]
        return {
            "parallel.data_parallel": self.dp, "parallel.model_parallel": self.mp,
            "parallel.pipeline_stage": self.pp,
            "parallel.micro_batch_num": self.accumulation if self.pp > 1 else 1,
            "phase.gradient_accumulation_steps": 1 if self.pp > 1 else self.accumulation,
            "phase.batch_size": self.batch_size,
            "parallel.micro_batch_interleave_num": self.interleave,
            "phase.recompute.recompute": full, "phase.recompute.select_recompute": select,
            "parallel.use_seq_parallel": self.seq_parallel,
            "parallel.enable_parallel_optimizer": self.parallel_optimizer,
            "parallel.vocab_emb_dp": self.vocab_emb_dp,
            "parallel.offset": list(self.offset) if isinstance(self.offset, tuple) else self.offset,
        }

    def command_args(self) -> list[str]:
        return [f"{k}={format_value(v)}" for k, v in self.overrides().items()]


def format_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def apply(exp, c: Candidate):
    """The experiment with this layout: the keys of `c.overrides()` set on shallow copies of the groups they
    touch (the search builds thousands)."""
    groups = {"parallel": replace(exp.parallel, optimizer_shard=None, nodes=None, name=c.name),
              "phase": replace(exp.phase, recompute=replace(exp.phase.recompute))}
    for key, value in c.overrides().items():
        *path, leaf = key.split(".")
        node = groups[path[0]]
        for part in path[1:]:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return replace(exp, **groups)


def balanced_offset(num_layers: int, pp: int, head_layers: float):
    """An offset that evens the stages' work when the last stage also carries lm_head and the loss (worth
    `head_layers` layers): layers go from the last stage to the others, first to the earliest. 0 when the
    even split is already best."""
    base = stage_layers(num_layers, pp, 0)
    layers = list(base)
    while True:
        work = [n + (head_layers if i == pp - 1 else 0) for i, n in enumerate(layers)]
        heavy, light = work.index(max(work)), work.index(min(work))
        if work[heavy] - work[light] <= 1 or layers[heavy] <= 1:
            break
        layers[heavy] -= 1
        layers[light] += 1
    offset = tuple(n - b for n, b in zip(layers, base))
    return offset if any(offset) else 0


def head_layers(model) -> float:
    """lm_head's work in decoder layers (matmul parameters: vocab x h against a layer's)."""
    return model.vocab_size * model.hidden_size / layer_params(model)


def model_parallel_options(exp) -> list[int]:
    m, hw = exp.model, exp.hardware
    if not hw.supports.semi_auto_parallel:
        return [1]
    per_node = max(1, hw.devices_per_node)
    return [t for t in divisors(per_node) if m.num_heads % t == 0 and kv_heads(m) % t == 0]


def search_space(exp, devices: int, global_batch: int):
    """Every candidate layout of `devices` devices that keeps `global_batch` samples per step, before any
    estimate. Yields (candidate, None) or (None, reason it is structurally impossible)."""
    m = exp.model
    can_pipeline = exp.hardware.supports.semi_auto_parallel    # also what the parallel optimizer needs
    for mp in model_parallel_options(exp):
        if devices % mp:
            continue
        for pp in divisors(devices // mp):
            if pp > 1 and not can_pipeline:
                yield None, "pipeline stages need semi-auto parallel, which this hardware lacks"
                continue
            if pp > m.num_layers:
                yield None, f"more pipeline stages than the model's {m.num_layers} layers"
                continue
            dp = devices // (mp * pp)
            if global_batch % dp:
                yield None, f"data_parallel does not divide the global batch of {global_batch}"
                continue
            offsets = {0}
            if pp > 1:
                offsets.add(balanced_offset(m.num_layers, pp, head_layers(m)))
            for samples in divisors(global_batch // dp):        # per micro-batch and data-parallel rank
                accumulation = global_batch // dp // samples
                if pp == 1 and accumulation > 1 and not can_pipeline:
                    yield None, "gradient accumulation needs semi-auto parallel, which this hardware lacks"
                    continue
                if pp > 1 and accumulation < pp:
                    yield None, "fewer micro-batches than pipeline stages"
                    continue
                if mp > 1 and exp.data.seq_length % mp:
                    yield None, "sequence length not divisible by model_parallel"
                    continue
                # two interleaved halves of a micro-batch hide the model-parallel collectives of one behind
                # the other's compute (MindFormers' advice when model_parallel > 1)
                interleaves = (1, 2) if mp > 1 and samples % 2 == 0 else (1,)
                for recompute, interleave in itertools.product(RECOMPUTE, interleaves):
                    batch_size = samples // interleave
                    for sp in ((True, False) if mp > 1 else (False,)):
                        for po in ((True, False) if dp > 1 and can_pipeline else (False,)):
                            for vocab_dp in ((True, False) if mp > 1 else (exp.parallel.vocab_emb_dp,)):
                                for offset in offsets:
                                    yield Candidate(dp, mp, pp, batch_size, accumulation, recompute, sp, po,
                                                    vocab_dp, offset, interleave), None


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    memory_gb: float
    budget_gb: float
    tight: bool
    tokens_per_s: float
    tokens_per_s_per_device: float
    limit: str                     # the largest term of the step
    terms_s: dict


LIMIT_NAMES = {"compute": "compute", "pipeline_bubble": "bubble", "tensor_parallel_comm": "TP comm",
               "data_parallel_comm": "DP comm", "memory_traffic": "memory traffic", "launch_overhead": "launches"}


def score(exp, c: Candidate) -> Scored | str:
    """The candidate's estimates, or why it does not fit."""
    run = apply(exp, c)
    layout = layout_of(run)
    mem = estimate_memory(run, layout)
    if not mem.fits:
        return f"over the memory budget (> {mem.budget_gb:.0f} GB beyond the estimate's uncertainty)"
    est = estimate_train(run, layout)
    limit = max(est.terms_s, key=est.terms_s.get)
    return Scored(c, mem.total_gb, mem.budget_gb, mem.tight, est.tokens_per_s, est.tokens_per_s_per_device,
                  LIMIT_NAMES.get(limit, limit), est.terms_s)


@dataclass
class TuneResult:
    devices: int
    global_batch: int
    searched: int
    rejected: Counter
    kept: list                      # Scored, fastest first
    seconds: float
    uncertainty: float = 0.0        # +- share of every throughput estimate (the hardware's)
    rank_resolution: float = 0.0    # estimates closer than this share rank equal

    @property
    def best(self) -> list:
        """The fastest variant of each layout (degrees, micro-batch split, and whether whole layers are
        recomputed, which costs about a quarter more compute), fastest first: the settings that barely change the
        estimate (selective recompute, sequence parallel, parallel optimizer, vocab_emb_dp, offset) do not
        crowd the top k."""
        seen, out = set(), []
        for s in self.kept:
            c = s.candidate
            key = (c.dp, c.mp, c.pp, c.batch_size * c.interleave, c.accumulation, c.recompute == "full")
            if key not in seen:
                seen.add(key)
                out.append(s)
        return out


def tune(exp, devices: int, global_batch: int) -> TuneResult:
    t0 = time.perf_counter()
    rejected, kept, searched = Counter(), [], 0
    for candidate, impossible in search_space(exp, devices, global_batch):
        searched += 1
        if candidate is None:
            rejected[impossible] += 1
            continue
        scored = score(exp, candidate)
        if isinstance(scored, str):
            rejected[scored] += 1
        else:
            kept.append(scored)
    kept.sort(key=lambda s: -s.tokens_per_s)
    return TuneResult(devices, global_batch, searched, rejected, kept, time.perf_counter() - t0, *stated_error(exp))


def budget_devices(exp, devices: int | None, nodes: int | None) -> int:
    per_node = max(1, exp.hardware.devices_per_node)
    if devices and nodes and devices != nodes * per_node:
        raise UserError(f"tune.devices={devices} and tune.nodes={nodes} disagree ({nodes} x {per_node} devices per "
                        f"node of {exp.hardware.name}); give one of them")
    total = devices or (nodes or 0) * per_node
    if total < 1:
        raise UserError("give the device budget: tune.devices=<N> or tune.nodes=<N>")
    return total


def describe(c: Candidate) -> str:
    parts = [c.name, f"b{c.batch_size}x{c.accumulation}"]
    if c.interleave > 1:
        parts.append(f"il{c.interleave}")
    if c.recompute != "none":
        parts.append(f"rc:{c.recompute}")
    if c.seq_parallel:
        parts.append("sp")
    if c.parallel_optimizer:
        parts.append("po")
    if c.mp > 1 and c.vocab_emb_dp:
        parts.append("vdp")
    if c.offset != 0:
        parts.append("off" + format_value(list(c.offset)))
    return " ".join(parts)


def table(result: TuneResult, top_k: int, base_args: list[str]) -> str:
    shown = result.best[:top_k]
    ranks = tied_ranks([s.tokens_per_s_per_device for s in shown], result.rank_resolution)
    width = max([34] + [len(describe(s.candidate)) + 2 for s in shown])
    lines = [f"  {'#':>3}  {'layout':<{width}}{'memory/device':>15}{'tokens/s/p':>12}  limited by (then the command)"]
    for rank, s in zip(ranks, shown):
        mem = f"{s.memory_gb:.1f}/{s.budget_gb:.0f} GB" + ("!" if s.tight else " ")
        cmd = " ".join(["python -m qwen15_exp", *base_args, *s.candidate.command_args()])
        lines.append(f"  {rank:>3}  {describe(s.candidate):<{width}}{mem:>15}{s.tokens_per_s_per_device:>12,.0f}  "
                     f"{s.limit}")
        lines.append(f"      {cmd}")
    return "\n".join(lines)


# --- the command: compose, search, print, write the experiment file, measure ------------------------------

NAME_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")      # a Hydra key: no leading digit, no dot


def group_of(arg: str) -> tuple[str, str, str] | None:
    """('+' or '', group, option) when `arg` selects a config group option (model=72b, +experiment=x)."""
    from qwen15_exp.compose import conf_dir
    key, _, value = arg.partition("=")
    plus = "+" if key.startswith("+") else ""
    key = key.lstrip("+")
    if "." in key or not (conf_dir() / key).is_dir():
        return None
    return plus, key, value


def base_experiment_text(argv: list[str], exp, name: str, ranks: list[str], header: list[str]) -> str:
    """The experiment file: the job as the user composed it (group choices in the defaults list, key
    overrides as values), and a sweep over its ranked layouts."""
    from omegaconf import OmegaConf
    includes, overrides, keys = [], [], []
    for arg in argv:
        if arg.startswith(("tune.", "hydra.", "~")):
            continue
        group = group_of(arg)
        if group is None:
            keys.append(arg.lstrip("+"))
        elif group[0]:
            includes.append(f"  - /{group[1]}: {group[2]}" if group[1] not in ("experiment", "table") else
                            f"  - /{group[1]}/{group[2]}")
        else:
            overrides.append(f"  - override /{group[1]}: {group[2]}")
    if not any(o.startswith("  - override /hardware:") for o in overrides):
        overrides.append(f"  - override /hardware: {exp.hardware.name.split(' ')[0]}")
    body = OmegaConf.from_dotlist(keys)
    body.experiment_name = f"tuned/{name}"
    # the layouts are the options of the group experiment/tuned/<name>, chosen after everything else in the
    # defaults list so that a layout's keys win over the recipe's; without -m it is the fastest
    body.hydra = {"sweeper": {"params": {f"experiment/tuned/{name}": ",".join(ranks)}}}
    return "\n".join(["# @package _global_", *[f"# {h}" for h in header], "defaults:", *includes,
                      f"  - /experiment/tuned/{name}: {ranks[0]}", *overrides, "  - _self_", "", OmegaConf.to_yaml(body)])


def rank_text(name: str, rank: int, s: Scored) -> str:
    from omegaconf import OmegaConf
    body = OmegaConf.from_dotlist([f"{k}={format_value(v)}" for k, v in s.candidate.overrides().items()])
    body.experiment_name = f"tuned/{name}/rank{rank}"
    return (f"# @package _global_\n# rank {rank}: {describe(s.candidate)}; estimated "
            f"{s.tokens_per_s_per_device:,.0f} tokens/s/p, {s.memory_gb:.1f} of {s.budget_gb:.0f} GB, limited by "
            f"{s.limit}\n" + OmegaConf.to_yaml(body))


def write_experiment(argv, exp, result: TuneResult, top_k: int, name: str, config_dir: Path) -> Path:
    from qwen15_exp.atomic import write_text
    folder = config_dir / "experiment" / "tuned"
    best = result.best[:top_k]
    ranks = [f"rank{i}" for i in range(1, len(best) + 1)]
    for stale in (folder / name).glob("rank*.yaml"):
        stale.unlink()
    for rank, s in zip(ranks, best):
        write_text(folder / name / f"{rank}.yaml", rank_text(name, int(rank[4:]), s))
    header = [f"python -m qwen15_exp.tune {' '.join(argv)}",
              f"the {len(best)} fastest of {len(result.best)} layouts that fit ({result.searched} settings searched) on "
              f"{result.devices} devices, global batch {result.global_batch}"]
    path = folder / f"{name}.yaml"
    write_text(path, base_experiment_text(argv, exp, name, ranks, header))
    return path


def default_name(exp, devices: int) -> str:
    hw = exp.hardware.name.split(" ")[0]
    return f"{exp.phase.name}_{exp.model.name}_{hw}_{devices}d_s{exp.data.seq_length}"


def uncertainty_note(result: TuneResult) -> str:
    """What the tokens/s/p column can be trusted to: its error, and how close two layouts may be and still rank."""
    parts = []
    if result.uncertainty:
        parts.append(f"tokens/s/p +-{result.uncertainty:.0%}")
    if result.rank_resolution:
        parts.append(f"layouts within {result.rank_resolution:.0%} of each other share a rank ('=')")
    return f";\n{' ' * 2}" + ", ".join(parts) if parts else ""


def summary(result: TuneResult) -> str:
    lines = [f"searched {result.searched:,} candidate settings in {result.seconds:.2f} s: kept {len(result.kept):,} "
             f"({len(result.best):,} distinct layouts), rejected {sum(result.rejected.values()):,}"]
    for reason, n in result.rejected.most_common():
        lines.append(f"  {n:>7,} {reason}")
    return "\n".join(lines)


def measure(name: str, config_dir: Path | None, steps: int) -> tuple[Path, int]:
    """Run the tuned sweep here for `steps` steps; the sweep report ranks the jobs by measurement."""
    import subprocess
    from datetime import datetime

    from qwen15_exp.paths import output_root
    sweep_dir = output_root() / "tune" / name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    cmd = [sys.executable, "-m", "qwen15_exp", *([f"--config-dir={config_dir}"] if config_dir else []), "-m",
           f"+experiment=tuned/{name}", f"phase.max_steps={steps}", f"hydra.sweep.dir={sweep_dir}"]
    print(f"\nmeasuring: {' '.join(cmd[1:])}", flush=True)
    code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    return sweep_dir, code


def measured_table(sweep_dir: Path) -> str:
    from qwen15_exp.report import collect, ranking
    rows = collect(sweep_dir)
    lines = [f"  {'job':<5}{'layout':<12}{'status':<9}{'estimated':>11}{'measured':>11}  tokens/s/p"]
    for r in rows:
        lines.append(f"  {r['job']:<5}{str(r['parallel']):<12}{str(r['status']):<9}{r['estimated'] or 0:>11,.1f}"
                     f"{r['measured'] or 0:>11,.1f}")
    return "\n".join(lines + ranking(rows))


def compose_job(argv: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from qwen15_exp.compose import conf_dir, register, to_experiment
    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv, return_hydra_config=True)
        with open_dict(cfg):
            del cfg["hydra"]
        return to_experiment(cfg, overrides=argv)


def run(argv: list[str]) -> int:
    from qwen15_exp.compose import conf_dir
    exp = compose_job(argv)
    opts = exp.tune
    if not exp.phase.trains:
        raise UserError(f"phase={exp.phase.name} does not train; tune searches training layouts (phase=finetune, "
                        "pretrain or lora)")
    devices = budget_devices(exp, opts.devices, opts.nodes)
    gb = opts.global_batch or layout_of(exp).global_batch
    name = opts.name or default_name(exp, devices)
    if not NAME_OK.fullmatch(name):
        raise UserError(f"tune.name={name!r}: use letters, digits, '_' and '-', starting with a letter (it names a config group)")
    if opts.top_k < 1 or opts.measure_steps < 1:
        raise UserError("tune.top_k and tune.measure_steps must be at least 1")
    result = tune(exp, devices, gb)
    print(f"{exp.model.name} {exp.phase.name}, seq {exp.data.seq_length}, global batch {gb} "
          f"({gb * exp.data.seq_length:,} tokens/step), {devices} devices of {exp.hardware.name}")
    print(summary(result))
    if not result.kept:
        raise UserError("no layout fits: raise the budget (tune.devices / tune.nodes), shorten data.seq_length, or "
                        "use a smaller global batch (tune.global_batch)")
    base_args = [a for a in argv if not a.startswith("tune.")]
    print(f"\nfastest {min(opts.top_k, len(result.best))} of {len(result.best)} layouts, each with its fastest "
          "settings (memory '!': over budget, within the estimate's uncertainty)" + uncertainty_note(result) + ":")
    print(table(result, opts.top_k, base_args))
    config_dir = Path(opts.config_dir).expanduser().resolve() if opts.config_dir else conf_dir()
    path = write_experiment(argv, exp, result, opts.top_k, name, config_dir)
    custom = None if config_dir == conf_dir() else config_dir
    flag = f" --config-dir={custom}" if custom else ""
    print(f"\nwrote {path}\n  plan or run them as a sweep: python -m qwen15_exp{flag} -m +experiment=tuned/{name}")
    if not opts.measure:
        return 0
    if exp.hardware.device_target != "CPU" and not npus_present():
        raise UserError(f"tune.measure=true runs the layouts, but hardware={exp.hardware.name} is not here "
                        "(no NPUs); measure on the cluster, or tune with hardware=cpu")
    sweep_dir, code = measure(name, custom, opts.measure_steps)
    print(measured_table(sweep_dir))
    print(f"\nsweep report: {sweep_dir / 'sweep_report.md'}")
    return 0 if code == 0 else 1


def main() -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qwen15_exp.cli import report_user_error
    try:
        sys.exit(run(sys.argv[1:]))
    except UserError as e:
        report_user_error(str(e))
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        report_user_error(f"{e}".strip().splitlines()[0] + "\n  (tune takes the same overrides as "
                          "python -m qwen15_exp, plus tune.devices / tune.nodes / tune.top_k / tune.measure)")
        sys.exit(2)


if __name__ == "__main__":
    main()
