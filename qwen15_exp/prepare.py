"""`python -m qwen15_exp.prepare`: raw alpaca / ChatML / Wikitext -> MindRecord, with Hydra's conventions.

    python -m qwen15_exp.prepare data=alpaca data.input=alpaca_data.json data.seq_length=4096
    python -m qwen15_exp.prepare data=wiki data.input=wiki.train.tokens data.seq_length=32768 output=/data/wiki

Without `output` the result goes into the content-addressed cache, where a training run given the same
raw file, tokenizer, seq_length and options finds it and prepares nothing.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from qwen15_exp.cli import run_app
from qwen15_exp.compose import absolute_path, absolutize_data
from qwen15_exp.errors import UserError


def task(cfg) -> None:
    from qwen15_exp.data.cache import prepare, summary_lines
    job = OmegaConf.to_object(cfg)
    data = absolutize_data(job.data)
    out = Path(absolute_path(job.output)) if job.output else None
    if job.chatml_output:
        if data.format != "alpaca":
            raise UserError(f"chatml_output converts alpaca records; data.format is {data.format}")
        from qwen15_exp.data.alpaca import iter_alpaca, write_chatml_jsonl
        n = write_chatml_jsonl(iter_alpaca(data.input, data.system_prompt), absolute_path(job.chatml_output))
        print(f"ChatML: {n} conversations written to {absolute_path(job.chatml_output)}")
    prepared = prepare(data, data.seq_length, out_dir=out, show_progress=job.progress)
    state = "reused (cached)" if prepared.reused else "written"
    print(f"MindRecord {state}: {prepared.folder}")
    for line in summary_lines(prepared.summary):
        print(f"  {line}")
    print(f"  train with: python -m qwen15_exp data=mindrecord data.input={prepared.folder} "
          f"data.seq_length={job.data.seq_length}")


def main() -> None:
    run_app("prepare", task)


if __name__ == "__main__":
    main()
