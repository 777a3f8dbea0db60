"""What a checkpoint path is, and the run path's single weights step.

A run's `phase.load_checkpoint` may be a MindFormers `.ckpt`, a `.safetensors` file (ours or MindFormers'),
a folder of rank_* checkpoints, or a Hugging Face folder. `resolve_checkpoint` turns a Hugging Face folder
into a MindFormers safetensors file once (cached under the cache root, keyed by the folder and its files),
for every launcher; the MindFormers config then reads the format from the path (`checkpoint_format`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qwen15_exp import run_files
from qwen15_exp.paths import weights_cache_dir
from qwen15_exp.weights.check import check_fits, is_hf_folder


def checkpoint_format(path: str) -> str:
    """'safetensors' or 'ckpt', as MindFormers' load_ckpt_format wants it, from the file or folder."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return "safetensors"
    if p.is_dir() and not any(p.rglob("*.ckpt")) and any(p.rglob("*.safetensors")):
        return "safetensors"
    return "ckpt"


def converted_path(hf_folder: Path) -> Path:
    files = sorted(hf_folder.glob("*.safetensors"))
    key = hashlib.sha256(json.dumps([str(hf_folder.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                                                 for f in files]).encode()).hexdigest()[:16]
    return weights_cache_dir() / f"{hf_folder.name}-{key}.safetensors"


def mindformers_weights(path: str, show_progress: bool = True) -> str:
    """A MindFormers checkpoint for `path`; a Hugging Face folder is converted once and cached."""
    p = Path(path)
    if not is_hf_folder(p):
        return path
    out = converted_path(p)
    if not out.is_file():
        from qwen15_exp.weights.hf_conversion import hf_to_mf
        print(f"converting Hugging Face weights {p} -> {out} (once; cached)")
        hf_to_mf(p, out, show_progress=show_progress)
    return str(out)


def outside_rank_folder(path: str) -> str:
    """A checkpoint file inside a rank_N folder (where runs save theirs) as a link from the cache: MindFormers
    takes a file in a rank_* folder for one shard of a distributed checkpoint and refuses it on one device."""
    p = Path(path)
    if not (p.is_file() and p.parent.name.startswith("rank_")):
        return path
    key = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:16]
    link = weights_cache_dir() / "links" / key / p.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink() or link.resolve() != p.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(p.resolve())
    return str(link)


def is_run_dir(path: str) -> bool:
    return bool(path) and (Path(path) / run_files.PLAN).is_file()


def checkpoint_of_run_dir(path: str) -> str:
    """phase.load_checkpoint=<the dir of an earlier run>: its newest checkpoint that every rank completed, as
    `resume` finds it (one rank: the file; several: the folder of rank_* folders)."""
    from qwen15_exp.errors import UserError
    from qwen15_exp.weights.run_checkpoints import checkpoint_root, latest_complete
    devices = int(json.loads((Path(path) / run_files.PLAN).read_text()).get("devices") or 1)
    point = latest_complete(Path(path), devices)
    if point is None:
        raise UserError(f"phase.load_checkpoint={path} is a run dir without a complete checkpoint (none under "
                        f"{checkpoint_root(Path(path))} for all {devices} rank(s)): give a checkpoint file, or "
                        f"resume={path} to continue that run")
    return point.files[0] if devices == 1 else str(checkpoint_root(Path(path)))


def resolve_checkpoint(exp, devices: int, show_progress: bool = True) -> None:
    """The weights step of a run: phase.load_checkpoint is checked against the model (every tensor's shape)
    and becomes a MindFormers checkpoint (in place)."""
    path = exp.phase.load_checkpoint
    if path and Path(path).exists():           # a plan's weights may live only on the cluster
        check_fits(path, exp.model)
        path = mindformers_weights(path, show_progress)
        if exp.phase.adapter:
            from qwen15_exp.weights.adapters import with_adapters
            # a LoRA run trains the adapters on; every other phase uses them merged (proven equal)
            path = with_adapters(path, exp.phase.adapter, exp.phase.lora)
        if devices == 1:
            path = outside_rank_folder(path)
        exp.phase.load_checkpoint = path
