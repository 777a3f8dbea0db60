"""LoRA adapters merged into the base weights: W' = W + (alpha / rank) * B @ A for every wrapped Linear.

MindFormers (mindpet's LoRADense) keeps `<layer>.mindpet_delta_lora_a` (rank x in) and `..._lora_b` (out x
rank) beside the frozen `<layer>.weight` and adds `scaling * x A^T B^T`, scaling = lora_alpha / lora_rank;
the merged weight gives the same output with no adapter. Input: a LoRA run's checkpoint (network + adapters,
as it trains); output: a plain MindFormers safetensors checkpoint any run, chat or convert can take.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from qwen15_exp.errors import UserError

LORA_A, LORA_B = ".mindpet_delta_lora_a", ".mindpet_delta_lora_b"
NOT_WEIGHTS = ("adam_", "accu_", "global_step", "scale_sense", "loss_scale", "epoch_num", "step_num",
               "current_iterator_step", "last_overflow_iterator_step", "global_batch_size")


def merged_weights(tensors: dict, alpha: float, rank: int) -> dict:
    """Network weights with every adapter pair folded into its layer's weight (float32 arithmetic)."""
    scaling = alpha / rank
    out = {}
    for name, value in tensors.items():
        if name.startswith(NOT_WEIGHTS) or name.endswith((LORA_A, LORA_B)):
            continue
        layer = name[: -len(".weight")] if name.endswith(".weight") else None
        if layer and layer + LORA_A in tensors:
            a, b = tensors[layer + LORA_A].astype(np.float32), tensors[layer + LORA_B].astype(np.float32)
            value = (value.astype(np.float32) + scaling * (b @ a)).astype(value.dtype)
        out[name] = value
    return out


def read_checkpoint(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from qwen15_exp.weights.tensors import load_array, read_header
        return {r.name: load_array(r) for r in read_header(path) if r.dtype in ("F32", "F16")}
    import mindspore as ms
    return {name: p.asnumpy() for name, p in ms.load_checkpoint(str(path)).items()}


def merge_run(run_dir: Path, out: Path) -> tuple[int, Path]:
    """Merge a LoRA run's newest checkpoint into `out` (.safetensors); returns (tensors written, the source)."""
    from qwen15_exp.weights.run_checkpoints import checkpoint_files, checkpoint_root
    from qwen15_exp.weights.tensors import write_streaming
    yaml_path = Path(run_dir) / "mindformers.yaml"
    if not yaml_path.is_file():
        raise UserError(f"{run_dir} is not a run dir (no mindformers.yaml); give the folder of a phase=lora run")
    pet = (yaml.safe_load(yaml_path.read_text())["model"]["model_config"].get("pet_config") or {})
    if pet.get("pet_type") != "lora":
        raise UserError(f"{run_dir} did not train with LoRA (no pet_config of type lora); nothing to merge")
    rank0 = checkpoint_root(run_dir) / "rank_0"
    files = checkpoint_files(rank0) if rank0.is_dir() else []
    if not files:
        raise UserError(f"{run_dir} has no checkpoint in {rank0}; merge after the run has saved one")
    tensors = read_checkpoint(files[0])
    adapters = sum(name.endswith(LORA_A) and not name.startswith(NOT_WEIGHTS) for name in tensors)
    merged = merged_weights(tensors, pet["lora_alpha"], pet["lora_rank"])
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    items = [(name, codes[v.dtype], v.shape) for name, v in merged.items()]
    if out.suffix != ".safetensors":
        raise UserError(f"output={out}: end it with .safetensors")
    write_streaming(out, items, merged.__getitem__, metadata={"format": "ms", "source": "qwen15_exp lora_merge"})
    print(f"merged {adapters} LoRA adapter pairs (alpha {pet['lora_alpha']}, rank {pet['lora_rank']}) of {files[0]}")
    return len(items), files[0]
