"""Rows -> MindRecord, written into a temp folder and renamed into place only when complete.

Columns are named after LlamaForCausalLM.construct arguments (`input_ids`, `labels`), because MindFormers
1.9.0 passes dataset columns to the network as keyword arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SCHEMA_SFT = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
SCHEMA_PRETRAIN = {"input_ids": {"type": "int32", "shape": [-1]}}
FILE_NAME = "train.mindrecord"


def write_rows(rows: Iterable[dict], folder: Path, schema: dict, shards: int = 1, batch: int = 1024,
               progress=None) -> list[Path]:
    """Write rows into folder/train.mindrecord (with `shards` > 1: train.mindrecord0..N-1)."""
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(file_name=str(folder / FILE_NAME), shard_num=shards, overwrite=True)
    writer.add_schema(schema, "qwen15_exp")
    pending = []
    for row in rows:
        pending.append(row)
        if len(pending) >= batch:
            writer.write_raw_data(pending)
            if progress is not None:
                progress.update(len(pending))
            pending = []
    if pending:
        writer.write_raw_data(pending)
        if progress is not None:
            progress.update(len(pending))
    writer.commit()
    return data_files(folder)


def data_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob(FILE_NAME + "*") if not p.name.endswith(".db"))


def inspect_mindrecord(path: Path) -> tuple[Path, list[str], int, int]:
    """(folder, columns, rows, row width) of a MindRecord file or of the folder holding one."""
    from qwen15_exp.errors import UserError
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.mindrecord*") if not p.name.endswith(".db"))
    if not files:
        raise UserError(f"no MindRecord file at {path}; set data.input to a .mindrecord file or its folder")
    missing = [f for f in files if not f.with_name(f.name + ".db").is_file()]
    if missing:
        raise UserError(f"{missing[0]} has no index file beside it ({missing[0].name}.db): a MindRecord is the data "
                        "file and its .db together; copy both, or prepare the data again (python -m qwen15_exp.prepare)")
    import mindspore.dataset as ds
    try:
        dataset = ds.MindDataset(dataset_files=[str(f) for f in files], shuffle=False)
        columns = dataset.get_col_names()
        first = next(dataset.create_dict_iterator(output_numpy=True, num_epochs=1)) if "input_ids" in columns else None
        rows = dataset.get_dataset_size()
    except (RuntimeError, ValueError, StopIteration) as e:
        raise UserError(f"{files[0]} cannot be read as MindRecord ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}); "
                        "it may be truncated: copy it again with its .db, or prepare the data again") from None
    if "input_ids" not in columns:
        raise UserError(f"{files[0]} has columns {columns}; MindFormers needs input_ids (and labels for finetune)")
    keep = [c for c in ("input_ids", "labels") if c in columns]
    return files[0].parent, keep, rows, int(first["input_ids"].shape[-1])
