"""Raw data -> MindRecord, cached by content: input bytes + tokenizer files + seq_length + options.

A run given a raw alpaca / ChatML / Wikitext file prepares it here once; a second run with the same
inputs finds the finished folder (it only exists once complete: atomic rename) and reuses it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen15_exp.errors import UserError
from qwen15_exp.paths import cache_root
from qwen15_exp.atomic import atomic_dir, write_json

PREPARE_VERSION = 1          # bump when the row format changes, so old caches are not reused
RAW_FORMATS = ("alpaca", "chatml", "wiki")


@dataclass(frozen=True)
class PreparedData:
    folder: Path
    files: list
    rows: int
    summary: dict
    reused: bool


def default_cache_dir() -> Path:
    return cache_root() / "data"


def _file_digest(path: Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(data, seq_length: int) -> str:
    from qwen15_exp.data.tokenizer import tokenizer_files
    h = hashlib.sha256()
    h.update(_file_digest(Path(data.input)).encode())
    for f in tokenizer_files(data.tokenizer_dir or None):
        h.update(_file_digest(f).encode())
    options = {"v": PREPARE_VERSION, "format": data.format, "seq_length": seq_length,
               "system_prompt": data.system_prompt if data.format == "alpaca" else None,
               "mask_prompt": data.mask_prompt, "pack": data.pack, "eod": data.eod_between_docs,
               "repeat": data.repeat, "shards": data.file_partition}
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()[:20]


def prepare(data, seq_length: int, out_dir: Path | None = None, show_progress: bool = True) -> PreparedData:
    """Prepare data (a DataConfig) into out_dir, or into the content-addressed cache when out_dir is None."""
    if data.format not in RAW_FORMATS:
        raise UserError(f"data.format={data.format!r} needs no preparation; prepare takes one of {RAW_FORMATS}")
    if not data.input or data.input == "???":
        raise UserError(f"data.input is required for data={data.name}: set data.input=/path/to/file")
    if not Path(data.input).is_file():
        raise UserError(f"data file not found: {data.input}; set data.input to an existing file")
    if out_dir is None:
        root = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
        out_dir = root / f"{data.format}-{Path(data.input).stem}-s{seq_length}-{cache_key(data, seq_length)}"
        if (out_dir / "summary.json").is_file():
            summary = json.loads((out_dir / "summary.json").read_text())
            from qwen15_exp.data.mindrecord import data_files
            return PreparedData(out_dir, data_files(out_dir), summary["rows"], summary, reused=True)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        summary = _prepare_into(data, seq_length, tmp, show_progress)
        write_json(tmp / "summary.json", summary)
    from qwen15_exp.data.mindrecord import data_files
    return PreparedData(out_dir, data_files(out_dir), summary["rows"], summary, reused=False)


def _prepare_into(data, seq_length: int, folder: Path, show_progress: bool) -> dict:
    from tqdm import tqdm

    from qwen15_exp.data import mindrecord
    from qwen15_exp.data.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    if data.format == "wiki":
        from qwen15_exp.data import wiki
        stats = wiki.WikiStats()
        schema = mindrecord.SCHEMA_PRETRAIN
        # the workers start first, so that they clean and encode while MindSpore is imported for the writer
        with wiki.EncodingAhead(Path(data.input), data.eod_between_docs, data.repeat, stats,
                                data.tokenizer_dir or None) as id_blocks:
            progress = tqdm(desc="prepare wiki", unit=" rows", disable=not show_progress, leave=False)
            rows = wiki.rows_from_ids(id_blocks, seq_length, stats)
            files = mindrecord.write_rows(rows, folder, schema, shards=data.file_partition, progress=progress)
    else:
        from qwen15_exp.data import alpaca, chatml
        tokenizer = load_tokenizer(data.tokenizer_dir or None)
        progress = tqdm(desc=f"prepare {data.format}", unit=" rows", disable=not show_progress, leave=False)
        conversations = (alpaca.iter_alpaca(data.input, data.system_prompt) if data.format == "alpaca"
                         else alpaca.iter_chatml(data.input))
        stats = chatml.RowStats()
        tokenized = chatml.tokenize_conversations(tokenizer, conversations, data.mask_prompt)
        rows = chatml.rows_from_tokens(tokenized, seq_length, data.pack, stats)
        schema = mindrecord.SCHEMA_SFT
        files = mindrecord.write_rows(rows, folder, schema, shards=data.file_partition, progress=progress)
    progress.close()
    seconds = time.perf_counter() - t0
    if stats.rows == 0:
        raise UserError(f"{data.input} gave no rows at seq_length={seq_length}; for wiki the text must hold "
                        f"at least seq_length+1 tokens")
    summary = asdict(stats)
    summary.update({
        "format": data.format, "input": str(data.input), "seq_length": seq_length, "rows": stats.rows,
        "columns": list(schema), "files": [f.name for f in files],
        "padding_fraction": round(stats.padding_fraction, 4), "seconds": round(seconds, 3),
        "tokens_per_second": round(stats.tokens / seconds, 1) if seconds > 0 else None,
        "options": {"mask_prompt": data.mask_prompt, "pack": data.pack, "eod_between_docs": data.eod_between_docs,
                    "repeat": data.repeat, "file_partition": data.file_partition},
    })
    return summary


def summary_lines(summary: dict) -> list[str]:
    s = summary
    lines = [f"{s['rows']} rows of {s['seq_length'] + 1} tokens from {s['input']}",
             f"tokens {s['tokens']:,}  padding {100 * s['padding_fraction']:.1f}%  "
             f"time {s['seconds']:.2f}s  ({s['tokens_per_second'] or 0:,.0f} tokens/s)"]
    if "conversations" in s:
        lines.append(f"conversations {s['conversations']}  truncated {s['truncated']}  "
                     f"trained positions {s['trained']:,}")
    return lines
