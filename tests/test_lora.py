"""phase=lora: MindFormers' pet_config from the config group, trainable parameters counted by hand, and a
memory estimate that gives gradients and optimizer state to the trainable parameters only."""
from pathlib import Path

import numpy as np
import pytest

from helpers import make_experiment
from qwen15_exp.estimate.memory import estimate_memory, trainable_params
from qwen15_exp.estimate.throughput import train_flops_per_token
from qwen15_exp.plan import make_plan
from qwen15_exp.validate import validate

# tiny: hidden 64, 2 layers, 4 heads (no GQA): wq wk wv wo are 64 x 64; rank 8 adds 8 x (64 + 64) to each
ATTENTION_ADAPTERS = 2 * 4 * 8 * (64 + 64)                       # 8192
FFN_ADAPTERS = 2 * 3 * 8 * (176 + 64)                            # w1, w3: 176 x 64; w2: 64 x 176
NORMS = 2 * 2 * 64 + 64                                          # attention_norm, ffn_norm per layer, norm_out


@pytest.mark.parametrize("overrides,expected", [
    ([], ATTENTION_ADAPTERS),
    (["phase.lora.target_modules=.*w1|.*w2|.*w3"], FFN_ADAPTERS),
    (["phase.lora.trainable=[*norm*]"], ATTENTION_ADAPTERS + NORMS),
    (["phase.lora.rank=16"], 2 * ATTENTION_ADAPTERS),
])
def test_trainable_parameters_by_hand(overrides, expected):
    exp = make_experiment(["phase=lora", "hardware=cpu", *overrides])
    assert trainable_params(exp.model, exp.phase.lora) == expected
    assert make_plan(exp, Path("/tmp/x")).summary()["params_trainable"] == expected


def test_the_lora_knobs_reach_mindformers_pet_config():
    exp = make_experiment(["phase=lora", "hardware=cpu", "phase.lora.rank=4", "phase.lora.alpha=8",
                           "phase.lora.trainable=[*norm*]"])
    mc = make_plan(exp, Path("/tmp/x")).mindformers["model"]["model_config"]
    assert mc["pet_config"] == {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.05,
                                "target_modules": ".*wq|.*wk|.*wv|.*wo", "freeze_exclude": ["*norm*"]}
    assert "pet_config" not in make_plan(make_experiment(["hardware=cpu"]), Path("/tmp/x")).mindformers["model"][
        "model_config"]


def test_lora_fits_where_full_finetuning_does_not():
    """7B on 4-way tensor parallel cards with 30 GB: full AdamW state does not fit, LoRA's does."""
    layout = ["model=7b", "parallel=mp4", "hardware=atlas_800t_a2", "hardware.max_device_memory=30GB"]
    full, lora = make_experiment(layout), make_experiment(layout + ["phase=lora"])
    assert any(p.key == "hardware.max_device_memory" for p in validate(full))
    assert validate(lora) == []
    m_full, m_lora = estimate_memory(full), estimate_memory(lora)
    assert m_full.weights_gb < m_lora.weights_gb < m_full.weights_gb * 1.002       # frozen weights + adapters
    assert m_lora.optimizer_gb < m_full.optimizer_gb / 500                          # state for adapters only
    # no weight gradients for frozen weights: 4N + 2N_trainable instead of 6N (plus attention)
    assert train_flops_per_token(lora) < train_flops_per_token(full) * 0.7


def test_lora_targets_that_match_nothing_are_named():
    problems = validate(make_experiment(["phase=lora", "hardware=cpu", "phase.lora.target_modules=.*nothing"]))
    assert [p.key for p in problems] == ["phase.lora.target_modules"]


