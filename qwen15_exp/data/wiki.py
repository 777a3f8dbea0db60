"""Wikitext -> windows of seq_length+1 token ids, as the seed's `qwen1_5_preprocess.py --dataset_type wiki`.

The seed reads the whole file, undoes the WikiText tokenisation (clean_wikitext), drops empty and heading
paragraphs, concatenates every paragraph's ids with no separator, repeats the stream `repeat` times and
cuts non-overlapping windows of seq_length+1, dropping the last partial one. Here the same happens in
blocks of about 4 MB that end on a blank line, so memory stays bounded whatever the input size; the only
difference is that a quote or bracket pair is never matched across two blocks. `eod_between_docs` puts
<|endoftext|> before each new article (a level-1 heading ` = Title = `).
"""
from __future__ import annotations

import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from qwen15_exp.data.tokenizer import PAD_ID
from qwen15_exp.errors import UserError

BLOCK_CHARS = 4 << 20
_ARTICLE_HEADING = re.compile(r"^= [^=].* =$")


def clean_wikitext(string: str) -> str:
    """The seed's clean_wikitext, rule for rule."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


@dataclass
class WikiStats:
    paragraphs: int = 0
    articles: int = 0
    rows: int = 0
    tokens: int = 0            # tokens written into windows
    dropped_tail: int = 0      # tokens of the last partial window
    padding: int = 0
    positions: int = 0
    truncated: int = 0

    @property
    def padding_fraction(self) -> float:
        return 0.0


def read_blocks(path: Path, block_chars: int = BLOCK_CHARS) -> Iterator[str]:
    """Blocks of whole lines, each ending at a blank line once it is past block_chars."""
    buf, size = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= block_chars and not line.strip():
                    yield "".join(buf)
                    buf, size = [], 0
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start} of a block); "
                        "re-encode the file as UTF-8") from None
    if buf:
        yield "".join(buf)


def paragraphs(block: str, stats: WikiStats, eod_between_docs: bool) -> Iterator[str | None]:
    """Kept paragraphs of a block; None marks an article boundary (when eod_between_docs)."""
    for para in clean_wikitext(block).split("\n\n"):
        if not para:
            continue
        if para.strip().startswith("="):
            if _ARTICLE_HEADING.match(para.strip()):
                stats.articles += 1
                if eod_between_docs and stats.paragraphs:
                    yield None
            continue
        stats.paragraphs += 1
        yield para


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """Run a generator in a thread, `depth` items ahead: cleaning (Python) overlaps encoding (Rust, no GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as e:       # re-raised in the consumer, with its message
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def token_stream(path: Path, tokenizer, eod_between_docs: bool, repeat: int, stats: WikiStats,
                 batch: int = 2048) -> Iterator[np.ndarray]:
    def cleaned_blocks():
        for _ in range(repeat):
            for block in read_blocks(path):
                yield list(paragraphs(block, stats, eod_between_docs))

    for pending in prefetched(cleaned_blocks()):
        for i in range(0, len(pending), batch):
            chunk = pending[i:i + batch]
            encoded = iter(tokenizer.encode_batch_fast([p for p in chunk if p is not None],
                                                       add_special_tokens=False))
            for p in chunk:
                if p is None:
                    yield np.array([PAD_ID], dtype=np.int32)
                else:
                    yield np.asarray(next(encoded).ids, dtype=np.int32)


def rows_from_file(path: Path, tokenizer, seq_length: int, eod_between_docs: bool, repeat: int,
                   stats: WikiStats) -> Iterator[dict]:
    width = seq_length + 1
    carry = np.zeros(0, dtype=np.int32)
    for ids in token_stream(path, tokenizer, eod_between_docs, repeat, stats):
        carry = np.concatenate([carry, ids]) if len(carry) else ids
        n_full = len(carry) // width
        for k in range(n_full):
            stats.rows += 1
            stats.tokens += width
            stats.positions += width
            yield {"input_ids": carry[k * width:(k + 1) * width]}
        carry = carry[n_full * width:]
    stats.dropped_tail = int(len(carry))
