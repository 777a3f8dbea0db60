"""MindSpore's graph compile cache, on for every run, in a folder keyed by what the graph is made of.

MindSpore checks only that the Python files of the entry script have not changed before it reuses a cached
graph (MS_COMPILER_CACHE_*: "be aware of correctness risks"): a changed layer count, sequence length or
learning-rate schedule (its constants live in the graph) would silently reuse a wrong graph. So the folder
is keyed here by the whole MindFormers config, less what cannot reach the graph (paths, the callbacks, the
epoch count), by the versions and environment that compile it, and by our own graph code. On this CPU the
folders live under the cache root and are shared by every run with the same key; a plan for a cluster keeps
its cache beside the run (`compile_cache/` in the run dir, relative as every path of a plan), so a resumed
run reuses it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from pathlib import Path

from qwen15_exp.paths import cache_root

ENABLE, PATH = "MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"
# keys that never reach the graph: where things are read or written, what Python does around the steps
NOT_IN_GRAPH = frozenset({"output_dir", "load_checkpoint", "resume_training", "auto_trans_ckpt", "load_ckpt_format",
                          "only_save_strategy", "callbacks", "tensorboard", "dataset_dir", "data_dir", "epochs",
                          "eval_step_interval", "eval_epoch_interval"})
RUN_DIR = "<run>"


def graph_identity(mindformers_cfg: dict, run_dir: Path | str) -> object:
    """The config as far as it can shape the graph: NOT_IN_GRAPH keys dropped, the run dir made a name."""
    run_dir = str(run_dir)

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in NOT_IN_GRAPH}
        if isinstance(node, list):
            return [strip(v) for v in node]
        if isinstance(node, str) and run_dir not in (".", ""):
            return node.replace(run_dir, RUN_DIR)
        return node
    return strip(mindformers_cfg)


@functools.lru_cache(maxsize=None)
def own_graph_code() -> str:
    """A digest of our module that puts code into the graph (the CPU train step, model and loss). MindSpore's
    own check skips every file under sys.path, which an installed or editable qwen15_exp is."""
    return hashlib.sha256((Path(__file__).parent / "mindformers_ext.py").read_bytes()).hexdigest()[:16]


def cache_key(mindformers_cfg: dict, run_dir: Path | str, env: dict, versions: dict) -> str:
    compile_env = {k: v for k, v in env.items() if not k.startswith(("MS_COMPILER_CACHE", "QWEN15_EXP_"))}
    blob = json.dumps({"config": graph_identity(mindformers_cfg, run_dir), "env": compile_env,
                       "versions": versions, "code": own_graph_code()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def shared_root() -> Path:
    """Where this machine's runs keep their compile cache folders, one per key."""
    return cache_root() / "compile"


def cache_dir(key: str) -> Path:
    return shared_root() / key


def is_shared(path: Path | str) -> bool:
    """A folder of this machine's shared cache (not one beside a cluster run)."""
    return Path(path).parent == shared_root()


def cache_env(mindformers_cfg: dict, run_dir: Path | str, env: dict, executes_here: bool) -> dict:
    """The environment that turns the cache on for this run."""
    if not executes_here:
        return {ENABLE: "1", PATH: "compile_cache"}       # beside the run, on the cluster
    from qwen15_exp.result import versions
    pins = {k: versions().get(k) for k in ("mindspore", "mindformers", "python")}
    return {ENABLE: "1", PATH: str(cache_dir(cache_key(mindformers_cfg, run_dir, env, pins)))}


def cached_graphs(path: Path | str) -> dict[str, float]:
    """The compiled graphs in a cache folder (every rank's), with their modification times."""
    return {str(p): p.stat().st_mtime for p in Path(path).glob("rank_*/graph_cache/*.mindir")}


def reuse_word(before: dict[str, float], after: dict[str, float]) -> str:
    """What a run did with the cache: MindSpore rewrites a graph it compiled, and leaves one it reused alone."""
    if not after:
        return "not written"
    if before and all(after.get(p) == t for p, t in before.items()):
        return "reused"
    return "compiled and cached"


# A folder used (started from) this recently may belong to a run still compiling: never pruned. A run older than
# that has compiled and loaded its graph; losing its folder costs the next identical run a compile, no more.
IN_USE_S = 3600.0


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prune(keep: Path | str, max_bytes: float, now: float | None = None) -> list[Path]:
    """Mark `keep` used (its mtime), then remove the least recently used folders beside it until the rest fit in
    max_bytes; folders used within IN_USE_S stay whatever their size. The removed folders, oldest first."""
    keep = Path(keep)
    keep.mkdir(parents=True, exist_ok=True)
    keep.touch()
    now = time.time() if now is None else now
    folders = sorted((p for p in keep.parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    sizes = {p: folder_bytes(p) for p in folders}
    total, removed = sum(sizes.values()), []
    for folder in folders:
        if total <= max_bytes:
            break
        if folder == keep or now - folder.stat().st_mtime < IN_USE_S:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= sizes[folder]
        removed.append(folder)
    return removed
