"""Data preparation: alpaca -> ChatML -> MindRecord rows, Wikitext windows, caching, bad input."""
import os
import json
from pathlib import Path

import numpy as np
import pytest

from qwen15_exp.data import alpaca, chatml, wiki
from qwen15_exp.data.cache import prepare
from qwen15_exp.data.tokenizer import IM_END_ID, IM_START_ID, PAD_ID, load_bulk_encoder, load_tokenizer
from qwen15_exp.errors import UserError
from qwen15_exp.schema import DataConfig

IGNORE = -100


def data_cfg(tmp_path, fmt, input_path, seq=32, **kw):
    return DataConfig(name=fmt, format=fmt, input=str(input_path), seq_length=seq, cache_dir=str(tmp_path / "cache"),
                      **kw)


def read_rows(folder):
    import mindspore.dataset as ds
    files = sorted(str(p) for p in Path(folder).glob("train.mindrecord*") if not p.name.endswith(".db"))
    return list(ds.MindDataset(files, shuffle=False).create_dict_iterator(output_numpy=True))


def write_alpaca(tmp_path, records, name="a.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records, ensure_ascii=False))
    return p


# ---- alpaca -> ChatML: the seed converter's rules -------------------------------------------------------

def test_alpaca_user_turn_rules():
    assert alpaca.alpaca_user_turn("Say hi.", "") == "Say hi."
    assert alpaca.alpaca_user_turn("Translate this.", "bonjour") == "Translate this: bonjour"
    assert alpaca.alpaca_user_turn("Translate..", "x") == "Translate.: x"       # only one '.' dropped
    msgs = alpaca.alpaca_to_messages({"instruction": "Q", "input": "", "output": "A"})
    assert msgs == [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_converter_writes_chatml_jsonl(tmp_path):
    src = write_alpaca(tmp_path, [{"instruction": "Q", "input": "", "output": "A"}])
    n = alpaca.write_chatml_jsonl(alpaca.iter_alpaca(src), tmp_path / "out.jsonl")
    line = json.loads((tmp_path / "out.jsonl").read_text())
    assert n == 1 and line["type"] == "chatml" and line["messages"][2] == {"role": "assistant", "content": "A"}


# ---- exact rows --------------------------------------------------------------------------------------

CONV = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]


def test_render_chatml_is_the_qwen15_template():
    text, spans = chatml.render_chatml(CONV)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert [text[a:b] for a, b in spans] == ["Hello!<|im_end|>"]


def test_exact_ids_and_labels_of_a_known_conversation():
    tok = load_tokenizer()
    stats = chatml.RowStats()
    rows = list(chatml.rows_from_tokens(chatml.tokenize_conversations(tok, [CONV], mask_prompt=False), 40, False,
                                        stats))
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    # <|im_start|> system \n You are a helpful assistant . <|im_end|> \n <|im_start|> user \n Hi <|im_end|> \n
    # <|im_start|> assistant \n Hello ! <|im_end|> \n, then <|endoftext|> padding to 41
    expected = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 13048,
                151645, 198, 151644, 77091, 198, 9707, 0, 151645, 198]
    assert ids.dtype == np.int32 and len(ids) == 41
    assert ids[:24].tolist() == expected and (ids[24:] == PAD_ID).all()
    assert labels[:24].tolist() == expected and (labels[24:] == IGNORE).all()
    assert (stats.rows, stats.tokens, stats.padding, stats.truncated) == (1, 24, 17, 0)


def test_prompt_masking_trains_on_answers_only():
    tok = load_tokenizer()
    rows = list(chatml.rows_from_tokens(chatml.tokenize_conversations(tok, [CONV], mask_prompt=True), 40, False,
                                        chatml.RowStats()))
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    trained = [int(i) for i, l in zip(ids, labels) if l != IGNORE]
    assert trained == [9707, 0, IM_END_ID]               # "Hello" "!" <|im_end|>
    assert (labels[ids == IM_START_ID] == IGNORE).all()


