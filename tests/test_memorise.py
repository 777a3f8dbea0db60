"""End to end, as a user checks that finetuning worked: the tiny model finetuned on four alpaca records until it
memorises them answers each of them verbatim in `python -m qwen15_exp.chat` (greedy), and phase=eval on those
records reports a perplexity near 1. Generation ends at <|im_end|> and what the terminal shows is the answer
the transcript records. With LoRA, chat on the base plus the run's adapters answers exactly as the merged
checkpoint does.

Not asserted: LoRA memorising the records. On this tiny random model the adapters barely lower the loss
(near 5 after 200 steps with adapters alone, above 2 after 300 steps with the embedding and norms trainable
too): its tied embedding is frozen, so the logits' scale cannot grow. A real pretrained base has that scale.
"""
import json
from pathlib import Path

import pytest

from conftest import read_json, run_cli
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
                 "chat.max_new_tokens=48", *overrides], tmp_path / name, module="qwen15_exp.chat")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    transcript = next((tmp_path / name / "outputs").rglob("transcript.jsonl"))
    return [json.loads(line) for line in transcript.read_text().splitlines()], r.stdout


@pytest.mark.slow
def test_a_finetuned_model_answers_its_records_verbatim_and_lora_adapters_chat_as_merged(tmp_path):
    records = json.loads(Path(sample_path("alpaca_sample.json")).read_text())
    four, rest = tmp_path / "four.json", tmp_path / "rest.json"
    four.write_text(json.dumps(records[:4], ensure_ascii=False))
    rest.write_text(json.dumps(records[4:], ensure_ascii=False))
    questions = [alpaca_user_turn(r["instruction"], r.get("input")) for r in records[:4]]
    answers = [r["output"] for r in records[:4]]

    # the base: the initialised model, saved (one step at a negligible learning rate; Adam's first steps move
    # every weight by about the learning rate, which leaves a worse start than the initialisation)
    base = newest_checkpoint(train(tmp_path, "base", rest, ["phase.max_steps=1", "phase.lr_schedule.learning_rate=1e-9"]))
    full = train(tmp_path, "full", four, [f"phase.load_checkpoint={base}", "phase.max_steps=400",
                                          "phase.lr_schedule.learning_rate=2e-2"])
    assert read_json(full / "result.json")["measured"]["last_loss"] < 0.1
    lora = train(tmp_path, "lora", four, ["phase=lora", f"phase.load_checkpoint={base}", "phase.max_steps=60",
                                          "phase.lora.dropout=0", "phase.lr_schedule.learning_rate=2e-2"])
    lora_loss = read_json(lora / "result.json")["measured"]["loss"]
    assert sum(lora_loss[-4:]) / 4 < sum(lora_loss[:4]) / 4 - 0.01           # the same four rows, 15 epochs later

    # full weights, each question on its own: the answers come back verbatim, and they are what was shown
    turns, shown = chat(tmp_path, "chat_full", questions, [f"phase.load_checkpoint={newest_checkpoint(full)}"], False)
    assert [t["answer"] for t in turns] == answers
    assert all(t["ended_by"] == "<|im_end|>" for t in turns)
    assert all(a in shown for a in answers)
    # LoRA: the base checkpoint plus the run's adapters (merged on load) answers as the merged checkpoint does
    merged = tmp_path / "merged.safetensors"
    r = run_cli(["direction=lora_merge", f"input={lora}", f"output={merged}", "progress=false"], tmp_path,
                module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr
    with_adapter, _ = chat(tmp_path, "chat_lora", questions[:2], [f"phase.load_checkpoint={base}",
                                                                  f"phase.adapter={lora}"], False)
    from_merged, _ = chat(tmp_path, "chat_merged", questions[:2], [f"phase.load_checkpoint={merged}"], False)
    assert [(t["answer"], t["ended_by"]) for t in with_adapter] == [(t["answer"], t["ended_by"]) for t in from_merged]
    # with history the prompt is one the model never saw; whatever it answers, generation stopped at the end of
    # the answer and the terminal showed exactly that answer (or said that there was none)
    turns, shown = chat(tmp_path, "chat_history", questions[:2], [f"phase.load_checkpoint={newest_checkpoint(full)}"],
                        True, seq_length=256)           # room for the first turn in the second prompt
    assert turns[1]["history_turns"] == 1 and turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"]
    for t in turns:
        assert t["ended_by"] in ("<|im_end|>", "<|im_start|>", "max_new_tokens=48")
        assert (t["answer"] in shown) if t["answer"] else ("(no answer: the model's first token was" in shown)
    # phase=eval on the same records: perplexity near 1
    r = run_cli([*SHORT, f"data.input={four}", "phase=eval", f"phase.load_checkpoint={newest_checkpoint(full)}"],
                tmp_path / "eval")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = read_json(next((tmp_path / "eval" / "outputs").rglob("result.json")))["measured"]
    assert 1.0 <= m["perplexity"] < 1.1, m
