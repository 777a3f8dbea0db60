"""Evaluation: phase=eval's perplexity is exp(total NLL / scored tokens), checked against the model's own logits and
against transformers on the same random Qwen2; evaluation during training lands every N steps in result.json,
the summary and the sweep report."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import make_experiment, only_run_dir, read_json, run_cli
from qwen15_exp.plan import make_plan
from qwen15_exp.validate import validate

torch = pytest.importorskip("torch")


def test_eval_phase_config():
    """phase=eval: MindFormers' run_mode eval, a network one token longer than the rows' seq_length (whole rows
    are scored), the token-weighted perplexity metric, no optimizer, no trainable parameters."""
    exp = make_experiment(["phase=eval", "hardware=cpu", "phase.load_checkpoint=/nonexistent"])
    assert [p.key for p in validate(exp)] == ["phase.load_checkpoint"]
    cfg = make_plan(exp, __import__("pathlib").Path("/tmp/x")).mindformers
    assert cfg["run_mode"] == "eval" and "optimizer" not in cfg and "train_dataset" not in cfg
    assert cfg["model"]["model_config"]["seq_length"] == exp.data.seq_length + 1
    assert cfg["metric"] == {"type": "TokenPerplexity", "log_dir": "/tmp/x"}
    assert cfg["eval_dataset"]["batch_size"] == 1 and cfg["eval_dataset"]["drop_remainder"] is False


def test_eval_during_training_needs_its_dataset():
    exp = make_experiment(["hardware=cpu", "phase.eval.every_steps=5"])
    assert [p.key for p in validate(exp)] == ["phase.eval"]
    exp = make_experiment(["hardware=cpu", "phase.eval.every_steps=5", "phase.eval.input=/nonexistent.json"])
    assert [p.key for p in validate(exp)] == ["phase.eval.input"]


def rows_and_mindspore_nll(dataset_dir: str, checkpoint: str, mf_yaml: str, out_dir) -> dict:
    """In a MindSpore process: the MindRecord's rows and the summed NLL of every scored token (label != -100 at
    position t+1, predicted from positions 0..t) from the model's logits, computed here with numpy."""
    script = textwrap.dedent(f"""
        import json, os, yaml, numpy as np
        os.environ["LOCAL_DEFAULT_PATH"] = os.environ["LOG_MF_PATH"] = {str(out_dir / 'probe')!r}
        import mindspore as ms, mindspore.dataset as ds
        from mindformers import LlamaConfig, LlamaForCausalLM
        ms.set_context(mode=ms.PYNATIVE_MODE); ms.set_device("CPU")
        files = sorted(f for f in os.listdir({dataset_dir!r}) if f.endswith(".mindrecord"))
        rows = list(ds.MindDataset(os.path.join({dataset_dir!r}, files[0]), shuffle=False).create_dict_iterator(output_numpy=True))
        ids = np.stack([r["input_ids"] for r in rows]); labels = np.stack([r["labels"] for r in rows])
        np.save({str(out_dir / 'ids.npy')!r}, ids); np.save({str(out_dir / 'labels.npy')!r}, labels)
        mc = yaml.safe_load(open({mf_yaml!r}))["model"]["model_config"]; mc.pop("type")
        mc.update(batch_size=1)
        net = LlamaForCausalLM(LlamaConfig(**mc)); net.set_train(False)
        missing, _ = ms.load_param_into_net(net, ms.load_checkpoint({checkpoint!r}, format="safetensors"), strict_load=False)
        assert not missing, missing
        nll, tokens = 0.0, 0
        for row, lab in zip(ids, labels):
            logits = net.lm_head(net.model(ms.Tensor(row[None], ms.int32))).asnumpy()[0].astype(np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            target = lab[1:]; keep = target != -100
            nll -= logp[:-1][keep, target[keep]].sum(); tokens += int(keep.sum())
        print("NLL", json.dumps({{"nll": nll, "tokens": tokens}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=out_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    return json.loads(r.stdout.split("NLL", 1)[1])


@pytest.mark.slow
def test_eval_perplexity_is_the_token_mean_and_matches_transformers(tmp_path):
    from transformers import Qwen2ForCausalLM

    from test_convert import make_hf_model
    hf = tmp_path / "hf"
    make_hf_model(hf, [])
    r = run_cli(["hardware=cpu", "phase=eval", f"phase.load_checkpoint={hf}"], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run_dir = only_run_dir(tmp_path)
    result = read_json(run_dir / "result.json")
    m = result["measured"]
    assert result["status"] == "ok" and m["eval_rows"] == result["data"]["rows"] == 62
    assert f"eval: perplexity {m['perplexity']:,.4f}" in r.stdout
    import yaml
    mf_yaml = run_dir / "mindformers.yaml"
    checkpoint = yaml.safe_load(mf_yaml.read_text())["load_checkpoint"]
    ours = rows_and_mindspore_nll(result["data"]["folder"], checkpoint, str(mf_yaml), tmp_path)
    assert ours["tokens"] == m["eval_tokens"]
    independent = float(np.exp(ours["nll"] / ours["tokens"]))
    print(f"CHECK eval: perplexity {m['perplexity']:.6f}, exp(mean token NLL from the logits) {independent:.6f} "
          f"(relative {abs(m['perplexity'] / independent - 1):.1e}, <= 1e-4)")
    assert abs(m["perplexity"] / independent - 1) <= 1e-4, (m["perplexity"], independent)
    # transformers' perplexity of the same random Qwen2 on the same rows
    model = Qwen2ForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    ids, labels = np.load(tmp_path / "ids.npy"), np.load(tmp_path / "labels.npy")
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row, lab in zip(ids, labels):
            out = model(torch.tensor(row[None], dtype=torch.long), labels=torch.tensor(lab[None], dtype=torch.long))
            scored = int((lab[1:] != -100).sum())
            nll += float(out.loss) * scored
            tokens += scored
    theirs = float(np.exp(nll / tokens))
    assert tokens == m["eval_tokens"]
    print(f"CHECK eval: transformers' perplexity {theirs:.6f} (relative {abs(m['perplexity'] / theirs - 1):.1e}, <= 1e-3)")
    assert abs(m["perplexity"] / theirs - 1) <= 1e-3, (m["perplexity"], theirs)


@pytest.mark.slow
def test_evaluation_during_training_every_n_steps(tmp_path):
    import json

    from qwen15_exp.compose import sample_path
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(json.loads(open(sample_path("alpaca_sample.json")).read())[-8:], ensure_ascii=False))
    r = run_cli(["-m", "hardware=cpu", "phase.max_steps=6", "phase.eval.every_steps=3", f"phase.eval.input={held_out}",
                 "phase.seed=1,2"], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = sorted((tmp_path / "outputs").rglob("result.json"))
    assert len(results) == 2
    for path in results:
        evals = read_json(path)["measured"]["eval"]
        assert [e["step"] for e in evals] == [3, 6]
        assert evals[1]["loss"] < evals[0]["loss"] and evals[0]["tokens"] == evals[1]["tokens"] > 0
    assert all("eval after step 3: loss" in (p.parent / "summary.txt").read_text() for p in results)
    assert [("eval loss" in line) for line in r.stdout.splitlines() if line.startswith("job ")] == [True, True]
    report = next((tmp_path / "outputs").rglob("sweep_report.csv")).read_text().splitlines()
    header = report[0].split(",")
    assert "eval_loss" in header and "perplexity" in header
    last = read_json(results[0])["measured"]["eval"][-1]["loss"]
    assert f"{last:.4f}".rstrip("0") in report[1] + report[2]