def test_packing_fills_rows_and_masks_boundaries():
    tok = load_tokenizer()
    convs = [CONV] * 5                                   # 24 tokens each
    stats = chatml.RowStats()
    rows = list(chatml.rows_from_tokens(chatml.tokenize_conversations(tok, convs, mask_prompt=False), 63, True,
                                        stats))
    assert len(rows) == 3 and stats.conversations == 5   # 2 + 2 + 1 conversations in rows of 64
    first = rows[0]
    assert first["input_ids"][24] == IM_START_ID and first["labels"][24] == IGNORE   # boundary: no loss
    assert first["labels"][0] == IM_START_ID                                          # a row's own start trains
    unpacked = chatml.RowStats()
    list(chatml.rows_from_tokens(chatml.tokenize_conversations(tok, convs, False), 63, False, unpacked))
    assert stats.padding_fraction < unpacked.padding_fraction
    assert unpacked.rows == 5


def test_long_conversation_is_truncated_and_counted(tmp_path):
    src = write_alpaca(tmp_path, [{"instruction": "Tell a long story", "input": "", "output": "word " * 200},
                                  {"instruction": "Q", "input": "", "output": "A"}])
    prepared = prepare(data_cfg(tmp_path, "alpaca", src, seq=32), 32, show_progress=False)
    assert prepared.summary["truncated"] == 1 and prepared.rows == 2
    rows = read_rows(prepared.folder)
    assert all(len(r["input_ids"]) == 33 for r in rows)
    assert (rows[0]["input_ids"] != PAD_ID).all()


# ---- wiki --------------------------------------------------------------------------------------------

WIKI = (" = Valkyria Chronicles = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing "
        "game . \n \n = = Gameplay = = \n \n The game has 1 @,@ 000 maps ( large ones ) . \n \n"
        " = Tower Building = \n \n The tower is 20 @.@ 5 m tall . \n \n")


def test_clean_wikitext_undoes_the_tokenisation():
    assert wiki.clean_wikitext(" role @-@ playing game . ") == " role-playing game. "
    assert wiki.clean_wikitext("1 @,@ 000 ( large ones )") == "1,000 (large ones)"
    assert wiki.clean_wikitext("= = Gameplay = =") == "== Gameplay =="


def test_wiki_windows_are_the_concatenated_paragraphs(tmp_path):
    src = tmp_path / "wiki.train.tokens"
    src.write_text(WIKI)
    tok = load_tokenizer()
    paragraphs = [p for p in wiki.clean_wikitext(WIKI).split("\n\n") if p and not p.strip().startswith("=")]
    assert len(paragraphs) == 3                            # three headings dropped
    stream = [i for p in paragraphs for i in tok.encode(p, add_special_tokens=False).ids]
    prepared = prepare(data_cfg(tmp_path, "wiki", src, seq=7), 7, show_progress=False)
    rows = [r["input_ids"].tolist() for r in read_rows(prepared.folder)]
    assert len(rows) == len(stream) // 8
    assert sum(rows, []) == stream[: len(rows) * 8]
    assert prepared.summary["columns"] == ["input_ids"] and prepared.summary["articles"] == 2


def test_wiki_eod_between_articles(tmp_path):
    src = tmp_path / "w.txt"
    src.write_text(WIKI)
    stats = wiki.WikiStats()
    ids = np.concatenate([wiki.encode_items(items, load_bulk_encoder()) for items in wiki.cleaned_blocks(src, True, 1, stats)])
    assert (ids == PAD_ID).sum() == 1                     # one boundary between the two articles


def test_wiki_repeat_and_bounded_blocks(tmp_path):
    src = tmp_path / "w.txt"
    src.write_text(WIKI * 50)
    blocks = list(wiki.read_blocks(src, block_chars=500))
    assert len(blocks) > 5 and "".join(blocks) == WIKI * 50
    once = prepare(data_cfg(tmp_path, "wiki", src, seq=15), 15, show_progress=False).rows
    twice = prepare(data_cfg(tmp_path, "wiki", src, seq=15, repeat=2), 15, show_progress=False).rows
    assert twice in (2 * once, 2 * once + 1)



