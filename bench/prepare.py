"""bench/prepare: end-to-end speed and memory of `qwen15_exp.prepare` on Wikitext-format text.

Generates a Wikitext-103-format file from real words (the alphabetic tokens of the Qwen vocabulary, Zipf
weighted, with WikiText's ' @-@ ', ' , ' and ' . ' and = headings =), then measures:
  - prepare (data=wiki, seq_length 4096): clean, tokenize, window, write MindRecord, in a subprocess;
  - the limit: raw `tokenizers` batch encoding of the same cleaned paragraphs, nothing written;
  - the seed's approach: transformers' slow Python Qwen2Tokenizer, one paragraph at a time (on a slice,
    its rate extrapolated: it would take hours on the whole file).
Goals: the whole command >= 0.9x the limit at 50 and 500 MB (issue 13), >= 10x the seed's approach, peak memory (the
process and its encoding workers, summed) < 1 GB on a 500 MB input
(`--mb 500`; the default 50 MB keeps the run to a few minutes).

Usage: python bench/prepare.py [--mb 50] [--seed-mb 0.5]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from job import scratch


def real_words() -> list[str]:
    from qwen15_exp.data.tokenizer import tokenizer_files
    vocab = json.loads(tokenizer_files()[0].read_text())
    return [t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].isascii() and len(t) > 3]


def generate(path: Path, megabytes: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = real_words()
    weights = [1.0 / (i + 10) for i in range(len(words))]          # Zipf-like, vocabulary order ~ frequency
    target = int(megabytes * 1e6)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            title = " ".join(rng.choices(words, k=3)).title()
            parts = [f" = {title} = \n \n"]
            for _ in range(rng.randint(3, 8)):
                sentence_words = rng.choices(words, weights, k=rng.randint(60, 160))
                for i in range(0, len(sentence_words), 7):   # a heavy tail of rare words, as in Wikipedia
                    sentence_words[i] = rng.choice(words) + rng.choice(words).lower()
                for i in range(8, len(sentence_words), 9):
                    sentence_words[i] += rng.choice([" ,", " .", " @-@", " ;"])
                parts.append(" " + " ".join(sentence_words) + " . \n \n")
            block = "".join(parts)
            f.write(block)
            size += len(block.encode())


def paragraphs_of(path: Path) -> list[str]:
    from qwen15_exp.data.wiki import clean_wikitext, read_blocks
    out = []
    for block in read_blocks(path):
        out += [p for p in clean_wikitext(block).split("\n\n") if p and not p.strip().startswith("=")]
    return out


def limit_rate(paragraphs: list[str]) -> tuple[float, int]:
    from qwen15_exp.data.tokenizer import load_tokenizer
    tok = load_tokenizer()
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(paragraphs), 2048):
        n += sum(len(e.ids) for e in tok.encode_batch_fast(paragraphs[i:i + 2048], add_special_tokens=False))
    return n / (time.perf_counter() - t0), n


def seed_rate(paragraphs: list[str], megabytes: float) -> float:
    from transformers import Qwen2Tokenizer
    from qwen15_exp.data.tokenizer import tokenizer_files
    vocab, merges = tokenizer_files()
    tok = Qwen2Tokenizer(str(vocab), str(merges), unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>")
    budget, chosen = int(megabytes * 1e6), []
    for p in paragraphs:
        if budget <= 0:
            break
        chosen.append(p)
        budget -= len(p)
    t0 = time.perf_counter()
    n = sum(len(tok(p)["input_ids"]) for p in chosen)
    return n / (time.perf_counter() - t0)


def tree_rss_mb(proc) -> float:
    """Resident memory of a process and all its descendants (its encoding workers), summed: pages a forked
    worker still shares with its parent count twice, so this is an upper bound."""
    import psutil
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run_prepare(src: Path, out: Path) -> tuple[float, dict, float]:
    import psutil
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "qwen15_exp.prepare", "data=wiki", f"data.input={src}",
                              "data.seq_length=4096", f"output={out}", "progress=false",
                              f"hydra.run.dir={out.parent / 'hydra'}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc, peak_mb = psutil.Process(child.pid), 0.0
    while child.poll() is None:                     # the whole tree's memory, every 50 ms
        peak_mb = max(peak_mb, tree_rss_mb(proc))
        time.sleep(0.05)
    _, stderr = child.communicate()
    wall = time.perf_counter() - t0
    if child.returncode:
        raise SystemExit(stderr)
    return wall, json.loads((out / "summary.json").read_text()), peak_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--seed-mb", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    with scratch("q15_prepare_") as work:
        src = work / "wiki.train.tokens"
        print(f"generating {args.mb:.0f} MB of Wikitext-format text in {src}", flush=True)
        generate(src, args.mb)
        paragraphs = paragraphs_of(src)
        runs, limits = [], []
        for i in range(args.reps):                         # alternate: this 2-core machine is noisy
            runs.append(run_prepare(src, work / f"mindrecord{i}"))
            limits.append(limit_rate(paragraphs))
        wall = statistics.median(r[0] for r in runs)
        summary = runs[0][1]
        peak_mb = max(r[2] for r in runs)
        tokens = summary["tokens"] + summary.get("dropped_tail", 0)
        prepare_tps = tokens / statistics.median(r[1]["seconds"] for r in runs)   # prepare(): tokenizer load
        wall_tps = tokens / wall                                                  # to committed file; and the
        lim_tps = statistics.median(x[0] for x in limits)                         # whole command
        lim_tokens = limits[0][1]
        del paragraphs[200000:]
        seed_tps = seed_rate(paragraphs, args.seed_mb)
        size_mb = src.stat().st_size / 1e6
        print(f"\nbench/prepare: {size_mb:.0f} MB Wikitext-format text, {lim_tokens:,} tokens, seq_length 4096, "
              f"{summary['rows']} rows written; median of {args.reps} alternating runs")
        print(f"{'path':<58}{'tokens/s':>12}{'ratio':>9}")
        print(f"{'prepare: clean+tokenize+window+MindRecord (in-process)':<58}{prepare_tps:>12,.0f}{1:>9.2f}")
        print(f"{'  the same, whole command incl. interpreter and imports':<58}{wall_tps:>12,.0f}"
              f"{wall_tps / prepare_tps:>9.2f}")
        print(f"{'limit: tokenizers encode_batch_fast, same paragraphs':<58}{lim_tps:>12,.0f}"
              f"{prepare_tps / lim_tps:>9.2f}")
        print(f"{'seed: transformers Qwen2Tokenizer per paragraph':<58}{seed_tps:>12,.0f}{prepare_tps / seed_tps:>9.1f}")
        print(f"peak memory of prepare (its process and workers, summed): {peak_mb:,.0f} MB for a "
              f"{size_mb:.0f} MB input")
        print(f"whole command vs limit: {wall_tps / lim_tps:.2f}x")
        print(f"goals: whole command >= 0.9x limit -> {'met' if wall_tps >= 0.9 * lim_tps else 'NOT met'}; "
              f"in-process >= 0.7x limit -> {'met' if prepare_tps >= 0.7 * lim_tps else 'NOT met'}; "
              f">= 10x seed -> {'met' if prepare_tps >= 10 * seed_tps else 'NOT met'}; "
              f"peak < 1 GB -> {'met' if peak_mb < 1024 else 'NOT met'}")


if __name__ == "__main__":
    main()
