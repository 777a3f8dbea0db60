"""Explain a `parallel=<name>` that names no layout file but reads as degrees (dp2mp4pp2, mp3, ...)."""
from __future__ import annotations

import re

_DEGREES = re.compile(r"^(?:dp(?P<dp>\d+))?(?:mp(?P<mp>\d+))?(?:pp(?P<pp>\d+))?$")
_KEYS = {"dp": "data_parallel", "mp": "model_parallel", "pp": "pipeline_stage"}


def degree_overrides(name: str) -> list[str] | None:
    """'mp3' -> ['parallel.model_parallel=3']; None if the name does not read as degrees."""
    m = _DEGREES.match(name)
    if not name or not m or not any(m.groupdict().values()):
        return None
    return [f"parallel.{_KEYS[k]}={v}" for k, v in m.groupdict().items() if v]


def unknown_layout_in(argv: list[str], known: list[str]) -> tuple[str, list[str]] | None:
    for arg in argv:
        if arg.startswith("parallel=") and "," not in arg:
            name = arg.split("=", 1)[1]
            if name not in known:
                overrides = degree_overrides(name)
                if overrides:
                    return name, overrides
    return None


def explain(argv: list[str], known: list[str]) -> str | None:
    """A message for parallel=<degrees> without a layout file: what is wrong and what would work."""
    found = unknown_layout_in(argv, known)
    if not found:
        return None
    name, overrides = found
    from hydra import compose, initialize_config_dir

    from qwen15_exp.compose import conf_dir, to_experiment
    from qwen15_exp.validate import format_problems, validate
    rest = [a for a in argv if not a.startswith("parallel=") and "=" in a and not a.startswith("-")]
    args = rest + ["parallel=single"] + overrides
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args)
        exp = to_experiment(cfg, overrides=args)
    problems = validate(exp)
    head = (f"parallel={name}: there is no layout file named {name!r} (named layouts: {', '.join(known)}). "
            f"Read as {' '.join(overrides)}:")
    if problems:
        return f"{head}\n{format_problems(problems)}"
    return (f"{head} valid. Write it as `parallel=single {' '.join(overrides)}` (or add conf/parallel/{name}.yaml).")
