"""End to end, as a user checks that finetuning worked: the tiny model finetuned on four alpaca records until it
memorises them answers each of them verbatim in `python -m qwen15_exp.chat` (greedy), with full weights and with
the base plus LoRA adapters, and phase=eval on those records reports a perplexity near 1. Generation ends at
<|im_end|> and what the terminal shows is the answer the transcript records.

The base is pretrained first on the other records, as a user's base is. The tiny model keeps 97 % of its
weights in its (tied) embedding and has a 64-wide, two-layer body: adapters alone cannot memorise with it (a
rank-64, i.e. full-rank, adapter on every projection stays near loss 4.6 after 300 steps, with the norms
trainable too), so its LoRA run keeps the embedding and norms trainable (`phase.lora.trainable`, PEFT's
modules_to_save), which reaches loss 0.03-0.06 in 400 steps; 600 leave a margin.
"""
import json
from pathlib import Path

import pytest

from helpers import read_json, run_cli
from qwen15_exp.compose import sample_path
from qwen15_exp.data.alpaca import alpaca_user_turn

SHORT = ["hardware=cpu", "data=alpaca", "data.seq_length=64", "phase.epochs=1000", "phase.lr_schedule.warmup_ratio=0",
         "phase.checkpoint.format=safetensors"]


def train(tmp_path: Path, name: str, records: Path, overrides: list[str]) -> Path:
    r = run_cli([*SHORT, f"data.input={records}", *overrides], tmp_path / name)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return next((tmp_path / name / "outputs").rglob("result.json")).parent


def newest_checkpoint(run_dir: Path) -> Path:
    return max(run_dir.glob("output/checkpoint/rank_0/*.safetensors"), key=lambda p: p.stat().st_mtime)


def chat(tmp_path: Path, name: str, questions: list[str], overrides: list[str], history: bool,
         seq_length: int = 128) -> tuple[list, str]:
    """Greedy batch chat through the CLI; the questions come in a config file (they hold newlines)."""
    conf = tmp_path / f"{name}_conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "questions.yaml").write_text("# @package _global_\n" + json.dumps({"chat": {"questions": questions}}))
    r = run_cli([f"--config-dir={conf.parent}", "+experiment=questions", "chat.mode=batch",
                 f"chat.history={str(history).lower()}", "phase.generation.do_sample=false", f"data.seq_length={seq_length}",
                 "phase.generation.max_new_tokens=48", *overrides], tmp_path / name, module="qwen15_exp.chat")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    transcript = next((tmp_path / name / "outputs").rglob("transcript.jsonl"))
    return [json.loads(line) for line in transcript.read_text().splitlines()], r.stdout


