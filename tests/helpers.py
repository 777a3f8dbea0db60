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


def random_hf_qwen2(folder: Path, overrides: list[str], seed: int = 0):
    """A transformers Qwen2ForCausalLM of the composed model's shape, every weight random (biases and norms
    included), saved as a Hugging Face folder: the reference for parity tests."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    m = make_experiment(overrides).model
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=m.hidden_size, intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                      num_attention_heads=m.num_heads, num_key_value_heads=m.n_kv_heads or m.num_heads,
                      vocab_size=m.vocab_size, rope_theta=m.theta, rms_norm_eps=m.rms_norm_eps,
                      tie_word_embeddings=m.tie_word_embeddings, max_position_embeddings=m.max_position_embedding)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder, safe_serialization=True)
    return model
