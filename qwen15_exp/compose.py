"""Compose step: Hydra's DictConfig -> a typed Experiment, with hardware=auto resolved.

Imports nothing heavy: composing and validating hundreds of configs takes seconds.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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


def register_resolvers() -> None:
    resolvers = {
        "q15.sample": sample_path,
        "q15.cpu_count": lambda: os.cpu_count() or 1,
        "q15.host_memory_gb": host_memory_gb,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def group_options(group: str) -> list[str]:
    folder = conf_dir() / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def load_group_option(group: str, name: str, schema) -> object:
    """One option of a group as its typed dataclass (used to resolve hardware=auto)."""
    node = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(conf_dir() / group / f"{name}.yaml"))
    return OmegaConf.to_object(node)


def fits_this_machine(exp: Experiment) -> bool:
    """The CPU profile can run it: one node, data parallel only, and the fp32 training state fits in RAM."""
    from qwen15_exp.estimate.memory import cpu_training_bytes
    cpu = load_group_option("hardware", "cpu", HardwareConfig)
    p = exp.parallel
    if p.model_parallel > 1 or p.pipeline_stage > 1 or p.context_parallel > 1:
        return False
    if p.data_parallel > cpu.devices_per_node:
        return False
    return cpu_training_bytes(exp) * p.data_parallel < 0.8 * cpu.device_memory_gb * 2**30


def resolve_auto_hardware(exp: Experiment) -> Experiment:
    if exp.hardware.name != "auto":
        return exp
    name = "cpu" if fits_this_machine(exp) else "atlas_800t_a2"
    exp.hardware = load_group_option("hardware", name, HardwareConfig)
    exp.hardware.description += " (chosen by hardware=auto)"
    return exp


def absolutize_paths(exp: Experiment, base: str | None = None) -> Experiment:
    """User paths are relative to where the command was typed, not to the run dir."""
    base = base or os.getcwd()

    def absolute(p: str) -> str:
        return p if not p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    exp.data.input = absolute(exp.data.input)
    exp.data.tokenizer_dir = absolute(exp.data.tokenizer_dir)
    exp.data.cache_dir = absolute(os.path.expanduser(exp.data.cache_dir)) if exp.data.cache_dir else ""
    exp.phase.load_checkpoint = absolute(exp.phase.load_checkpoint)
    return exp


def to_experiment(cfg: DictConfig, base_dir: str | None = None) -> Experiment:
    """The composed config as a typed Experiment (interpolations resolved, auto hardware picked)."""
    exp = OmegaConf.to_object(cfg)
    if not isinstance(exp, Experiment):      # composed without the schema (tests may do that)
        exp = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Experiment), cfg))
    exp = absolutize_paths(exp, base_dir)
    return resolve_auto_hardware(exp)