@pytest.mark.slow
def test_a_finetuned_model_and_its_lora_adapters_answer_their_records_verbatim(tmp_path):
    records = json.loads(Path(sample_path("alpaca_sample.json")).read_text())
    four, rest = tmp_path / "four.json", tmp_path / "rest.json"
    four.write_text(json.dumps(records[:4], ensure_ascii=False))
    rest.write_text(json.dumps(records[4:], ensure_ascii=False))
    questions = [alpaca_user_turn(r["instruction"], r.get("input")) for r in records[:4]]
    answers = [r["output"] for r in records[:4]]

    # the base: pretrained on the other records (from scratch the LoRA run below stays above loss 2)
    base = newest_checkpoint(train(tmp_path, "base", rest, ["phase.max_steps=300", "phase.lr_schedule.learning_rate=1e-2"]))
    full = train(tmp_path, "full", four, [f"phase.load_checkpoint={base}", "phase.max_steps=600",
                                          "phase.lr_schedule.learning_rate=2e-2"])
    print(f"CHECK memorise: full finetune last loss {read_json(full / 'result.json')['measured']['last_loss']:.4f}")
    assert read_json(full / "result.json")["measured"]["last_loss"] < 0.1
    lora = train(tmp_path, "lora", four, ["phase=lora", f"phase.load_checkpoint={base}", "phase.max_steps=600",
                                          "phase.lora.dropout=0", "phase.lr_schedule.learning_rate=2e-2",
                                          "phase.lora.rank=16", "phase.lora.target_modules=.*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3",
                                          "phase.lora.trainable=['*tok_embeddings*','*norm*']"])
    print(f"CHECK memorise: LoRA last loss {read_json(lora / 'result.json')['measured']['last_loss']:.4f}")
    assert read_json(lora / "result.json")["measured"]["last_loss"] < 0.1

    # full weights, each question on its own: the answers come back verbatim, and they are what was shown
    turns, shown = chat(tmp_path, "chat_full", questions, [f"phase.load_checkpoint={newest_checkpoint(full)}"], False)
    print(f"CHECK memorise: full weights, verbatim answers {sum(t['answer'] == a for t, a in zip(turns, answers))}/4")
    assert [t["answer"] for t in turns] == answers
    assert all(t["ended_by"] == "<|im_end|>" for t in turns)
    assert all(a in shown for a in answers)
    # LoRA: the base checkpoint plus the run's adapters (merged on load) answers verbatim, as the merged
    # checkpoint does
    with_adapter, shown = chat(tmp_path, "chat_lora", questions, [f"phase.load_checkpoint={base}",
                                                                  f"phase.adapter={lora}"], False)
    print(f"CHECK memorise: base + LoRA adapters, verbatim answers "
          f"{sum(t['answer'] == a for t, a in zip(with_adapter, answers))}/4")
    assert [t["answer"] for t in with_adapter] == answers
    assert all(t["ended_by"] == "<|im_end|>" for t in with_adapter) and all(a in shown for a in answers)
    merged = tmp_path / "merged.safetensors"
    r = run_cli(["direction=lora_merge", f"input={lora}", f"output={merged}", "progress=false"], tmp_path,
                module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    from_merged, _ = chat(tmp_path, "chat_merged", questions[:2], [f"phase.load_checkpoint={merged}"], False)
    assert [t["answer"] for t in from_merged] == answers[:2]
    peft_difference = peft_logits_difference(tmp_path, lora, base, merged)
    print(f"CHECK memorise: max |logits(peft, trained tied embedding) - logits(merged)| = {peft_difference:.2e} (<= 1e-4)")
    assert peft_difference <= 1e-4
    # with history the prompt is one the model never saw; whatever it answers, generation stopped at the end of
    # the answer and the terminal showed exactly that answer (or said that there was none)
    turns, shown = chat(tmp_path, "chat_history", questions[:2], [f"phase.load_checkpoint={newest_checkpoint(full)}"],
                        True, seq_length=256)           # room for the first turn in the second prompt
    assert turns[1]["history_turns"] == 1 and turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"]
    for t in turns:
        assert t["ended_by"] in ("<|im_end|>", "<|im_start|>", "max_new_tokens=48")
        assert (t["answer"] in shown) if t["answer"] else ("(no answer: the model's first token was" in shown)
    # phase=eval on the same records: perplexity near 1, with full weights and with the base plus adapters
    for name, weights in (("eval", [f"phase.load_checkpoint={newest_checkpoint(full)}"]),
                          ("eval_lora", [f"phase.load_checkpoint={base}", f"phase.adapter={lora}"])):
        r = run_cli([*SHORT, f"data.input={four}", "phase=eval", *weights], tmp_path / name)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        m = read_json(next((tmp_path / name / "outputs").rglob("result.json")))["measured"]
        print(f"CHECK memorise: {name} perplexity {m['perplexity']:.4f}")
        assert 1.0 <= m["perplexity"] < 1.1, (name, m)


def peft_logits_difference(tmp_path: Path, lora_run: Path, base: Path, merged: Path) -> float:
    """The adapters with their trained (tied) embedding and norms in PEFT format, loaded by `peft` on the Hugging
    Face model of the base: max |logits - logits of the Hugging Face model of the merged checkpoint|."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM
    peft_dir = tmp_path / "peft"
    for args in (["direction=lora_peft", f"input={lora_run}", f"output={peft_dir}"],
                 ["direction=mf2hf", f"input={base}", f"output={tmp_path / 'hf_base'}", "dtype=fp32"],
                 ["direction=mf2hf", f"input={merged}", f"output={tmp_path / 'hf_merged'}", "dtype=fp32"]):
        r = run_cli([*args, "progress=false"], tmp_path, module="qwen15_exp.convert")
        assert r.returncode == 0, r.stderr
    assert "model.embed_tokens" in json.loads((peft_dir / "adapter_config.json").read_text())["modules_to_save"]
    ids = torch.tensor(np.random.default_rng(0).integers(0, 151643, (1, 32)))
    with_peft = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(tmp_path / "hf_base", dtype=torch.float32),
                                          peft_dir).eval()
    plain = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf_merged", dtype=torch.float32).eval()
    with torch.no_grad():
        return float((with_peft(ids).logits - plain(ids).logits).abs().max())
