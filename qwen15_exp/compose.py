"""Compose step: Hydra's DictConfig -> a typed Experiment, with hardware=auto resolved.

Imports nothing heavy: composing and validating hundreds of configs takes seconds.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qwen15_exp.layout import degrees, layout_name
from qwen15_exp.schema import Experiment, HardwareConfig

PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """./conf in a source checkout, qwen15_exp/conf inside an installed wheel."""
    for candidate in (PACKAGE_DIR.parent / "conf", PACKAGE_DIR / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("qwen15_exp: config folder not found (conf/ next to the package)")


def sample_path(name: str) -> str:
    return str(PACKAGE_DIR / "samples" / name)


def host_memory_gb() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 8.0


def _cpu(key: str):
    from qwen15_exp.estimate.cpu_calibration import load
    return load()[key]


_registered = False


def register() -> None:
    """Our OmegaConf resolvers and the ConfigStore schemas, once per process (before Hydra composes)."""
    global _registered
    if _registered:
        return
    from qwen15_exp.paths import cache_root, output_root
    from qwen15_exp.schema import register_configs
    resolvers = {
        "q15.cpu_tflops": lambda: _cpu("fp32_tflops"),
        "q15.cpu_bandwidth_gbs": lambda: _cpu("bandwidth_gbs"),
        "q15.sample": sample_path,
        "q15.cpu_count": lambda: os.cpu_count() or 1,
        "q15.host_memory_gb": host_memory_gb,
        "q15.output_root": lambda: str(output_root()),
        "q15.cache_root": lambda: str(cache_root()),
    }
    for name, fn in resolvers.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)
    register_configs()
    _registered = True


def group_options(group: str) -> list[str]:
    folder = conf_dir() / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def load_group_option(group: str, name: str, schema) -> object:
    """One option of a group as its typed dataclass (used to resolve hardware=auto)."""
    node = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(conf_dir() / group / f"{name}.yaml"))
    return OmegaConf.to_object(node)


def fits_this_machine(exp: Experiment) -> bool:
    """The CPU profile can run it: one node, data parallel only, and its memory (fp32 training state, or weights
    and KV cache) fits in RAM."""
    from qwen15_exp.estimate.memory import cpu_run_bytes
    cpu = load_group_option("hardware", "cpu", HardwareConfig)
    dp, mp, pp, cp = degrees(exp.parallel)
    if min(dp, mp, pp, cp, exp.phase.batch_size) < 1 or exp.data.seq_length < 1:
        return True                       # nonsense degrees: validate() names them, on whichever hardware
    if mp > 1 or pp > 1 or cp > 1 or dp > cpu.devices_per_node:
        return False
    return cpu_run_bytes(exp, cpu) * dp < 0.8 * cpu.device_memory_gb * 2**30


def absolute_path(p: str, base: str | None = None) -> str:
    """A user path made absolute against where the command was typed (not the run dir)."""
    if not p:
        return p
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base or os.getcwd(), p))


def absolutize_data(data, base: str | None = None):
    data.input = absolute_path(data.input, base)
    data.tokenizer_dir = absolute_path(data.tokenizer_dir, base)
    data.cache_dir = absolute_path(data.cache_dir, base)
    return data


def absolutize_paths(exp: Experiment, base: str | None = None) -> Experiment:
    absolutize_data(exp.data, base)
    exp.phase.load_checkpoint = absolute_path(exp.phase.load_checkpoint, base)
    exp.phase.adapter = absolute_path(exp.phase.adapter, base)
    exp.launch.rank_table = absolute_path(exp.launch.rank_table, base)
    exp.phase.eval.input = absolute_path(exp.phase.eval.input, base)
    exp.eval.include_path = [absolute_path(p, base) for p in exp.eval.include_path]
    # a task given as its YAML file (lm-eval takes paths as well as names)
    exp.eval.tasks = [absolute_path(t, base) if t.endswith((".yaml", ".yml")) else t for t in exp.eval.tasks]
    return exp


def auto_hardware_choice(exp: Experiment) -> str:
    return "cpu" if fits_this_machine(exp) else "atlas_800t_a2"


def compose_overrides(overrides: list[str]) -> DictConfig:
    """Compose config.yaml with these overrides (inside a running Hydra app or on its own)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _typed(cfg: DictConfig, base_dir: str | None) -> Experiment:
    exp = OmegaConf.to_object(cfg)
    if not isinstance(exp, Experiment):      # composed without the schema
        exp = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Experiment), cfg))
    return absolutize_paths(exp, base_dir)


