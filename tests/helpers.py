"""Helpers the tests import: compose configs the way the CLI does, run the CLI in a subprocess, read results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qwen15_exp.compose import conf_dir, to_experiment

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def make_experiment(overrides=()):
    return to_experiment(compose_cfg(overrides), overrides=list(overrides))


def run_cli(args, tmp_path: Path, module: str = "qwen15_exp", timeout: int = 600, env=None):
    """Run `python -m module args` from tmp_path (so stray writes would show) with outputs under tmp_path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "QWEN15_EXP_OUTPUTS": str(tmp_path / "outputs"),
                "XDG_CACHE_HOME": os.environ.get("QWEN15_TEST_CACHE", str(tmp_path / "cache")), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def only_run_dir(tmp_path: Path) -> Path:
    dirs = [p.parent for p in (tmp_path / "outputs").rglob("plan.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_json(path: Path):
    return json.loads(Path(path).read_text())
