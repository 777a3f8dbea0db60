"""Wikitext -> windows of seq_length+1 token ids, as the seed's `qwen1_5_preprocess.py --dataset_type wiki`.

The seed reads the whole file, undoes the WikiText tokenisation (clean_wikitext), drops empty and heading
paragraphs, concatenates every paragraph's ids with no separator, repeats the stream `repeat` times and
cuts non-overlapping windows of seq_length+1, dropping the last partial one. Here the same happens in
blocks of about 4 MB that end on a blank line, so memory stays bounded whatever the input size; the only
difference is that a quote or bracket pair is never matched across two blocks. `eod_between_docs` puts
<|endoftext|> before each new article (a level-1 heading ` = Title = `).
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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


def block_items(block: str, eod_between_docs: bool) -> tuple[int, list, int, int]:
    """A block's kept paragraphs, None at each article boundary after its first kept paragraph (when
    eod_between_docs), as (boundaries before that first paragraph, items, paragraphs, articles): whether
    the leading boundaries count depends on the blocks before (the seed puts none before the first paragraph
    of all)."""
    leading, items, kept, articles = 0, [], 0, 0
    for para in clean_wikitext(block).split("\n\n"):
        if not para:
            continue
        if para.strip().startswith("="):
            if _ARTICLE_HEADING.match(para.strip()):
                articles += 1
                if eod_between_docs:
                    if kept:
                        items.append(None)
                    else:
                        leading += 1
            continue
        kept += 1
        items.append(para)
    return leading, items, kept, articles


def paragraphs(block: str, stats: WikiStats, eod_between_docs: bool) -> list:
    """Kept paragraphs of a block; None marks an article boundary (when eod_between_docs)."""
    leading, items, kept, articles = block_items(block, eod_between_docs)
    boundaries = [None] * leading if stats.paragraphs else []
    stats.paragraphs, stats.articles = stats.paragraphs + kept, stats.articles + articles
    return boundaries + items


def encode_items(items: list, encoder) -> np.ndarray:
    """The ids of a block's items in order: each paragraph's, <|endoftext|> for a boundary."""
    encoded = iter(encoder.encode_batch([p for p in items if p is not None]))
    parts = [np.array([PAD_ID], dtype=np.int32) if p is None else np.asarray(next(encoded), dtype=np.int32)
             for p in items]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """Run a generator in a thread, `depth` items ahead."""
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


def cleaned_blocks(path: Path, eod_between_docs: bool, repeat: int, stats: WikiStats,
                   block_chars: int = BLOCK_CHARS) -> Iterator[list]:
    """Each block's kept paragraphs, in this process."""
    for _ in range(repeat):
        for block in read_blocks(path, block_chars):
            yield paragraphs(block, stats, eod_between_docs)


def _encode_in_child(path: str, eod_between_docs: bool, repeat: int, tokenizer_dir, block_chars: int,
                     worker: int, workers: int, out, parent: int) -> None:
    """Worker `worker` of `workers`: blocks worker, worker + workers, ... cleaned and encoded, each sent as
    ("block", leading boundaries, ids, paragraphs, articles); then ("done",), or ("error"|"crash", text)."""
    from qwen15_exp.lifecycle import set_parent_death_signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # an interrupt is the parent's to handle; it stops us
    set_parent_death_signal(signal.SIGKILL)           # the parent killed: nobody will read, end with it
    if os.getppid() != parent:                        # it died before the signal was armed
        os._exit(0)

    try:
        from qwen15_exp.data.tokenizer import load_bulk_encoder
        encoder = load_bulk_encoder(tokenizer_dir, threads=1)
        index = 0
        for _ in range(repeat):
            for block in read_blocks(Path(path), block_chars):
                if index % workers == worker:
                    leading, items, kept, articles = block_items(block, eod_between_docs)
                    out.put(("block", leading, encode_items(items, encoder), kept, articles))
                index += 1
        out.put(("done",))
    except UserError as e:
        out.put(("error", str(e)))
    except BaseException as e:                        # a bug: its type and text, raised again in the parent
        out.put(("crash", f"{type(e).__name__}: {e}"))


