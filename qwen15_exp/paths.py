"""Where things live: one cache root and one output root, each defined here and nowhere else.

The cache root follows the XDG convention ($XDG_CACHE_HOME/qwen15_exp, else ~/.cache/qwen15_exp) and holds
prepared data, converted weights and the CPU calibration. The output root ($QWEN15_EXP_OUTPUTS, else
~/qwen15_exp_outputs) holds every run; the configs reach it through the `paths` node (`${paths.output_root}`).
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen15_exp"


def weights_cache_dir() -> Path:
    """Converted Hugging Face weights, base + adapter checkpoints, links to run checkpoints."""
    return cache_root() / "weights"


def output_root() -> Path:
    return Path(os.environ.get("QWEN15_EXP_OUTPUTS") or os.path.join(os.path.expanduser("~"), "qwen15_exp_outputs"))


def user_conf_dir() -> Path:
    """Config files qwen15_exp writes for the user (tune's experiment/tuned/<name>.yaml): under the output root,
    never into the installed package, and on Hydra's search path for every qwen15_exp command
    (hydra_plugins/qwen15_exp_launcher/searchpath.py)."""
    return output_root() / "conf"


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in `folder`, or None. Asked before a run starts: a read-only or full file
    system is the machine's fault, said in one line, not a traceback half way. Nothing is created: an
    existing folder gets a probe file (removed), a missing one is judged by its nearest existing parent."""
    import errno
    import os
    import tempfile
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != folder:
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing}: {os.strerror(errno.EROFS) if is_read_only(existing) else 'not writable'}"
        return None
    try:
        fd, probe = tempfile.mkstemp(prefix=".qwen15_exp_probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{e.filename or folder}: {e.strerror or e}"
    return None


def is_read_only(path: Path) -> bool:
    import os
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
