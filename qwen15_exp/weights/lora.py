"""LoRA adapters in MindFormers' names: read from a phase=lora run or a PEFT folder, merged into base weights,
or put beside them to train on.

MindFormers (mindpet's LoRADense) keeps `<layer>.mindpet_delta_lora_a` (rank x in) and `..._lora_b` (out x
rank) beside the frozen `<layer>.weight` and adds `scaling * x A^T B^T`, scaling = lora_alpha / lora_rank (PEFT's
LoRA without rslora computes the same); the merged weight W + scaling * B @ A gives the same output with no
adapter. Parameters a LoRA run keeps trainable besides the adapters (`freeze_exclude`, e.g. the norms) travel
with the adapters as `extras` and replace the base's tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import yaml

from qwen15_exp.errors import UserError

LORA_A, LORA_B = ".mindpet_delta_lora_a", ".mindpet_delta_lora_b"
NOT_WEIGHTS = ("adam_", "accu_", "global_step", "scale_sense", "loss_scale", "epoch_num", "step_num",
               "current_iterator_step", "last_overflow_iterator_step", "global_batch_size")
SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


@dataclass
class Adapters:
    """LoRA adapters in MindFormers names: {layer: (A, B)}, layer like model.layers.0.attention.wq."""
    rank: int
    alpha: float
    pairs: dict
    extras: dict = field(default_factory=dict)      # other trained tensors (full MindFormers names)
    source: str = ""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def tensors(self) -> dict:
        """The adapters as a MindFormers LoRA network names them (what a phase=lora run loads)."""
        out = dict(self.extras)
        for layer, (a, b) in self.pairs.items():
            out[layer + LORA_A], out[layer + LORA_B] = a, b
        return out


def network_weights(tensors: dict) -> dict:
    """A checkpoint's network weights: no optimizer state, counters or adapters."""
    return {n: v for n, v in tensors.items() if not n.startswith(NOT_WEIGHTS) and not n.endswith((LORA_A, LORA_B))}


def merged_weights(base: dict, adapters: Adapters) -> dict:
    """Base network weights with the extras put in and every adapter pair folded into its layer's weight
    (float32 arithmetic, stored in the base's dtype)."""
    out = network_weights(base)
    out.update(adapters.extras)
    for layer, (a, b) in adapters.pairs.items():
        w = out.get(layer + ".weight")
        if w is None or w.shape != (b.shape[0], a.shape[1]):
            raise UserError(f"adapter {layer} ({b.shape[0]} x {a.shape[1]}) does not fit the base weights "
                            f"({None if w is None else w.shape}) from {adapters.source}; choose the base model the "
                            "adapters were trained on")
        out[layer + ".weight"] = (w.astype(np.float32) + adapters.scaling * (b.astype(np.float32) @ a.astype(np.float32))
                                  ).astype(w.dtype)
    return out


def read_checkpoint(path: Path) -> dict:
    if Path(path).suffix == ".safetensors":
        from qwen15_exp.weights.tensors import load_array, read_header
        return {r.name: load_array(r) for r in read_header(path) if r.dtype in ("F32", "F16")}
    import mindspore as ms
    return {name: p.asnumpy() for name, p in ms.load_checkpoint(str(path)).items()}


def run_pet_config(run_dir: Path) -> dict:
    yaml_path = Path(run_dir) / "mindformers.yaml"
    if not yaml_path.is_file():
        raise UserError(f"{run_dir} is not a run dir (no mindformers.yaml); give the folder of a phase=lora run")
    pet = yaml.safe_load(yaml_path.read_text())["model"]["model_config"].get("pet_config") or {}
    if pet.get("pet_type") != "lora":
        raise UserError(f"{run_dir} did not train with LoRA (no pet_config of type lora); nothing to take")
    return pet


def newest_run_checkpoint(run_dir: Path) -> Path:
    from qwen15_exp.weights.run_checkpoints import checkpoint_files, checkpoint_root
    rank0 = checkpoint_root(run_dir) / "rank_0"
    files = checkpoint_files(rank0) if rank0.is_dir() else []
    if not files:
        raise UserError(f"{run_dir} has no checkpoint in {rank0}; use it after the run has saved one")
    return files[0]


def adapters_of_run(run_dir: Path) -> tuple[Adapters, dict]:
    """(the adapters, the whole network) of a phase=lora run's newest checkpoint."""
    pet = run_pet_config(run_dir)
    path = newest_run_checkpoint(run_dir)
    tensors = read_checkpoint(path)
    pairs = {n[: -len(LORA_A)]: (tensors[n], tensors[n[: -len(LORA_A)] + LORA_B])
             for n in tensors if n.endswith(LORA_A) and not n.startswith(NOT_WEIGHTS)}
    network = network_weights(tensors)
    extras = {n: v for n, v in network.items() if any(fnmatch(n, p) for p in pet.get("freeze_exclude") or [])}
    return Adapters(pet["lora_rank"], pet["lora_alpha"], pairs, extras, str(path)), network


def write_safetensors(out: Path, tensors: dict, note: str) -> None:
    from qwen15_exp.weights.tensors import write_streaming
    items = [(name, SAFETENSORS_DTYPES[v.dtype], v.shape) for name, v in tensors.items()]
    write_streaming(out, items, tensors.__getitem__, metadata={"format": "ms", "source": f"qwen15_exp {note}"})


def merge_run(run_dir: Path, out: Path) -> tuple[int, Path]:
    """Merge a LoRA run's newest checkpoint into `out` (.safetensors); returns (tensors written, the source)."""
    if out.suffix != ".safetensors":
        raise UserError(f"output={out}: end it with .safetensors")
    adapters, network = adapters_of_run(run_dir)
    merged = merged_weights(network, adapters)
    write_safetensors(out, merged, "lora_merge")
    print(f"merged {len(adapters.pairs)} LoRA adapter pairs (alpha {adapters.alpha}, rank {adapters.rank}) of "
          f"{adapters.source}")
    return len(merged), Path(adapters.source)