def test_the_worker_processes_give_what_encoding_here_gives(tmp_path):
    # small blocks, so that the two workers share them and an article starts at a block's head: the
    # <|endoftext|> between articles must land as it does in one process, in the same order, with the counts
    src = tmp_path / "w.txt"
    src.write_text(WIKI * 40)
    here, there = wiki.WikiStats(), wiki.WikiStats()
    expected = [wiki.encode_items(items, load_bulk_encoder())
                for _ in range(2) for items in (wiki.paragraphs(b, here, True) for b in wiki.read_blocks(src, 300))]
    with wiki.EncodingAhead(src, True, 2, there, workers=2, fork=True, block_chars=300) as id_blocks:
        got = list(id_blocks)
    assert len(got) == len(expected) > 4
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert (there.paragraphs, there.articles) == (here.paragraphs, here.articles) != (0, 0)
    assert (np.concatenate(got) == PAD_ID).sum() == 2 * 2 * 40 - 1      # every article start but the first
    assert not any(c.is_alive() for c in id_blocks.children)
    # without forking (MindSpore already in the process): the same ids, all in this process
    alone = wiki.WikiStats()
    with wiki.EncodingAhead(src, True, 2, alone, fork=False, block_chars=300) as id_blocks:
        assert id_blocks.children == []
        here_blocks = list(id_blocks)
    assert len(here_blocks) == len(expected) and all(np.array_equal(a, b) for a, b in zip(here_blocks, expected))
    assert (alone.paragraphs, alone.articles) == (here.paragraphs, here.articles)


def test_an_encoding_error_reaches_the_caller_and_the_workers_end(tmp_path):
    src = tmp_path / "w.txt"
    src.write_bytes(b" = T = \n \n caf\xe9 \n")
    with pytest.raises(UserError, match="not UTF-8"):
        with wiki.EncodingAhead(src, False, 1, wiki.WikiStats(), fork=True) as id_blocks:
            list(id_blocks)
    assert id_blocks.children and not any(c.is_alive() for c in id_blocks.children)


