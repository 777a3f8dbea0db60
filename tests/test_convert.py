"""HF <-> MindFormers conversion: logits parity with transformers' Qwen2 (fp32, < 1e-4) for an untied, a
tied-embedding and a grouped-KV model, a bit-exact round trip, exact bf16 casts, and the CLI."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qwen15_exp.weights.names import HF_TO_MF, MF_TO_HF, rename
from qwen15_exp.weights.tensors import bf16_to_f32, f32_to_bf16, read_header
from helpers import make_experiment, random_hf_qwen2, run_cli

torch = pytest.importorskip("torch")
VARIANTS = {"untied": ["model.tie_word_embeddings=false"], "tied": ["model.tie_word_embeddings=true"],
            "gqa": ["model.tie_word_embeddings=false", "model.n_kv_heads=2"]}


def test_name_maps_are_inverse():
    for hf in ["model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.bias", "model.layers.0.mlp.up_proj.weight",
               "model.layers.11.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]:
        assert rename(rename(hf, HF_TO_MF), MF_TO_HF) == hf
    assert rename("model.layers.0.self_attn.q_proj.weight", HF_TO_MF) == "model.layers.0.attention.wq.weight"
    assert rename("adam_m.model.norm_out.weight", MF_TO_HF) is None


def test_bf16_casts_match_torch():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    ours = f32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert (ours == theirs).all()
    assert (bf16_to_f32(ours) == torch.from_numpy(x).to(torch.bfloat16).float().numpy()).all()


def make_hf_model(folder: Path, overrides: list[str]):
    m = make_experiment(["model=tiny", *overrides]).model
    model = random_hf_qwen2(folder, ["model=tiny", *overrides])
    ids = np.random.default_rng(1).integers(0, m.vocab_size, (2, 16))
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.numpy()
    return ids, logits


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    from qwen15_exp.plan import make_plan
    jobs = {}
    for variant, overrides in VARIANTS.items():
        hf_dir = tmp / f"hf_{variant}"
        ids, ref = make_hf_model(hf_dir, overrides)
        np.save(tmp / f"{variant}_ids.npy", ids)
        np.save(tmp / f"{variant}_ref.npy", ref)
        exp = make_experiment(["model=tiny", "hardware=cpu", *overrides])
        jobs[variant] = make_plan(exp, tmp).mindformers["model"]["model_config"]
        r = run_cli(["direction=hf2mf", f"input={hf_dir}", f"output={tmp / f'mf_{variant}.safetensors'}",
                     "progress=false"], tmp, module="qwen15_exp.convert")
        assert r.returncode == 0, r.stderr
    script = textwrap.dedent(f"""
        import json, os, sys, numpy as np
        os.environ["LOCAL_DEFAULT_PATH"] = {str(tmp / 'mf_out')!r}; os.environ["LOG_MF_PATH"] = {str(tmp / 'mf_out')!r}
        import mindspore as ms
        from mindformers import LlamaConfig, LlamaForCausalLM
        ms.set_context(mode=ms.PYNATIVE_MODE); ms.set_device("CPU")
        out = {{}}
        for variant, mc in json.loads(sys.stdin.read()).items():
            kw = {{k: v for k, v in mc.items() if k != "type"}}
            kw.update(batch_size=2, seq_length=16)
            net = LlamaForCausalLM(config=LlamaConfig(**kw))
            params = ms.load_checkpoint({str(tmp)!r} + f"/mf_{{variant}}.safetensors", format="safetensors")
            missing, unused = ms.load_param_into_net(net, params, strict_load=True)
            net.set_train(False)
            ids = np.load({str(tmp)!r} + f"/{{variant}}_ids.npy")
            logits = net.lm_head(net.model(ms.Tensor(ids, ms.int32))).asnumpy()
            ref = np.load({str(tmp)!r} + f"/{{variant}}_ref.npy")
            out[variant] = {{"max_abs_diff": float(np.abs(logits - ref).max()), "missing": list(missing),
                            "unused": list(unused), "params": len(params)}}
        print("JSON" + json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", script], input=json.dumps(jobs), capture_output=True, text=True,
                       cwd=tmp, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, json.loads(r.stdout.split("JSON", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_parity_with_transformers(parity, variant):
    _, out = parity
    assert out[variant]["missing"] == [] and out[variant]["unused"] == []
    assert out[variant]["max_abs_diff"] < 1e-4
    assert out[variant]["params"] == (26 if variant == "tied" else 27)     # tied: no lm_head


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_bit_exact(parity, variant):
    tmp, _ = parity
    back = tmp / f"hf_back_{variant}"
    r = run_cli(["direction=mf2hf", f"input={tmp / f'mf_{variant}.safetensors'}", f"output={back}", "model=tiny",
                 *VARIANTS[variant], "progress=false"], tmp, module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file
    original = load_file(str(tmp / f"hf_{variant}" / "model.safetensors"))
    again = load_file(str(back / "model.safetensors"))
    assert sorted(original) == sorted(again)
    assert all(original[k].dtype == again[k].dtype and (original[k] == again[k]).all() for k in original)
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] == (variant == "tied")
    from transformers import Qwen2ForCausalLM
    reloaded = Qwen2ForCausalLM.from_pretrained(back)                     # a loadable Hugging Face folder
    assert reloaded.config.num_key_value_heads == (2 if variant == "gqa" else 4)
    if variant == "untied":
        hf_folder_loads_as_people_load_it(back)


def hf_folder_loads_as_people_load_it(folder):
    """transformers' AutoTokenizer (Qwen1.5's chat template, our token ids), generation config and pipeline."""
    from transformers import AutoTokenizer, GenerationConfig, pipeline

    from qwen15_exp.data.chatml import chat_prompt
    from qwen15_exp.data.tokenizer import load_tokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    text = "Hello, 北京! <|im_end|> tabs\tand spaces"
    assert tok(text)["input_ids"] == load_tokenizer().encode(text).ids
    messages = [{"role": "user", "content": "What is 1+1?"}]
    assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == chat_prompt("You are a helpful assistant.", "What is 1+1?"))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == [151645, 151643] and generation.top_k == 20
    out = pipeline("text-generation", model=str(folder))("Hello", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("Hello") and len(out[0]["generated_text"]) > len("Hello")


@pytest.mark.slow
def test_a_ckpt_output_is_a_checkpoint_mindspore_loads(tmp_path):
    """output=<name>.ckpt: MindSpore's save_checkpoint appends .ckpt to a name without it; the temp file of the
    atomic write must end in .ckpt, or the real file is left empty and the checkpoint lies beside it."""
    make_hf_model(tmp_path / "hf", VARIANTS["untied"])
    r = run_cli(["direction=hf2mf", f"input={tmp_path / 'hf'}", f"output={tmp_path / 'mf.ckpt'}", "progress=false"],
                tmp_path, module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]       # no checkpoint beside it
    r = subprocess.run([sys.executable, "-c", "import sys, mindspore as ms; print(len(ms.load_checkpoint(sys.argv[1])))",
                        str(tmp_path / "mf.ckpt")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "27", r.stderr[-2000:]


def test_dtype_choice_and_bad_input(tmp_path):
    ids, _ = make_hf_model(tmp_path / "hf", VARIANTS["untied"])
    r = run_cli(["direction=hf2mf", f"input={tmp_path / 'hf'}", f"output={tmp_path / 'mf.safetensors'}", "dtype=bf16",
                 "progress=false"], tmp_path, module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    assert {ref.dtype for ref in read_header(tmp_path / "mf.safetensors")} == {"BF16"}
    r = run_cli(["direction=mf2hf", f"input={tmp_path / 'mf.safetensors'}", f"output={tmp_path / 'x'}", "model=7b"],
                tmp_path, module="qwen15_exp.convert")
    assert r.returncode == 2 and "does not fit model=7b" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["direction=hf2mf", f"input={tmp_path / 'nope'}", f"output={tmp_path / 'y.safetensors'}"], tmp_path,
                module="qwen15_exp.convert")
    assert r.returncode == 2 and "input not found" in r.stderr


@pytest.mark.slow
def test_a_run_finetunes_from_hugging_face_weights(tmp_path):
    """phase.load_checkpoint pointing at a HF folder: converted once (cached), then loaded by MindFormers."""
    make_hf_model(tmp_path / "hf", VARIANTS["tied"])
    r = run_cli([f"phase.load_checkpoint={tmp_path / 'hf'}", "phase.max_steps=3"], tmp_path,
                env={"HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "converting Hugging Face weights" in r.stdout
    from helpers import only_run_dir, read_json
    result = read_json(only_run_dir(tmp_path) / "result.json")
    # random-init loss is ~ln(151936) = 11.93; the converted weights give a different first loss
    assert result["status"] == "ok" and abs(result["measured"]["first_loss"] - 11.93) > 0.05
    # the converted file lives under the cache root ($XDG_CACHE_HOME/qwen15_exp/weights), not in ~/.cache
    assert list((tmp_path / "cache" / "qwen15_exp" / "weights").glob("hf-*.safetensors"))
    assert not (tmp_path / ".cache").exists()


@pytest.mark.slow
def test_our_safetensors_trains_and_predicts_as_load_checkpoint(tmp_path):
    """The converter's .safetensors is a checkpoint like any other: no extra key to train or predict from it."""
    from helpers import read_json
    make_hf_model(tmp_path / "hf", VARIANTS["tied"])
    weights = tmp_path / "tiny.safetensors"
    r = run_cli(["direction=hf2mf", f"input={tmp_path / 'hf'}", f"output={weights}", "progress=false"], tmp_path,
                module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    r = run_cli([f"phase.load_checkpoint={weights}", "phase.max_steps=2", "hardware=cpu"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = next(p.parent for p in (tmp_path / "outputs").rglob("result.json"))
    result = read_json(run_dir / "result.json")
    assert result["status"] == "ok" and abs(result["measured"]["first_loss"] - 11.93) > 0.05   # not random init
    assert "load_ckpt_format: safetensors" in (run_dir / "mindformers.yaml").read_text()
    r = run_cli([f"phase.load_checkpoint={weights}", "phase=predict", "hardware=cpu", "phase.predict_data=[Hello]",
                 "phase.generation.max_new_tokens=4"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = read_json(next(p for p in (tmp_path / "outputs").rglob("result.json") if p.parent != run_dir))
    assert result["status"] == "ok" and result["measured"]["weights"] == str(weights)
    assert result["generated"][0]["new_tokens"] == 4