@pytest.mark.slow
def test_lora_on_cpu_trains_only_the_adapters(tmp_path, monkeypatch):
    """LoRA from a partly trained tiny model, four records for six epochs: the loss on the same rows goes down,
    every frozen weight is bit-identical to the base checkpoint, only the 16 adapters changed, and the
    trainable-only checkpoint holds exactly them."""
    import json

    from safetensors.numpy import load_file

    from helpers import read_json, run_cli
    from qwen15_exp.compose import sample_path
    from qwen15_exp.weights.shapes import expected_shapes

    r = run_cli(["hardware=cpu", "phase.max_steps=16", "phase.checkpoint.format=safetensors"], tmp_path / "base")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    base_file = next((tmp_path / "base" / "outputs").rglob("checkpoint/rank_0/*.safetensors"))
    four = tmp_path / "four.json"
    four.write_text(json.dumps(json.loads(Path(sample_path("alpaca_sample.json")).read_text())[:4], ensure_ascii=False))
    r = run_cli(["phase=lora", "hardware=cpu", f"phase.load_checkpoint={base_file}", "phase.max_steps=24",
                 "phase.lora.dropout=0", "phase.lr_schedule.learning_rate=5e-2", "phase.checkpoint.format=safetensors",
                 "data=alpaca", f"data.input={four}"], tmp_path / "lora")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "8,192 trainable" in r.stdout
    run_dir = next((tmp_path / "lora" / "outputs").rglob("result.json")).parent
    result = read_json(run_dir / "result.json")
    loss = result["measured"]["loss"]
    assert result["status"] == "ok" and len(loss) == 24 and result["plan"]["params_trainable"] == ATTENTION_ADAPTERS
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4 - 0.01          # the same four rows, six epochs later
    base = load_file(str(base_file))
    after = load_file(str(next(run_dir.rglob("checkpoint/rank_0/*.safetensors"))))
    model = make_experiment(["hardware=cpu"]).model
    frozen = list(expected_shapes(model))
    assert all(np.array_equal(after[n], base[n]) for n in frozen), [n for n in frozen if not np.array_equal(after[n], base[n])]
    adapters = sorted(n for n in after if "lora" in n and not n.startswith(("adam", "accu")))
    assert len(adapters) == 16 and all(".attention.w" in n for n in adapters)
    assert all(np.abs(after[n]).max() > 0 for n in adapters if n.endswith("lora_b"))   # B starts at zero
    kept = list(run_dir.rglob("checkpoint_trainable/rank_0/*.safetensors"))
    assert len(kept) == 1                                # keep_after_success=1, as for the full checkpoint
    newest = kept[0]
    trainable = load_file(str(newest))
    assert sorted(trainable) == adapters
    assert {trainable[n].shape for n in adapters} == {(8, 64), (64, 8)}
    # merged: W + alpha/rank * B @ A gives the LoRA model's logits without adapters
    merged = tmp_path / "merged.safetensors"
    r = run_cli(["direction=lora_merge", f"input={run_dir}", f"output={merged}", "progress=false"], tmp_path,
                module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    assert "merged 8 LoRA adapter pairs (alpha 16, rank 8)" in r.stdout             # wq wk wv wo x 2 layers
    assert "converted 26 tensors" in r.stdout                                       # tiny's network, no adapters
    assert all(np.array_equal(load_file(str(merged))[n], after[n]) for n in frozen if "attention.w" not in n)
    to_merged, to_base = logits_difference(run_dir, merged, base_file)
    print(f"CHECK lora: max |logits(LoRA) - logits(merged)| = {to_merged:.2e} (<= 1e-5), vs the base {to_base:.2e}")
    assert to_merged <= 1e-5 and to_base > 1e-3          # the adapters matter, and the merge keeps them exactly
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    check_peft_round_trip(tmp_path, run_dir, base_file, merged)


def check_peft_round_trip(tmp_path, run_dir, base_file, merged):
    """The adapters exported in PEFT format, loaded by `peft` on the Hugging Face Qwen2 converted from the same
    base, give the LoRA model's logits; read back, they merge to the same weights as the run's own merge."""
    import json

    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import Qwen2ForCausalLM

    from helpers import run_cli
    from qwen15_exp.weights.adapters import with_adapters
    peft_dir, hf_base = tmp_path / "peft_adapter", tmp_path / "hf_base"
    r = run_cli(["direction=lora_peft", f"input={run_dir}", f"output={peft_dir}", "progress=false"], tmp_path,
                module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    assert "exported 8 LoRA adapter pairs (alpha 16, rank 8) and 0 trained tensors" in r.stdout
    assert "converted 16 tensors" in r.stdout
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    # the run's base is a MindFormers file, no PEFT base: left empty, and said how to name one
    assert config["base_model_name_or_path"] is None and "base_model=<that folder>" in r.stdout
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16, ["k_proj", "o_proj", "q_proj",
                                                                                    "v_proj"])
    r = run_cli(["direction=mf2hf", f"input={base_file}", f"output={hf_base}", "progress=false", "dtype=fp32"],
                tmp_path, module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    named = tmp_path / "peft_named"
    r = run_cli(["direction=lora_peft", f"input={run_dir}", f"output={named}", f"base_model={hf_base}",
                 "progress=false"], tmp_path, module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf_base)
    model = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(hf_base, torch_dtype=torch.float32), peft_dir)
    model.eval()
    ids = np.load(run_dir / "ids.npy")
    with torch.no_grad():
        theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.load(run_dir / "lora_logits.npy")
    print(f"CHECK lora: max |logits(peft on HF base) - logits(LoRA)| = {np.abs(theirs - ours).max():.2e} (<= 1e-4)")
    assert np.abs(theirs - ours).max() <= 1e-4, np.abs(theirs - ours).max()
    # and back: the PEFT folder on the base merges to the run's own merge
    again = load_file(with_adapters(str(base_file), str(peft_dir)))
    expected = load_file(str(merged))
    assert sorted(again) == sorted(expected)
    assert max(float(np.abs(again[n] - expected[n]).max()) for n in expected) <= 1e-6


def logits_difference(run_dir, merged, base) -> tuple[float, float]:
    """max |logits(LoRA model, its checkpoint) - logits(plain model)| with the merged and with the base weights,
    on fixed token ids."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import glob, os, yaml, numpy as np
        os.environ["LOCAL_DEFAULT_PATH"] = os.environ["LOG_MF_PATH"] = {str(run_dir / 'probe')!r}
        import mindspore as ms
        from mindformers import LlamaConfig, LlamaForCausalLM
        from mindformers.pet import get_pet_model
        ms.set_context(mode=ms.PYNATIVE_MODE); ms.set_device("CPU")
        mc = yaml.safe_load(open({str(run_dir / 'mindformers.yaml')!r}))["model"]["model_config"]
        pet = mc.pop("pet_config"); mc.pop("type"); mc.update(batch_size=1, seq_length=16)
        ids = ms.Tensor(np.random.default_rng(0).integers(0, 151643, (1, 16)), ms.int32)
        def logits(net, path):
            params = ms.load_checkpoint(path, format="safetensors")
            missing, _ = ms.load_param_into_net(net, params, strict_load=False)
            assert not missing, missing
            net.set_train(False)
            inner = next(c for _, c in net.cells_and_names() if hasattr(c, "lm_head") and hasattr(c, "model"))
            return inner.lm_head(inner.model(ids)).asnumpy()
        lora_ckpt = glob.glob({str(run_dir)!r} + "/output/checkpoint/rank_0/*.safetensors")[0]
        a = logits(get_pet_model(LlamaForCausalLM(LlamaConfig(**mc)), pet), lora_ckpt)
        b = logits(LlamaForCausalLM(LlamaConfig(**mc)), {str(merged)!r})
        c = logits(LlamaForCausalLM(LlamaConfig(**mc)), {str(base)!r})
        np.save({str(run_dir / 'lora_logits.npy')!r}, a); np.save({str(run_dir / 'ids.npy')!r}, ids.asnumpy())
        print("DIFF", float(np.abs(a - b).max()), float(np.abs(a - c).max()))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    to_merged, to_base = r.stdout.split("DIFF", 1)[1].split()
    return float(to_merged), float(to_base)


def test_peft_folders_read_back_and_continue_only_with_matching_lora(tmp_path):
    """A PEFT folder written by export_peft reads back to the same adapters (names mapped both ways); a phase=lora
    run continues them only with the same rank, alpha and targets, and the error names the overrides."""
    from qwen15_exp.errors import UserError
    from qwen15_exp.weights.adapters import check_continues
    from qwen15_exp.weights.lora import Adapters, check_fit
    from safetensors.numpy import load_file

    from qwen15_exp.weights.peft import export_peft, read_peft
    rng = np.random.default_rng(0)
    pairs = {f"model.layers.{i}.attention.{w}": (rng.standard_normal((4, 64)).astype(np.float32),
                                                 rng.standard_normal((64, 4)).astype(np.float32))
             for i in range(2) for w in ("wq", "wv")}
    extras = {"model.norm_out.weight": np.ones(64, np.float32),
              "model.tok_embeddings.embedding_weight": rng.standard_normal((32, 64)).astype(np.float32)}
    export_peft(Adapters(4, 8, pairs, extras, "test"), tmp_path / "peft")
    config = __import__("json").loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    # a trained (tied) embedding: kept as peft keeps it, its lm_head tied to the trained copy and saved beside it
    assert config["modules_to_save"] == ["model.embed_tokens", "model.norm"] and config["ensure_weight_tying"]
    written = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert np.array_equal(written["base_model.model.lm_head.weight"], extras["model.tok_embeddings.embedding_weight"])
    back = read_peft(tmp_path / "peft")
    assert (back.rank, back.alpha, sorted(back.pairs), sorted(back.extras)) == (4, 8, sorted(pairs), sorted(extras))
    assert all(np.array_equal(back.pairs[k][0], pairs[k][0]) and np.array_equal(back.pairs[k][1], pairs[k][1])
               for k in pairs)
    lora = make_experiment(["phase=lora", "hardware=cpu"]).phase.lora           # rank 8, alpha 16, wq wk wv wo
    with pytest.raises(UserError) as e:
        check_continues(back, lora)
    assert "phase.lora.rank=4 phase.lora.alpha=8 phase.lora.target_modules='.*wq|.*wv'" in str(e.value)
    lora.rank, lora.alpha, lora.target_modules = 4, 8, ".*wq|.*wv"
    check_continues(back, lora)
    base = {"model.layers.0.attention.wq.weight": (64, 64)}
    with pytest.raises(UserError, match="does not fit the base weights"):
        check_fit(base, back)                                        # layer 1 has no base weight here


def test_adapters_merge_into_a_bf16_base_streamed_and_in_its_dtype(tmp_path, monkeypatch):
    """A bf16 base (what the converter keeps from Hugging Face Qwen1.5) merges tensor by tensor: the merged file
    is bf16 and equals bf16(W + alpha/rank B @ A); untouched tensors are bit-identical."""
    from qwen15_exp.weights.adapters import with_adapters
    from qwen15_exp.weights.lora import Adapters
    from qwen15_exp.weights.peft import export_peft
    from qwen15_exp.weights.tensors import bf16_to_f32, f32_to_bf16, load_array, read_header, write_streaming
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    w = f32_to_bf16(rng.standard_normal((8, 6)).astype(np.float32))
    norm = f32_to_bf16(np.ones(6, np.float32))
    base = tmp_path / "base.safetensors"
    tensors = {"model.layers.0.attention.wq.weight": w, "model.norm_out.weight": norm}
    write_streaming(base, [(n, "BF16", v.shape) for n, v in tensors.items()], tensors.__getitem__)
    a, b = rng.standard_normal((2, 6)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    export_peft(Adapters(2, 4, {"model.layers.0.attention.wq": (a, b)}), tmp_path / "peft")
    refs = read_header(with_adapters(str(base), str(tmp_path / "peft")))
    assert {r.dtype for r in refs} == {"BF16"}
    merged = {r.name: load_array(r) for r in refs}                           # bf16 as its bit patterns
    assert merged["model.norm_out.weight"].tolist() == norm.tolist()
    expected = f32_to_bf16(bf16_to_f32(w) + 2.0 * (b @ a))
    assert merged["model.layers.0.attention.wq.weight"].tolist() == expected.tolist()


def test_a_regex_as_a_trainable_pattern_is_explained():
    """MindFormers matches freeze_exclude with fnmatch: '.*norm.*' kept nothing trainable, silently."""
    from qwen15_exp.validate import validate
    problems = validate(make_experiment(["phase=lora", "phase.lora.trainable=['.*norm.*','*norm*']"]))
    bad = [p for p in problems if p.key == "phase.lora.trainable"]
    assert len(bad) == 1 and "'.*norm.*' matches no parameter" in bad[0].message and "'*norm*'" in bad[0].fix
