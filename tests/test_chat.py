"""Chat mechanics (ChatML context, history, /clear, stop tokens, streaming) and real CPU generation."""
import io
import json

import pytest

from qwen15_exp.chat import ChatSession, interactive
from qwen15_exp.data.chatml import cut_at_stop, make_context
from qwen15_exp.data.tokenizer import IM_END_ID, IM_START_ID, load_tokenizer
from helpers import only_run_dir, read_json, run_cli

TOK = load_tokenizer()


def test_context_is_the_seed_make_context():
    ids = make_context(TOK, "Hi", [("Q1", "A1")], "You are a helpful assistant.", 1000)
    assert TOK.decode(ids, skip_special_tokens=False) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ1"
                               "<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                               "<|im_start|>assistant\n")


def test_old_history_is_dropped_when_the_window_is_full():
    history = [(f"question {i}", "answer " * 20) for i in range(10)]
    ids = make_context(TOK, "now", history, "sys", 120)
    text = TOK.decode(ids)
    assert len(ids) <= 120 and "question 9" in text and "question 0" not in text


def test_cut_at_stop():
    assert cut_at_stop([1, 2, IM_END_ID, 3]) == [1, 2] and cut_at_stop([5, IM_START_ID]) == [5]


class ScriptedGenerator:
    """Emits a fixed answer then <|im_end|> and more tokens, as a model would; records prompts."""
    seq_length = 512

    def __init__(self):
        self.prompts = []

    def generate_batch(self, prompts, max_new_tokens, on_token=None, **kw):
        from qwen15_exp.launch.generate import Generated
        self.prompts.extend(prompts)
        self.batches = getattr(self, "batches", []) + [len(prompts)]
        new = TOK.encode("Hello there 你好", add_special_tokens=False).ids + [IM_END_ID, 872, 198]
        for t in new if on_token else []:
            on_token(t)
        return Generated([list(new) for _ in prompts], 0.5, 0.1)


def test_interactive_session_keeps_history_clears_and_stops():
    gen, out = ScriptedGenerator(), io.StringIO()
    session = ChatSession(gen, TOK, "You are a helpful assistant.", 32, out=out)
    interactive(session, io.StringIO("first\nsecond\n/clear\nthird\n/exit\nnever\n"))
    assert len(gen.prompts) == 3
    assert len(gen.prompts[1]) > len(gen.prompts[0])                   # history kept
    assert gen.prompts[2] == make_context(TOK, "third", [], "You are a helpful assistant.", 479)   # cleared
    text = out.getvalue()
    assert text.count("Hello there 你好\n") == 3 and "user\n" not in text.split("assistant> ")[1]   # cut at im_end
    assert "history cleared" in text and session.history == [("third", "Hello there 你好")]
    # each answer's speed: 7 new tokens in 0.5 s, the first after 0.1 s: 6 more in 0.4 s
    assert text.count("0.50 s: first token 0.10 s, 15.0 tokens/s]") == 3


def test_questions_without_history_go_as_batches(tmp_path):
    from qwen15_exp.chat import ask_batch
    gen, out = ScriptedGenerator(), io.StringIO()
    session = ChatSession(gen, TOK, "You are a helpful assistant.", 32, keep_history=False, out=out,
                          transcript=tmp_path / "t.jsonl")
    assert ask_batch(session, ["one", "two", "three"]) == ["Hello there 你好"] * 3
    assert gen.batches == [3] and gen.prompts[1] == make_context(TOK, "two", [], "You are a helpful assistant.", 479)
    text = out.getvalue()
    assert text.count("assistant> Hello there 你好\n") == 3 and "[batch of 3: 21 tokens in 0.50 s" in text
    turns = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [t["query"] for t in turns] == ["one", "two", "three"] and all(t["batch"] == 3 for t in turns)
    assert turns[0]["ended_by"] == "<|im_end|>"


def assert_quiet(r):
    """MindFormers' and MindSpore's log stay in the run's files, off the terminal."""
    terminal = r.stdout + r.stderr
    assert " - mindformers" not in terminal and "[WARNING]" not in terminal and "INFO" not in terminal, terminal


@pytest.mark.slow
def test_chat_batch_and_predict_run_on_cpu(tmp_path):
    r = run_cli(["chat.mode=batch", "chat.questions=[hello,'你好']", "chat.seed=0"], tmp_path, module="qwen15_exp.chat")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("user> ") == 2 and "history 1 turns" in r.stdout
    assert_quiet(r)
    (tmp_path / "p").mkdir()
    r = run_cli(["phase=predict", "phase.predict_data=[hello world]"], tmp_path / "p")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_quiet(r)
    assert r.stdout.startswith("qwen15_exp  ")    # the summary is all the terminal shows
    result = read_json(only_run_dir(tmp_path / "p") / "result.json")
    assert result["status"] == "ok" and len(result["generated"]) == 1
    assert result["measured"]["generated_tokens"] > 0 and result["measured"]["tokens_per_s"] > 0


def test_chat_generation_ends_where_a_reply_ends():
    """In the chat template generation stops at <|im_end|> and at a new <|im_start|> (what cut_at_stop cuts),
    whatever phase.generation.eos_token_id lists; plain predict keeps its eos ids."""
    from helpers import make_experiment
    from qwen15_exp.launch.generate import generation_kwargs
    chat = generation_kwargs(make_experiment(["phase=chat", "phase.generation.eos_token_id=[151643]"]))
    assert chat["eos_token_id"] == [151643, 151645, 151644]
    assert generation_kwargs(make_experiment(["phase=predict"]))["eos_token_id"] == [151643]