def test_the_worker_processes_end_when_their_parent_is_killed(tmp_path):
    # a parent that starts the encoding of a large file and never reads it, killed with SIGKILL: its worker
    # processes, blocked on full queues, notice and exit by themselves instead of living on as orphans
    import os
    import signal
    import subprocess
    import sys
    import time
    src = tmp_path / "w.txt"
    src.write_text(WIKI * 20000)                                   # ~20 MB: many blocks, the queue fills
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from qwen15_exp.data import wiki\n"
        f"c = wiki.EncodingAhead(Path({str(src)!r}), False, 1, wiki.WikiStats(), depth=1)\n"
        "print(*[p.pid for p in c.children], flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    children = [int(pid) for pid in parent.stdout.readline().split()]
    time.sleep(3.0)                                  # the workers load the encoder and fill their queues
    assert children and all(os.path.exists(f"/proc/{pid}") for pid in children)
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def running(pid):                                # exited and not yet reaped (a zombie) counts as ended
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 15
    while any(map(running, children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(running, children)), f"workers {children} still running after their parent was killed"


# ---- caching and atomicity --------------------------------------------------------------------------

def test_cache_reuse_and_invalidation(tmp_path):
    src = write_alpaca(tmp_path, [{"instruction": "Q", "input": "", "output": "A"}] * 3)
    first = prepare(data_cfg(tmp_path, "alpaca", src), 32, show_progress=False)
    again = prepare(data_cfg(tmp_path, "alpaca", src), 32, show_progress=False)
    assert not first.reused and again.reused and again.folder == first.folder
    assert prepare(data_cfg(tmp_path, "alpaca", src), 64, show_progress=False).folder != first.folder
    assert prepare(data_cfg(tmp_path, "alpaca", src, mask_prompt=True), 32, show_progress=False).folder != first.folder
    src.write_text(json.dumps([{"instruction": "Q2", "input": "", "output": "A"}]))
    assert not prepare(data_cfg(tmp_path, "alpaca", src), 32, show_progress=False).reused


def test_an_interrupted_prepare_leaves_nothing_a_later_run_would_take(tmp_path, monkeypatch):
    src = write_alpaca(tmp_path, [{"instruction": "Q", "input": "", "output": "A"}] * 3)
    from qwen15_exp.data import mindrecord

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(mindrecord, "write_rows", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(data_cfg(tmp_path, "alpaca", src), 32, show_progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert not prepare(data_cfg(tmp_path, "alpaca", src), 32, show_progress=False).reused


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,needle", [
    (b'[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "line 2"),
    (b'[{"instruction": "a"}]', "record 0 has no 'output'"),
    (b'[{"instruction": "  ", "input": "", "output": "b"}]', "empty instruction"),
    (b'[{"instruction": "caf\xe9", "output": "b"}]', "not UTF-8"),
    (b"", "is empty"),
    (b'[{"instruction": 3, "output": "b"}]', "'instruction' must be a string"),
    (b'[1, 2]', "record 0 is a int"),
])
def test_bad_alpaca_input(tmp_path, content, needle):
    src = tmp_path / "bad.json"
    src.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        prepare(data_cfg(tmp_path, "alpaca", src), 32, show_progress=False)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_bad_chatml_lines_name_the_line(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": oops}\n')
    with pytest.raises(UserError, match="line 2"):
        prepare(data_cfg(tmp_path, "chatml", src), 32, show_progress=False)


def test_missing_input(tmp_path):
    with pytest.raises(UserError, match="not found"):
        prepare(data_cfg(tmp_path, "alpaca", tmp_path / "nope.json"), 32, show_progress=False)


def test_sharded_output(tmp_path):
    src = write_alpaca(tmp_path, [{"instruction": f"Q{i}", "input": "", "output": "A"} for i in range(10)])
    prepared = prepare(data_cfg(tmp_path, "alpaca", src, file_partition=2), 32, show_progress=False)
    assert [f.name for f in prepared.files] == ["train.mindrecord0", "train.mindrecord1"]
    assert len(read_rows(prepared.folder)) == 10


def test_prepare_command_writes_chatml_and_mindrecord(tmp_path):
    from helpers import run_cli
    src = write_alpaca(tmp_path, [{"instruction": "Q", "input": "x", "output": "A"}] * 4)
    r = run_cli(["data=alpaca", f"data.input={src}", "data.seq_length=64", f"output={tmp_path / 'mr'}",
                 f"chatml_output={tmp_path / 'conv.jsonl'}"], tmp_path, module="qwen15_exp.prepare")
    assert r.returncode == 0, r.stderr
    assert "4 rows of 65 tokens" in r.stdout and (tmp_path / "mr" / "train.mindrecord").is_file()
    assert json.loads((tmp_path / "conv.jsonl").read_text().splitlines()[0])["messages"][1]["content"] == "Q: x"
    r = run_cli(["data=wiki"], tmp_path, module="qwen15_exp.prepare")
    assert r.returncode == 2 and "data.input is required" in r.stderr and "Traceback" not in r.stderr


def test_a_killed_writer_leaves_no_temp_folder_behind(tmp_path):
    """A writer killed outright (the OOM killer) cannot clean up: the next writer of the same folder removes
    its temp folder (the dead pid is in its name) and leaves a live writer's alone."""
    import subprocess
    import sys
    from qwen15_exp.atomic import atomic_dir
    target = tmp_path / "data-abc"
    code = ("import os, sys; from qwen15_exp.atomic import atomic_dir\n"
            f"with atomic_dir({str(target)!r}) as tmp:\n    (tmp / 'part').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert len(list(tmp_path.glob(".data-abc.*.tmp"))) == 1                 # left by the killed writer
    live = tmp_path / f".data-abc.{os.getpid()}.x.tmp"
    live.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "done").write_text("ok")
    assert (target / "done").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data-abc", live.name])


def test_a_record_too_large_to_be_a_training_row_is_refused(tmp_path, monkeypatch):
    """A record far longer than any row keeps (a 1 GB one was OOM-killed while tokenized) is refused with its
    index and size (the bound lowered here to keep the test small)."""
    from qwen15_exp.data import alpaca as alpaca_module
    monkeypatch.setattr(alpaca_module, "MAX_RECORD_CHARS", 1000)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"instruction": "hi", "input": "", "output": "ok"},
                                {"instruction": "long", "input": "", "output": "x" * 5000}]))
    with pytest.raises(UserError, match=r"record 1 holds 5,004 characters; a record above 1,000"):
        list(alpaca.iter_alpaca(path))
