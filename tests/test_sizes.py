"""Each official size's MindFormers network, built from our config without allocating weights, has the
exact Qwen1.5 parameter count and names/shapes (subprocess: MindSpore import stays out of pytest)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from qwen15_exp.estimate.memory import total_params
from helpers import make_experiment

pytestmark = pytest.mark.slow

# Parameter counts of the Qwen1.5 architectures (72B: 72,287,920,128; 0.5B counts its tied embedding once).
PARAMS = {"0_5b": 463_987_712, "1_8b": 1_836_828_672, "4b": 3_950_369_280, "7b": 7_721_324_544,
          "14b": 14_167_290_880, "32b": 32_512_218_112, "72b": 72_287_920_128}
# A sample of names and shapes (MindFormers' Llama names).
SHAPES = {
    "72b": {"model.tok_embeddings.embedding_weight": [152064, 8192], "model.layers.79.attention.wq.bias": [8192],
            "model.layers.0.feed_forward.w1.weight": [24576, 8192], "lm_head.weight": [152064, 8192]},
    "32b": {"model.layers.63.attention.wk.weight": [1024, 5120], "model.layers.0.attention.wv.bias": [1024],
            "model.layers.0.attention.wq.weight": [5120, 5120], "model.norm_out.weight": [5120]},
    "0_5b": {"model.tok_embeddings.embedding_weight": [151936, 1024], "model.layers.23.ffn_norm.weight": [1024]},
    "4b": {"model.layers.39.feed_forward.w2.weight": [2560, 6912]},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sizes")
    from pathlib import Path
    from qwen15_exp.plan import make_plan
    configs = {}
    for size in PARAMS:
        exp = make_experiment([f"model={size}", "hardware=atlas_800t_a2", "parallel=single"])
        configs[size] = make_plan(exp, Path(tmp)).mindformers["model"]["model_config"]
    script = textwrap.dedent(f"""
        import json, os, sys
        os.environ["LOCAL_DEFAULT_PATH"] = {str(tmp)!r}; os.environ["LOG_MF_PATH"] = {str(tmp / 'log')!r}
        from lazy_network import build_lazily, parameter_count, parameter_table
        out = {{}}
        for size, mc in json.loads(sys.stdin.read()).items():
            net = build_lazily(mc)
            out[size] = {{"count": parameter_count(net), "shapes": dict(parameter_table(net))}}
        print("JSON" + json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", script], input=json.dumps(configs), capture_output=True, text=True,
                       cwd=tmp, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("JSON", 1)[1])


@pytest.mark.parametrize("size", list(PARAMS))
def test_parameter_count(built, size):
    assert built[size]["count"] == PARAMS[size]
    assert total_params(make_experiment([f"model={size}"]).model) == PARAMS[size]   # the estimator agrees


@pytest.mark.parametrize("size", list(SHAPES))
def test_names_and_shapes(built, size):
    shapes = built[size]["shapes"]
    for name, shape in SHAPES[size].items():
        assert shapes[name] == shape, name
    if size == "0_5b":
        assert "lm_head.weight" not in shapes               # tied to the embedding