class EncodingAhead:
    """The ids of each block of a Wikitext file, in order: read, cleaned (clean_wikitext), split into
    paragraphs and encoded by one forked worker process per core, each taking every n-th block.

    Why processes: the seed's cleaning is Python string work that holds the GIL for a whole 4 MB block, and
    an encoder called from threads needs the GIL between every paragraph, so in one process the two take
    turns (50 MB on 2 cores: 8 s where the encoding alone takes 3). Started first, the workers clean and
    encode while this process imports MindSpore for the writer. Forked only while no MindSpore runtime (its
    threads) is in this process; otherwise everything runs here, the cleaning in a thread. A worker stops
    with the stream, and by itself when this process is gone."""

    def __init__(self, path: Path, eod_between_docs: bool, repeat: int, stats: WikiStats,
                 tokenizer_dir: str | None = None, workers: int | None = None, depth: int = 2,
                 fork: bool | None = None, block_chars: int = BLOCK_CHARS):
        self.path, self.eod, self.repeat, self.stats = path, eod_between_docs, repeat, stats
        self.tokenizer_dir, self.block_chars = tokenizer_dir, block_chars
        self.children, self.queues = [], []
        if fork is None:
            fork = "mindspore" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
        if fork:
            ctx = multiprocessing.get_context("fork")
            n = workers or len(os.sched_getaffinity(0))
            for k in range(n):
                q = ctx.Queue(maxsize=depth)
                child = ctx.Process(target=_encode_in_child, daemon=True, name=f"qwen15_exp-encode{k}",
                                    args=(str(path), eod_between_docs, repeat, tokenizer_dir, block_chars, k, n,
                                          q, os.getpid()))
                child.start()
                self.children.append(child)
                self.queues.append(q)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._from_children() if self.children else self._here()

    def _here(self) -> Iterator[np.ndarray]:
        from qwen15_exp.data.tokenizer import load_bulk_encoder
        encoder = load_bulk_encoder(self.tokenizer_dir)
        for items in prefetched(cleaned_blocks(self.path, self.eod, self.repeat, self.stats, self.block_chars)):
            yield encode_items(items, encoder)

    def _next_from(self, k: int):
        while True:
            try:
                return self.queues[k].get(timeout=1.0)
            except queue.Empty:
                if not self.children[k].is_alive():
                    raise RuntimeError(f"the process encoding {self.path} stopped "
                                       f"(exit code {self.children[k].exitcode})") from None

    def _from_children(self) -> Iterator[np.ndarray]:
        finished = set()
        k = 0
        while len(finished) < len(self.children):
            if k not in finished:
                item = self._next_from(k)
                if item[0] == "done":
                    finished.add(k)
                    continue
                if item[0] == "error":
                    raise UserError(item[1])
                if item[0] == "crash":
                    raise RuntimeError(f"encoding {self.path} failed: {item[1]}")
                _, leading, ids, kept, articles = item
                if leading and self.stats.paragraphs:
                    ids = np.concatenate([np.full(leading, PAD_ID, dtype=np.int32), ids])
                self.stats.paragraphs, self.stats.articles = self.stats.paragraphs + kept, self.stats.articles + articles
                yield ids
            k = (k + 1) % len(self.children)

    def close(self) -> None:
        for child, q in zip(self.children, self.queues):
            if child.is_alive():
                child.terminate()
            child.join()
            q.cancel_join_thread()
            q.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rows_from_ids(id_blocks: Iterable[np.ndarray], seq_length: int, stats: WikiStats) -> Iterator[dict]:
    """Non-overlapping windows of seq_length + 1 over the concatenated ids; the last partial one dropped."""
    width = seq_length + 1
    carry = np.zeros(0, dtype=np.int32)
    for ids in id_blocks:
        carry = np.concatenate([carry, ids]) if len(carry) else ids
        n_full = len(carry) // width
        for k in range(n_full):
            stats.rows += 1
            stats.tokens += width
            stats.positions += width
            yield {"input_ids": carry[k * width:(k + 1) * width]}
        carry = carry[n_full * width:]
    stats.dropped_tail = int(len(carry))
