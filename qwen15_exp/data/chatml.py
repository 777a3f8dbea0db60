"""ChatML, in one place: the template, chat prompts and stop handling, and conversations -> training rows.

Template: `<|im_start|>{role}\n{content}<|im_end|>`, turns joined by newlines, a reply opened with
`<|im_start|>assistant\n` and ended at <|im_end|> (or a new <|im_start|>). Chat, predict and data
preparation all render it through `turn`.

Training rows (default = the seed's `qwen1_5_preprocess.py --dataset_type qa`) = the seed's `qwen1_5_preprocess.py --dataset_type qa`: each message rendered as
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, tokenized, cut or right-padded with <|endoftext|> (151643)
to seq_length+1, labels = input_ids with every pad set to -100. Options:
- mask_prompt: labels only on assistant answers (content + <|im_end|>), -100 elsewhere;
- pack: several conversations per row; the first token of each packed conversation gets label -100 so
  no loss crosses a boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from qwen15_exp.data.tokenizer import ENDOFTEXT, IM_END, IM_END_ID, IM_START, IM_START_ID, PAD_ID

IGNORE = -100
ASSISTANT_OPENER = f"{IM_START}assistant\n"
STOP_IDS = {IM_END_ID: IM_END, IM_START_ID: IM_START}     # a reply ends at either


# Qwen1.5-*-Chat's tokenizer_config.json template (Jinja, as transformers' apply_chat_template reads it): a
# default system turn when the conversation has none, each turn as `turn` renders it, then the opener
DEFAULT_SYSTEM = "You are a helpful assistant."
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}"


def eos_token(chat: bool) -> str:
    """The token that ends a reply: <|im_end|> in the chat template, <|endoftext|> for plain text."""
    return IM_END if chat else ENDOFTEXT


def chat_prompt(system: str, query: str) -> str:
    """A single-turn chat prompt, ready for the model to write the answer."""
    return f"{turn('system', system)}\n{turn('user', query)}\n{ASSISTANT_OPENER}"


def make_context(tokenizer, query: str, history: list[tuple[str, str]], system: str,
                 max_window_size: int) -> list[int]:
    """Prompt ids as the seed's make_context builds them: system, as many recent history turns as fit
    in max_window_size (newest kept first), the query, the assistant opener."""
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    system_ids = ids(turn("system", system))
    tail = ids("\n" + turn("user", query) + "\n" + ASSISTANT_OPENER)
    context: list[int] = []
    for q, a in reversed(history):
        pair = ids("\n" + turn("user", q) + "\n" + turn("assistant", a))
        if len(system_ids) + len(pair) + len(context) + len(tail) > max_window_size:
            break
        context = pair + context
    return system_ids + context + tail


def cut_at_stop(new_ids: list[int]) -> list[int]:
    """A reply's ids up to (not including) <|im_end|> or a new <|im_start|>."""
    for i, t in enumerate(new_ids):
        if t in STOP_IDS:
            return new_ids[:i]
    return new_ids


def chatml_text(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Messages as Qwen1.5-*-Chat's template renders them (HF_CHAT_TEMPLATE: a default system turn when there is
    none). Without the generation prompt the last message stays open, to be continued (transformers'
    continue_final_message, as lm-eval asks for an assistant prefill)."""
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    text = "".join(turn(m["role"], m["content"]) + "\n" for m in messages)
    if add_generation_prompt:
        return text + ASSISTANT_OPENER
    return text[:-len(IM_END + "\n")]


def render_chatml(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The ChatML text and the character spans of assistant answers (content + <|im_end|>)."""
    parts, answer_spans, pos = [], [], 0
    for m in messages:
        piece = turn(m["role"], m["content"]) + "\n"
        if m["role"] == "assistant":
            head = len(f"{IM_START}{m['role']}\n")
            answer_spans.append((pos + head, pos + len(piece) - 1))      # content + <|im_end|>
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), answer_spans


def answer_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """True for tokens that start inside an answer span."""
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    return mask


@dataclass
class RowStats:
    conversations: int = 0
    rows: int = 0
    tokens: int = 0            # real (non-pad) tokens written
    truncated: int = 0         # conversations cut at seq_length+1
    padding: int = 0           # pad positions written
    trained: int = 0           # positions with a label other than -100
    positions: int = 0

    @property
    def padding_fraction(self) -> float:
        return self.padding / self.positions if self.positions else 0.0


def tokenize_conversations(tokenizer, conversations: Iterable[list[dict]], mask_prompt: bool,
                           batch: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) per conversation, unpadded; tokenizes in batches (the Rust tokenizer is parallel)."""
    buf: list[tuple[str, list]] = []

    def flush():
        texts = [t for t, _ in buf]
        # offsets are only needed to find the answers; the fast path skips computing them
        encs = (tokenizer.encode_batch(texts, add_special_tokens=False) if mask_prompt
                else tokenizer.encode_batch_fast(texts, add_special_tokens=False))
        for enc, (_, spans) in zip(encs, buf):
            ids = np.asarray(enc.ids, dtype=np.int32)
            if mask_prompt:
                labels = np.where(answer_mask(enc.offsets, spans), ids, IGNORE).astype(np.int32)
            else:
                labels = ids.copy()
            yield ids, labels
        buf.clear()

    for msgs in conversations:
        buf.append(render_chatml(msgs))
        if len(buf) >= batch:
            yield from flush()
    if buf:
        yield from flush()


def _finish_row(ids: np.ndarray, labels: np.ndarray, width: int, stats: RowStats) -> dict:
    n = len(ids)
    row_ids = np.full(width, PAD_ID, dtype=np.int32)
    row_labels = np.full(width, IGNORE, dtype=np.int32)
    row_ids[:n] = ids
    row_labels[:n] = labels
    row_labels[row_ids == PAD_ID] = IGNORE     # the recipe's rule: every <|endoftext|> is ignored
    stats.rows += 1
    stats.tokens += n
    stats.padding += width - n
    stats.positions += width
    stats.trained += int((row_labels[1:] != IGNORE).sum())
    return {"input_ids": row_ids, "labels": row_labels}


def rows_from_tokens(tokenized: Iterable[tuple[np.ndarray, np.ndarray]], seq_length: int, pack: bool,
                     stats: RowStats) -> Iterator[dict]:
    """Rows of seq_length+1 tokens: one conversation each, or greedily packed."""
    width = seq_length + 1
    cur_ids: list[np.ndarray] = []
    cur_labels: list[np.ndarray] = []
    used = 0
    for ids, labels in tokenized:
        stats.conversations += 1
        if len(ids) > width:
            stats.truncated += 1
            ids, labels = ids[:width], labels[:width]
        if not pack:
            yield _finish_row(ids, labels, width, stats)
            continue
        if used + len(ids) > width and cur_ids:
            yield _finish_row(np.concatenate(cur_ids), np.concatenate(cur_labels), width, stats)
            cur_ids, cur_labels, used = [], [], 0
        if cur_ids:                       # no loss across the boundary into this conversation
            labels = labels.copy()
            labels[0] = IGNORE
        cur_ids.append(ids)
        cur_labels.append(labels)
        used += len(ids)
    if cur_ids:
        yield _finish_row(np.concatenate(cur_ids), np.concatenate(cur_labels), width, stats)
