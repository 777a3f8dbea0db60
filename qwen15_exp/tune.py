"""`python -m qwen15_exp.tune`: search the layouts of a job (search.py), print the fastest, write them as an
experiment whose options are the ranked layouts, and optionally measure them here as a sweep.

    python -m qwen15_exp.tune +experiment=recipe/finetune_72b hardware=atlas_900_a2_podc tune.nodes=8
    python -m qwen15_exp -m +experiment=tuned/<name>          # plan (or run) the top k as a sweep

The experiment is written under the output root (<outputs>/conf/experiment/tuned/), which is on Hydra's
search path for every qwen15_exp command (hydra_plugins/qwen15_exp_launcher/searchpath.py); tune.config_dir
writes it elsewhere, to be passed with --config-dir.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from qwen15_exp.errors import UserError
from qwen15_exp.layout import layout_of
from qwen15_exp.ranks import tied_ranks
from qwen15_exp.search import Scored, TuneResult, describe, format_value, tune

def budget_devices(exp, devices: int | None, nodes: int | None) -> int:
    per_node = max(1, exp.hardware.devices_per_node)
    if devices and nodes and devices != nodes * per_node:
        raise UserError(f"tune.devices={devices} and tune.nodes={nodes} disagree ({nodes} x {per_node} devices per "
                        f"node of {exp.hardware.name}); give one of them")
    total = devices or (nodes or 0) * per_node
    if total < 1:
        raise UserError("give the device budget: tune.devices=<N> or tune.nodes=<N>")
    return total


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


def global_batches_that_fit(exp, devices: int, asked: int, tries: int = 12) -> list[int]:
    """Global batches near the one asked for (multiples of it first, then of the data-parallel degrees a budget
    allows) that admit at least one layout; a few at most, searched cheaply."""
    from qwen15_exp.search import model_parallel_options
    from qwen15_exp.validate import divisors
    dps = sorted({devices // (mp * pp) for mp in model_parallel_options(exp) if devices % mp == 0
                  for pp in divisors(devices // mp)})
    options = sorted({asked * k for k in (2, 4, 8, 16)} | {dp * k for dp in dps for k in (1, 2, 4)} - {asked})
    found = []
    for gb in options[:tries * 2]:
        if tune(exp, devices, gb).kept:
            found.append(gb)
            if len(found) == 3:
                break
    return found


def no_layout_message(exp, devices: int, gb: int, given: bool) -> str:
    """Why nothing fits and what would: the global batch is the usual cause on a large budget."""
    what = "tune.global_batch" if given else ("the job's own: phase.batch_size x data_parallel x accumulation; "
                                             "tune.global_batch searches another")
    fits = global_batches_that_fit(exp, devices, gb)
    head = f"no layout of {devices} devices fits global batch {gb} ({what})"
    if fits:
        return (f"{head}: data_parallel x micro-batches must divide the global batch, and the memory must fit. "
                f"Layouts fit with tune.global_batch={' / '.join(map(str, fits))}")
    return (f"{head}, nor a few global batches around it: raise the budget (tune.devices / tune.nodes) or shorten "
            "data.seq_length")


def suggested_args(argv: list[str]) -> list[str]:
    """The job's own overrides, as a suggested command repeats them: not tune's, not hydra's (its run dir)."""
    return [a for a in argv if not a.lstrip("+~").startswith(("tune.", "hydra.", "hydra/"))]


def most_devices(exp, global_batch: int) -> int:
    """The most devices any layout can use: data_parallel divides the global batch, model_parallel is one of
    the node's options, and a pipeline stage holds at least one layer."""
    from qwen15_exp.search import model_parallel_options
    return global_batch * max(model_parallel_options(exp)) * exp.model.num_layers


def run(argv: list[str]) -> int:
    from qwen15_exp.paths import user_conf_dir
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
    most = most_devices(exp, gb)
    if devices > most:              # no layout can use them: say so now, whatever the budget's size
        raise UserError(f"no layout of {exp.model.name} can use {devices:,} devices at global batch {gb}: at most "
                        f"{most:,} (global batch {gb} x the widest model_parallel x one stage per layer); lower "
                        "tune.devices / tune.nodes, or raise tune.global_batch")
    result = tune(exp, devices, gb)
    print(f"{exp.model.name} {exp.phase.name}, seq {exp.data.seq_length}, global batch {gb} "
          f"({gb * exp.data.seq_length:,} tokens/step), {devices} devices of {exp.hardware.name}")
    print(summary(result))
    if not result.kept:
        raise UserError(no_layout_message(exp, devices, gb, bool(opts.global_batch)))
    base_args = suggested_args(argv)
    print(f"\nfastest {min(opts.top_k, len(result.best))} of {len(result.best)} layouts, each with its fastest "
          "settings (memory '!': over budget, within the estimate's uncertainty)" + uncertainty_note(result) + ":")
    print(table(result, opts.top_k, base_args))
    custom = Path(opts.config_dir).expanduser().resolve() if opts.config_dir else None
    path = write_experiment(argv, exp, result, opts.top_k, name, custom or user_conf_dir())
    flag = f" --config-dir={custom}" if custom else ""
    print(f"\nwrote {path}\n  plan or run them as a sweep: python -m qwen15_exp{flag} -m +experiment=tuned/{name}")
    if not opts.measure:
        return 0
    from qwen15_exp.launch.choose import npus_present
    if exp.hardware.device_target != "CPU" and not npus_present():
        raise UserError(f"tune.measure=true runs the layouts, but hardware={exp.hardware.name} is not here "
                        "(no NPUs); measure on the cluster, or tune with hardware=cpu")
    sweep_dir, code = measure(name, custom, opts.measure_steps)
    print(measured_table(sweep_dir))
    print(f"\nsweep report: {sweep_dir / 'sweep_report.md'}")
    return 0 if code == 0 else 1


def main() -> None:
    from qwen15_exp.cli import exit_on_user_error
    sys.exit(exit_on_user_error(lambda: run(sys.argv[1:]),
                                hint="tune takes the same overrides as python -m qwen15_exp, plus tune.devices / "
                                     "tune.nodes / tune.global_batch / tune.top_k / tune.measure"))


if __name__ == "__main__":
    main()