def hardware_changes(profile: HardwareConfig) -> dict:
    """{key: (preset value, value)} where a composed hardware profile differs from its preset file (after
    overrides); the summary shows them, the profile's name lists the keys."""
    base = profile.name.split(" (modified")[0]
    try:
        preset = load_group_option("hardware", base, HardwareConfig)
    except (OSError, ValueError):
        return {}                            # not a preset file (e.g. a profile given whole on the command line)
    ignore = ("name", "description", "sources")
    return {k: (getattr(preset, k), getattr(profile, k)) for k in vars(profile)
            if k not in ignore and getattr(profile, k) != getattr(preset, k)}


def changed_keys(profile: HardwareConfig) -> list[str]:
    return list(hardware_changes(profile))


def true_names(exp: Experiment) -> Experiment:
    """Names that stay true after overrides: the layout's from its degrees (`parallel=dp4
    parallel.model_parallel=2` is dp4mp2), a changed hardware profile says it is changed."""
    exp.parallel.name = layout_name(*degrees(exp.parallel))
    changed = changed_keys(exp.hardware)
    if changed:
        exp.hardware.name = f"{exp.hardware.name} (modified: {', '.join(changed)})"
    return exp


def to_experiment(cfg: DictConfig, base_dir: str | None = None, overrides: list[str] | None = None) -> Experiment:
    """The composed config as a typed Experiment (interpolations resolved, hardware=auto picked).

    hardware=auto is decided on the composed experiment, then the config is composed again with the chosen
    profile and the same overrides, so `hardware.*` overrides apply to the chosen profile.
    """
    exp = _typed(cfg, base_dir)
    if exp.hardware.name != "auto":
        return true_names(exp)
    choice = auto_hardware_choice(exp)
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.lstrip("+~").startswith("hardware=")]
    exp = true_names(_typed(compose_overrides(kept + [f"hardware={choice}"]), base_dir))
    exp.hardware.description += " (chosen by hardware=auto)"
    return exp


def explain_unknown_layout(argv: list[str], known: list[str]) -> str | None:
    """For `parallel=<name>` where no layout file has that name but it reads as degrees (dp2mp4, mp3): what
    is wrong and what would work, validated as those degrees."""
    from qwen15_exp.layout import parse_layout_name
    for arg in argv:
        if not arg.startswith("parallel=") or "," in arg:
            continue
        name = arg.split("=", 1)[1]
        degrees_given = None if name in known else parse_layout_name(name)
        if degrees_given:
            break
    else:
        return None
    from qwen15_exp.validate import format_problems, validate
    overrides = [f"parallel.{key}={value}" for key, value in degrees_given.items()]
    rest = [a for a in argv if not a.startswith("parallel=") and "=" in a and not a.startswith("-")]
    args = rest + ["parallel=single"] + overrides
    exp = to_experiment(compose_overrides(args), overrides=args)
    problems = validate(exp)
    head = (f"parallel={name}: there is no layout file named {name!r} (named layouts: {', '.join(known)}). "
            f"Read as {' '.join(overrides)}:")
    if problems:
        return f"{head}\n{format_problems(problems)}"
    return f"{head} valid. Write it as `parallel=single {' '.join(overrides)}` (or add conf/parallel/{name}.yaml)."
