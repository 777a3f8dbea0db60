"""How a process that runs MindFormers starts, written once for the in-process launcher and msrun's workers.

`prepare_process()` first (before MindFormers is imported), then `start_mindformers(yaml)`: the calls
MindFormers' run_mindformer.py makes (MindFormerConfig -> set_output_path -> build_context), with our
CPU pieces registered (qwen15_exp.mindformers_ext). Also this process's peak memory, which both report.
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import types
from pathlib import Path


def prepare_process() -> None:
    """Before MindFormers is imported: no PyTorch in the process, nltk initialised on use."""
    skip_pytorch_import()
    defer_nltk_init()


ALLOW_PYTORCH_ENV = "QWEN15_EXP_IMPORT_TORCH"


class _FinderWithoutTorch:
    """A sys.meta_path finder as it was, except that it finds no `torch`: `import torch` raises
    ModuleNotFoundError and importlib.util.find_spec("torch") is None, as if it were not installed (the check
    datasets and transformers make; a None in sys.modules instead breaks scipy's check)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):                 # find_distributions, invalidate_caches, ...
        return getattr(self.finder, attr)


def skip_pytorch_import() -> None:
    """Keep PyTorch out of a process that runs MindSpore. MindFormers imports tensorboardX, which imports torch
    whenever it is installed, only to recognise torch tensors (it does without); nothing else here uses it, and
    the import took 3 of the 5.5 s MindFormers' own import takes on this machine (every run's start). Set
    QWEN15_EXP_IMPORT_TORCH=1 when a callback of yours needs torch in the run's process."""
    if "torch" in sys.modules or os.environ.get(ALLOW_PYTORCH_ENV) == "1":
        return
    sys.meta_path[:] = [f if isinstance(f, _FinderWithoutTorch) else _FinderWithoutTorch(f) for f in sys.meta_path]


class _PackageInitialisedOnUse(types.ModuleType):
    """A package in sys.modules whose own __init__ runs on the first attribute it lacks: its submodules import
    as usual (it has its __path__), and `nltk.word_tokenize` still works, after the full import."""

    def __init__(self, spec):
        super().__init__(spec.name)
        self.__spec__, self.__loader__, self.__file__ = spec, spec.loader, spec.origin
        self.__path__, self.__package__ = list(spec.submodule_search_locations), spec.name

    def __getattr__(self, attr):
        if self.__dict__.get("_qwen15_initialised"):
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")
        self.__dict__["_qwen15_initialised"] = True
        self.__spec__.loader.exec_module(self)
        return getattr(self, attr)


def defer_nltk_init() -> None:
    """MindFormers imports nltk.translate.bleu_score at import time, for one BLEU metric, and nltk's package
    __init__ imports most of nltk first (1.1 s of every run's start, the largest part of MindFormers' own
    import). `nltk` and `nltk.translate` become packages whose __init__ runs on first use, so the import loads
    only bleu_score and the two modules it needs (0.08 s): MindFormers gets the real sentence_bleu and
    SmoothingFunction; any other use of nltk gets all of it."""
    if "nltk" in sys.modules:
        return
    import importlib.util
    for name in ("nltk", "nltk.translate"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            return                           # not installed: MindFormers' own import says so
        sys.modules[name] = _PackageInitialisedOnUse(spec)
        if name == "nltk.translate":
            sys.modules["nltk"].__dict__["translate"] = sys.modules[name]


@contextlib.contextmanager
def in_run_dir(run_dir: Path, env: dict):
    """The run dir as working directory and `env` set, for the duration; both restored after."""
    old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.chdir(run_dir)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_mindformers(yaml_path: Path, **overrides):
    """The run's MindFormerConfig (output_dir made absolute against the YAML's folder, `overrides` set on
    top), with MindSpore's context built from it. Returns the config."""
    from mindformers.core.context import build_context
    from mindformers.tools.register import MindFormerConfig
    from mindformers.utils.file_utils import set_output_path

    import qwen15_exp.mindformers_ext  # noqa: F401  (registers the CPU model, optimizer, train step, metric)

    config = MindFormerConfig(str(yaml_path))
    if not os.path.isabs(config.output_dir):
        config.output_dir = str(Path(yaml_path).resolve().parent / config.output_dir)
    for key, value in overrides.items():
        setattr(config, key, value)
    set_output_path(config.output_dir)
    build_context(config)
    return config


def train(config, callbacks=None):
    """run_mindformer.py calls train() for both train and finetune; finetune() would drop load_checkpoint."""
    from mindformers.trainer import Trainer
    return Trainer(config, callbacks=callbacks).train()


def evaluate(config):
    """Trainer.evaluate on the configured weights (validate requires them for phase=eval): without
    `eval_checkpoint` it drops load_checkpoint and scores a randomly initialised network. The figures are
    written by mindformers_ext.TokenPerplexity (eval_rank<r>.jsonl)."""
    from mindformers.trainer import Trainer
    return Trainer(config).evaluate(eval_checkpoint=str(config.load_checkpoint))


def reset_peak_rss() -> None:
    """Start this process's peak RSS afresh (Linux: VmHWM), so that each job of a sweep run in one process
    reports its own peak rather than the largest of the jobs before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak RSS since reset_peak_rss (or its start)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
