"""alpaca -> ChatML conversations, exactly as the seed's alpaca_converter.py does it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from qwen15_exp.errors import UserError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def alpaca_user_turn(instruction: str, input_text: str | None) -> str:
    """instruction alone, or instruction (one trailing '.' dropped) + ': ' + input."""
    if not input_text:
        return instruction
    if instruction.endswith("."):
        instruction = instruction[:-1]
    return f"{instruction}: {input_text}"


def alpaca_to_messages(record: dict, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": alpaca_user_turn(record["instruction"], record.get("input"))},
        {"role": "assistant", "content": record["output"]},
    ]


# a row keeps at most seq_length tokens (32,768 in the longest recipe), a few characters each: a record of more
# than this many characters is a mistake, and tokenizing it whole would take gigabytes (a 1 GB record passed
# 6 GB and was OOM-killed)
MAX_RECORD_CHARS = 16 * 2**20


def check_record_size(chars: int, where: str) -> None:
    if chars > MAX_RECORD_CHARS:
        raise UserError(f"{where} holds {chars:,} characters; a record above {MAX_RECORD_CHARS:,} is refused "
                        "(a training row keeps at most seq_length tokens): split or drop it")


def check_alpaca_record(record, index: int, path: Path) -> None:
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise UserError(f"{where} is a {type(record).__name__}, expected an object with "
                        "instruction, input and output")
    for key in ("instruction", "output"):
        if key not in record:
            raise UserError(f"{where} has no '{key}' field; alpaca records need instruction, (input,) output")
        if not isinstance(record[key], str):
            raise UserError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
    check_record_size(sum(len(v) for v in (record["instruction"], record.get("input") or "", record["output"])),
                      where)
    if not record["instruction"].strip():
        raise UserError(f"{where} has an empty instruction; fix or drop that record")
    if record.get("input") is not None and not isinstance(record["input"], str):
        raise UserError(f"{where}: 'input' must be a string, got {type(record['input']).__name__}")


def read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"data file not found: {path}; set data.input to an existing file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 (byte {e.start}, line {line}); re-encode the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path} is empty; give a file with at least one record")
    return text


def iter_alpaca(path: str | Path, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> Iterator[list[dict]]:
    """Conversations from an alpaca JSON array (a JSON Lines file of records is accepted too)."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    else:
        records = list(_json_lines(path, text))
    for i, rec in enumerate(records):
        check_alpaca_record(rec, i, path)
        yield alpaca_to_messages(rec, system_prompt)


def _json_lines(path: Path, text: str) -> Iterator:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON on line {lineno}, column {e.colno}: {e.msg}") from None


def iter_chatml(path: str | Path) -> Iterator[list[dict]]:
    """Conversations from JSON Lines of {"messages": [{"role", "content"}, ...]} (alpaca_converter output)."""
    path = Path(path)
    for i, rec in enumerate(_json_lines(path, read_text(path))):
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{path}: record {i} has no 'messages' list")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise UserError(f"{path}: record {i}: every message needs string 'role' and 'content'")
        check_record_size(sum(len(m["content"]) for m in msgs), f"{path}: record {i}")
        yield msgs


def write_chatml_jsonl(conversations, out_path: str | Path) -> int:
    """The converter's output file: one {"type": "chatml", "messages": [...]} per line."""
    from qwen15_exp.atomic import atomic_path
    n = 0
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for msgs in conversations:
            f.write(json.dumps({"type": "chatml", "messages": msgs}, ensure_ascii=False) + "\n")
            n += 1
    return n
