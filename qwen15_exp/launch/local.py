"""Launch step, in process: the calls run_mindformer.py makes, on the written mindformers.yaml.

Of the run path (compose -> validate -> plan -> launch), only launch/ imports MindSpore and MindFormers;
elsewhere only the steps that need them do (MindRecord writing, .ckpt I/O, mindformers_ext). MindFormers
picks its output and log folders when it is first imported, so the environment is set before that import,
and the working directory is the run dir while it runs (MindSpore drops rank_*/ and kernel_meta/ into it).
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
import types
from pathlib import Path


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


def mindformers_env(run_dir: Path) -> dict:
    out = Path(run_dir) / "output"
    return {"LOCAL_DEFAULT_PATH": str(out), "LOG_MF_PATH": str(out / "log")}


@contextlib.contextmanager
def inside(run_dir: Path, env: dict):
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


def run_mindformers(yaml_path: Path, callbacks=None):
    """MindFormerConfig -> set_output_path -> build_context -> Trainer(config).train()."""
    from mindformers.core.context import build_context
    from mindformers.tools.register import MindFormerConfig
    from mindformers.trainer import Trainer
    from mindformers.utils.file_utils import set_output_path

    import qwen15_exp.mindformers_ext  # noqa: F401  (registers CPUTrainOneStepCell)

    config = MindFormerConfig(str(yaml_path))
    set_output_path(config.output_dir)
    build_context(config)
    trainer = Trainer(config, callbacks=callbacks)
    if config.run_mode == "eval":          # the metric writes its figures (mindformers_ext.TokenPerplexity)
        return evaluate(trainer, config)
    # run_mindformer.py calls train() for both train and finetune; finetune() would drop load_checkpoint
    return trainer.train()


def evaluate(trainer, config):
    """Trainer.evaluate on the configured weights: without `eval_checkpoint` it drops load_checkpoint and
    scores a randomly initialised network."""
    if not config.load_checkpoint:
        raise ValueError("phase=eval needs weights (load_checkpoint is empty)")
    return trainer.evaluate(eval_checkpoint=str(config.load_checkpoint))


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


def steps_log(run_dir: Path, rank: int = 0) -> Path:
    return Path(run_dir) / f"steps_rank{rank}.jsonl"


def run_local(plan, yaml_path: Path, request) -> dict:
    """Train in this process (a graceful stop on `request`); return what only this process knows."""
    with inside(plan.run_dir, {**mindformers_env(plan.run_dir), **plan.env}):
        from qwen15_exp.console import Progress, mindformers_output
        from qwen15_exp.mindformers_ext import StepRecorder, StopControl
        progress = Progress(plan.steps, plan.layout.tokens_per_step)
        recorder = StepRecorder(steps_log(plan.run_dir), progress)
        t_call = time.perf_counter()
        try:
            with mindformers_output(plan.run_dir):
                run_mindformers(yaml_path, callbacks=[recorder, StopControl(plan.run_dir, request)])
        finally:
            progress.close()
        t_end = time.perf_counter()
    return {"first_step_unix": recorder.step_end_unix[0] if recorder.step_end_unix else None,
            "train_call_s": t_end - t_call, "peak_rss_mb": peak_rss_mb()}


def run_predict(plan, exp) -> tuple[dict, list[dict]]:
    """Generate for phase.predict_data (ChatML-wrapped for phase=chat); measure decode speed."""
    from qwen15_exp.data.chatml import cut_at_stop, make_context
    from qwen15_exp.data.tokenizer import load_tokenizer
    from qwen15_exp.launch.generate import Generator, generation_kwargs

    tok = load_tokenizer(exp.data.tokenizer_dir or None)
    kwargs = generation_kwargs(exp)
    g = exp.phase.generation
    max_new = g.max_new_tokens or max(1, exp.data.seq_length // 4)
    generated, tokens, seconds = [], 0, 0.0
    from qwen15_exp.console import mindformers_output
    with inside(plan.run_dir, mindformers_env(plan.run_dir)), mindformers_output(plan.run_dir):
        ckpt = exp.phase.load_checkpoint          # a MindFormers checkpoint by now (weights step)
        generator = Generator(plan.mindformers, ckpt)
        for prompt in exp.phase.predict_data:
            if exp.phase.chat:
                ids = make_context(tok, prompt, [], exp.phase.system_prompt, exp.data.seq_length - max_new - 1)
            else:
                ids = tok.encode(prompt, add_special_tokens=False).ids
            new, secs = generator.generate(ids, max_new, **kwargs)
            text_ids = cut_at_stop(new) if exp.phase.chat else new
            generated.append({"prompt": prompt, "text": tok.decode(text_ids), "new_tokens": len(new),
                              "seconds": round(secs, 3)})
            tokens += len(new)
            seconds += secs
    measured = {"generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
                "tokens_per_s_per_device": round(tokens / seconds, 2) if seconds else None,
                "weights": ckpt or "random (no phase.load_checkpoint)", "peak_rss_mb": round(peak_rss_mb(), 1)}
    return measured, generated
