"""Sweeps that can be finished: a sweep run again into its own dir keeps the jobs that ended well.

`python -m qwen15_exp -m <same sweep> hydra.sweep.dir=<sweep dir>` runs each job again only if it is missing,
failed, invalid, interrupted or killed; an interrupted or killed training job continues from its checkpoint
(resume). A job counts as the same job when its composed config is the same (`config_sha` in result.json).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

from qwen15_exp.lifecycle import run_status
from qwen15_exp import run_files

KEEP = ("ok", "planned")
CONTINUE = ("interrupted", "killed", "unreadable")


def config_sha(cfg) -> str:
    """The composed job config, unresolved (machine-measured figures do not make a new job)."""
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=False).encode()).hexdigest()[:16]


def finished_result(run_dir: str | Path, cfg) -> dict | None:
    """The job's earlier result if it ended ok (or planned) with the same config. An interrupted or killed
    job of the same config is set to resume instead (cfg.resume)."""
    previous = run_status(Path(run_dir))
    if previous.get("config_sha") not in (None, config_sha(cfg)):
        return None
    if previous.get("status") in KEEP and previous.get("config_sha"):
        return previous
    if previous.get("status") in CONTINUE and (Path(run_dir) / run_files.PLAN).is_file():
        cfg.resume = str(run_dir)
    return None
