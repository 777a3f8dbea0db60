"""One cache root, one output root, each defined once."""
from pathlib import Path

from helpers import REPO, make_experiment


def test_every_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch):
    """Prepared data, converted weights and the CPU calibration all go under $XDG_CACHE_HOME/qwen15_exp."""
    import numpy as np

    from qwen15_exp.data.cache import prepare
    from qwen15_exp.estimate import cpu_calibration
    from qwen15_exp.weights.checkpoint import mindformers_weights
    from qwen15_exp.weights.tensors import write_streaming

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    exp = make_experiment(["hardware=cpu"])
    prepared = prepare(exp.data, exp.data.seq_length, show_progress=False)
    calibration = cpu_calibration.load(refresh=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    tensors = [("model.embed_tokens.weight", "F32", (8, 4)), ("model.norm.weight", "F32", (4,))]
    write_streaming(hf / "model.safetensors", tensors, lambda n: np.ones(dict((t[0], t[2]) for t in tensors)[n],
                                                                          dtype=np.float32))
    converted = mindformers_weights(str(hf), show_progress=False)
    root = tmp_path / "xdg" / "qwen15_exp"
    assert Path(prepared.folder).parent == root / "data"
    assert Path(converted).parent == root / "weights"
    assert (root / "cpu_calibration.json").is_file() and calibration["fp32_tflops"] > 0
    assert not (tmp_path / "home").exists()


def test_outputs_root_is_written_once():
    texts = [p.read_text() for p in (REPO / "conf").rglob("*.yaml")]
    assert sum("QWEN15_EXP_OUTPUTS" in t for t in texts) <= 1
    assert sum("${paths.output_root}" in t for t in texts) >= 4       # config, chat, prepare, convert
