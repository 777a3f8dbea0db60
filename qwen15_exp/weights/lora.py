"""LoRA adapters in MindFormers' names: read from a phase=lora run or a PEFT folder, merged into base weights,
or put beside them to train on.

MindFormers (mindpet's LoRADense) keeps `<layer>.mindpet_delta_lora_a` (rank x in) and `..._lora_b` (out x
rank) beside the frozen `<layer>.weight` and adds `scaling * x A^T B^T`, scaling = lora_alpha / lora_rank (PEFT's
LoRA without rslora computes the same); the merged weight W + scaling * B @ A gives the same output with no
adapter. Tensors are streamed (one in memory at a time) and keep their dtype (bf16 included); the arithmetic is
float32. Parameters a LoRA run keeps trainable besides the adapters (`freeze_exclude`, e.g. the norms) travel
with the adapters as `extras` and replace the base's tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import yaml

from qwen15_exp.errors import UserError
from qwen15_exp.weights.tensors import cast, checkpoint_tensors, tensor_array, write_streaming

LORA_A, LORA_B = ".mindpet_delta_lora_a", ".mindpet_delta_lora_b"
NOT_WEIGHTS = ("adam_", "accu_", "global_step", "scale_sense", "loss_scale", "epoch_num", "step_num",
               "current_iterator_step", "last_overflow_iterator_step", "global_batch_size")
FLOAT_CODES = ("F32", "F16", "BF16")


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


def is_network_weight(name: str) -> bool:
    """Not optimizer state, a counter or an adapter."""
    return not name.startswith(NOT_WEIGHTS) and not name.endswith((LORA_A, LORA_B))


def network_refs(path: Path) -> dict:
    """A checkpoint's float network weights as references (a .safetensors is read one tensor at a time)."""
    return {r.name: r for r in checkpoint_tensors(path) if r.dtype in FLOAT_CODES and is_network_weight(r.name)}


def as_f32(ref) -> np.ndarray:
    """A checkpoint tensor's values in float32 (bf16 widened exactly)."""
    return cast(tensor_array(ref), ref.dtype, "F32")


def check_fit(shapes: dict, adapters: Adapters) -> None:
    """Every adapter pair sits on a base weight of the shape B @ A has."""
    for layer, (a, b) in adapters.pairs.items():
        shape = shapes.get(layer + ".weight")
        if shape is None or tuple(shape) != (b.shape[0], a.shape[1]):
            raise UserError(f"adapter {layer} ({b.shape[0]} x {a.shape[1]}) does not fit the base weights "
                            f"({shape}) from {adapters.source}; choose the base model the adapters were trained on")


def write_with_adapters(out: Path, base: dict, adapters: Adapters, merge: bool, note: str) -> int:
    """Stream `base` (name -> ref) with the adapters into a safetensors file, one tensor in memory at a time:
    merged (W + scaling * B @ A, float32 arithmetic, stored in the base's dtype) or, for a LoRA run to continue,
    beside the base under MindFormers' LoRA names. Extras replace the base's tensors. Returns tensors written."""
    check_fit({n: r.shape for n, r in base.items()}, adapters)
    beside = {} if merge else {n: v for n, v in adapters.tensors().items() if n not in base}
    items = [(n, r.dtype, r.shape) for n, r in base.items()] + [(n, "F32", v.shape) for n, v in beside.items()]

    def produce(name):
        if name in beside:
            return np.ascontiguousarray(beside[name], dtype=np.float32)
        ref = base[name]
        value = np.asarray(adapters.extras[name], np.float32) if name in adapters.extras else as_f32(ref)
        layer = name[: -len(".weight")]
        if merge and name.endswith(".weight") and layer in adapters.pairs:
            a, b = adapters.pairs[layer]
            value = value + adapters.scaling * (np.asarray(b, np.float32) @ np.asarray(a, np.float32))
        return cast(np.ascontiguousarray(value, dtype=np.float32), "F32", ref.dtype)

    write_streaming(out, items, produce, metadata={"format": "ms", "source": f"qwen15_exp {note}"})
    return len(items)


def write_f32(out: Path, tensors: dict, note: str) -> None:
    """Small tensors (adapters) as a float32 safetensors file."""
    items = [(name, "F32", v.shape) for name, v in tensors.items()]
    write_streaming(out, items, lambda n: np.ascontiguousarray(tensors[n], dtype=np.float32),
                    metadata={"format": "ms", "source": f"qwen15_exp {note}"})


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
    """(the adapters, the network's references) of a phase=lora run's newest checkpoint."""
    pet = run_pet_config(run_dir)
    path = newest_run_checkpoint(run_dir)
    refs = {r.name: r for r in checkpoint_tensors(path)}
    pairs = {n[: -len(LORA_A)]: (as_f32(refs[n]), as_f32(refs[n[: -len(LORA_A)] + LORA_B]))
             for n in refs if n.endswith(LORA_A) and not n.startswith(NOT_WEIGHTS)}
    network = {n: r for n, r in refs.items() if r.dtype in FLOAT_CODES and is_network_weight(n)}
    extras = {n: as_f32(r) for n, r in network.items() if any(fnmatch(n, p) for p in pet.get("freeze_exclude") or [])}
    return Adapters(pet["lora_rank"], pet["lora_alpha"], pairs, extras, str(path)), network


def merge_run(run_dir: Path, out: Path) -> tuple[int, Path]:
    """Merge a LoRA run's newest checkpoint into `out` (.safetensors); returns (tensors written, the source)."""
    if out.suffix != ".safetensors":
        raise UserError(f"output={out}: end it with .safetensors")
    adapters, network = adapters_of_run(run_dir)
    written = write_with_adapters(out, network, adapters, merge=True, note="lora_merge")
    print(f"merged {len(adapters.pairs)} LoRA adapter pairs (alpha {adapters.alpha}, rank {adapters.rank}) of "
          f"{adapters.source}")
    return written, Path(adapters.source)
