"""A run's own training checkpoints: which one to resume from, what to clean, what to keep.

MindFormers' CheckpointMonitor writes <run>/output/checkpoint/rank_<r>/<prefix>_rank_<r>-<epoch>_<step>.ckpt
(the file appears only when complete: MindSpore writes a .tmp and renames it) and a meta.json naming the
newest. The step in a file name counts from the start of that process, so after a resume it is not the
training step; the step stored inside the file (`step_num`) is. A kill during a save can leave meta.json
naming a file that was already rotated away and a stale .tmp beside it. So the newest checkpoint is found by
reading `step_num` from each file (newest first), never by trusting meta.json, and a checkpoint counts only
when every rank has a readable file for the same step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FORMATS = (".ckpt", ".safetensors")
_RANK_IN_NAME = re.compile(r"_rank_\d+")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    name: str                  # rank 0's file name (MindFormers puts each rank's id into it)
    files: tuple               # one per rank


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "output" / "checkpoint"


def rank_dirs(root: Path) -> list[Path]:
    return sorted((d for d in Path(root).glob("rank_*") if d.is_dir()), key=lambda d: int(d.name.split("_")[1]))


def checkpoint_files(rank_dir: Path) -> list[Path]:
    """Complete checkpoint files of one rank, newest first."""
    files = [p for p in rank_dir.iterdir() if p.suffix in FORMATS and p.is_file()]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def clean_partial(root: Path) -> list[Path]:
    """Remove what a killed save left behind (MindSpore's .tmp files)."""
    removed = []
    for d in rank_dirs(root):
        for p in d.glob("*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def stored_step(path: Path) -> int | None:
    """The training step a checkpoint file holds (its `step_num`), or None if the file is unreadable."""
    try:
        if path.suffix == ".safetensors":
            from qwen15_exp.weights.tensors import load_array, read_header
            ref = next((r for r in read_header(path) if r.name == "step_num"), None)
            return int(load_array(ref).reshape(-1)[0]) if ref else None
        import mindspore as ms
        values = ms.load_checkpoint(str(path), choice_func=lambda name: name == "step_num")
        return int(values["step_num"].asnumpy().reshape(-1)[0]) if "step_num" in values else None
    except Exception:             # truncated or corrupt: not a checkpoint to resume from
        return None


def latest_complete(run_dir: Path, ranks: int) -> Checkpoint | None:
    """The newest step for which each of `ranks` ranks has a readable checkpoint file."""
    root = checkpoint_root(run_dir)
    dirs = rank_dirs(root)
    if len(dirs) < ranks:
        return None
    by_rank: list[dict[int, Path]] = []
    for d in dirs[:ranks]:
        steps: dict[int, Path] = {}
        for f in checkpoint_files(d):
            step = stored_step(f)
            if step is not None and step not in steps:
                steps[step] = f
        by_rank.append(steps)
    common = set(by_rank[0]).intersection(*by_rank[1:])
    if not common:
        return None
    step = max(common)
    files = tuple(str(r[step]) for r in by_rank)
    return Checkpoint(step=step, name=_RANK_IN_NAME.sub("_rank_0", Path(files[0]).name), files=files)


def prune(root: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` checkpoint files of each rank (0: none); return what was removed."""
    removed = []
    for d in rank_dirs(root):
        for p in checkpoint_files(d)[keep:]:
            p.chmod(0o644)
            p.unlink()
            removed.append(p)
        if keep == 0:
            (d / "meta.json").unlink(missing_ok=True)
    return removed

