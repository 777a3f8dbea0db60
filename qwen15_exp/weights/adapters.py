"""LoRA adapters on top of base weights, wherever they come from (a PEFT folder or a phase=lora run dir):
folded in for chat, predict, eval and full finetuning, or put beside the base to continue in phase=lora.
The result is a cached checkpoint (one per base, adapter and mode) that any run loads like any other."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qwen15_exp.errors import UserError
from qwen15_exp.weights.lora import Adapters, adapters_of_run, network_refs, write_with_adapters
from qwen15_exp.weights.peft import read_peft


def read_adapters(path: str) -> Adapters:
    """Adapters from a PEFT folder (adapter_config.json) or a phase=lora run dir (mindformers.yaml)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return read_peft(p)
    if (p / "mindformers.yaml").is_file():
        return adapters_of_run(p)[0]
    raise UserError(f"phase.adapter={path}: not a PEFT folder (adapter_config.json) nor a phase=lora run dir "
                    "(mindformers.yaml); give one of those")


def _file_key(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files
            if f.suffix in (".json", ".safetensors", ".ckpt", ".yaml")]


def check_continues(adapters: Adapters, lora) -> None:
    """A phase=lora run continuing adapters must build the same adapters: rank, alpha and wrapped layers."""
    import re
    layers = {layer.rsplit(".", 1)[-1] for layer in adapters.pairs}
    pattern = re.compile(lora.target_modules)
    wrapped = {name for name in layers if pattern.match(name)}
    if adapters.rank != lora.rank or adapters.alpha != lora.alpha or wrapped != layers:
        raise UserError(f"phase.adapter={adapters.source} has rank {adapters.rank}, alpha {adapters.alpha:g} on "
                        f"{sorted(layers)}; this run builds rank {lora.rank}, alpha {lora.alpha:g}, targets "
                        f"{lora.target_modules!r}. Continue them with phase.lora.rank={adapters.rank} "
                        f"phase.lora.alpha={adapters.alpha:g} phase.lora.target_modules='"
                        + "|".join(f".*{n}" for n in sorted(layers)) + "'")


def with_adapters(base: str, adapter: str, lora=None) -> str:
    """A cached checkpoint of `base` with `adapter` (PEFT folder or LoRA run dir) folded in (chat, predict,
    eval, full finetuning: `lora` None) or beside it under MindFormers' LoRA names (a phase=lora run continuing
    the adapters, checked against its `lora` config). Written once per (base, adapter, mode)."""
    from qwen15_exp.paths import weights_cache_dir
    merge = lora is None
    base_path, adapter_path = Path(base), Path(adapter)
    if not base_path.is_file():
        raise UserError(f"phase.adapter needs phase.load_checkpoint to be one checkpoint file or a Hugging Face "
                        f"folder; got {base}")
    key = hashlib.sha256(json.dumps([_file_key(base_path), _file_key(adapter_path), merge]).encode()).hexdigest()[:16]
    out = weights_cache_dir() / "adapters" / f"{base_path.stem}-{'merged' if merge else 'lora'}-{key}.safetensors"
    adapters = read_adapters(adapter)
    if not merge:
        check_continues(adapters, lora)
    if out.is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_with_adapters(out, network_refs(base_path), adapters, merge, "merged adapters" if merge else "base + adapters")
    print(f"{'merged' if merge else 'loaded'} {len(adapters.pairs)} LoRA adapter pairs (alpha {adapters.alpha}, "
          f"rank {adapters.rank}) from {adapter} onto {base} -> {out} (cached)")
    return str(out)
