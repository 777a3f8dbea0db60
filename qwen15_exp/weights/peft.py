"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an adapter `base_model.model.<HF module>.lora_A.weight` (r x in) and `.lora_B.weight` (out x r), a
module kept trainable (`modules_to_save`) `base_model.model.<HF name>`; with `use_rslora` false its scaling is
lora_alpha / r, MindFormers' too, so the tensors move across unchanged (only the names change, through the
same table as the full weights).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen15_exp.errors import UserError
from qwen15_exp.weights.lora import Adapters, as_f32
from qwen15_exp.weights.names import HF_TO_MF, MF_TO_HF, rename
from qwen15_exp.weights.tensors import read_header

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


EMBEDDING, LM_HEAD = "model.embed_tokens", "lm_head"    # Hugging Face modules of a tied pair


def _hf_module(mf_tensor: str) -> str:
    """The Hugging Face module that holds a MindFormers tensor (the embedding's name has no .weight)."""
    name = rename(mf_tensor, MF_TO_HF)
    if name is None:
        raise UserError(f"no Hugging Face name for {mf_tensor}")
    return name.rsplit(".", 1)[0]


def peft_config(adapters: Adapters, base_model: str, dropout: float) -> dict:
    modules = [_hf_module(layer + ".weight") for layer in adapters.pairs]
    extras = sorted({_hf_module(n) for n in adapters.extras})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": adapters.rank, "lora_alpha": adapters.alpha, "lora_dropout": dropout,
        # MindFormers matches one attribute name in every layer; PEFT matches module-name suffixes the same way
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "modules_to_save": extras or None,
        # a trained embedding kept in modules_to_save is a copy; a tied lm_head must follow the copy (a harmless
        # warning from peft when the base does not tie them)
        "ensure_weight_tying": EMBEDDING in extras,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
    }


def export_peft(adapters: Adapters, out_dir: Path, base_model: str = "", dropout: float = 0.0) -> list[Path]:
    """Write the PEFT folder (both files appear together: written into a temporary folder, then renamed)."""
    from qwen15_exp.atomic import atomic_dir, write_json
    from qwen15_exp.weights.lora import write_f32
    tensors = {}
    for layer, (a, b) in adapters.pairs.items():
        module = PREFIX + _hf_module(layer + ".weight")
        tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"] = a, b
    for name, value in adapters.extras.items():
        tensors[PREFIX + rename(name, MF_TO_HF)] = value
    embedding = tensors.get(f"{PREFIX}{EMBEDDING}.weight")
    if embedding is not None:                 # peft's own save_pretrained writes the tied lm_head beside it
        tensors.setdefault(f"{PREFIX}{LM_HEAD}.weight", embedding)
    with atomic_dir(out_dir) as tmp:
        write_f32(tmp / WEIGHTS, tensors, "peft export")
        write_json(tmp / CONFIG, peft_config(adapters, base_model, dropout))
    return [out_dir / CONFIG, out_dir / WEIGHTS]


def read_peft(folder: Path) -> Adapters:
    from qwen15_exp.weights.check import read_json_file
    config = read_json_file(folder / CONFIG, "PEFT adapter_config.json")
    unsupported = {k: config.get(k) for k in ("use_dora", "use_rslora", "fan_in_fan_out") if config.get(k)}
    if config.get("peft_type") != "LORA" or unsupported or config.get("bias", "none") != "none":
        raise UserError(f"{folder}: only plain LoRA adapters load (peft_type LORA, bias none, no DoRA/rsLoRA/"
                        f"fan_in_fan_out); this one has peft_type={config.get('peft_type')} {unsupported}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"{folder}: per-layer ranks or alphas (rank_pattern/alpha_pattern) have no MindFormers "
                        "equivalent (one lora_rank and lora_alpha per model)")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{folder}: no {WEIGHTS} beside {CONFIG}")
    pairs, extras = {}, {}
    for ref in read_header(weights):             # any float dtype, bf16 included, as float32
        key, value = ref.name, as_f32(ref)
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if name.endswith(part):
                layer = rename(name[: -len(part)] + ".weight", HF_TO_MF)
                if layer is None:
                    raise UserError(f"{folder}: adapter {key} is on a module qwen15_exp does not know")
                pairs.setdefault(layer[: -len(".weight")], [None, None])[slot] = value
                break
        else:
            mf = rename(name, HF_TO_MF)
            if mf is None:
                raise UserError(f"{folder}: tensor {key} is neither an adapter nor a Qwen2 weight")
            extras[mf] = value
    embedding_name, head_name = (rename(f"{m}.weight", HF_TO_MF) for m in (EMBEDDING, LM_HEAD))
    embedding, head = extras.get(embedding_name), extras.get(head_name)
    if config.get("ensure_weight_tying") and embedding is not None and head is not None \
            and np.array_equal(head, embedding):
        del extras[head_name]                 # one tensor in a tied MindFormers model
    broken = [layer for layer, (a, b) in pairs.items() if a is None or b is None]
    if broken:
        raise UserError(f"{folder}: adapters without their A or B half: {broken[:3]}")
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{folder}: {CONFIG} needs a whole-number r and a number lora_alpha; it has r="
                        f"{config.get('r')!r}, lora_alpha={config.get('lora_alpha')!r}") from None
    # the scale is alpha / r: a config that states another rank than its tensors would merge them wrongly
    # (peft itself refuses to load such a folder)
    ranks = {a.shape[0] for a, b in pairs.values()} | {b.shape[1] for a, b in pairs.values()}
    if ranks and ranks != {rank}:
        raise UserError(f"{folder}: {CONFIG} says r={rank} but its adapter tensors have rank "
                        f"{', '.join(map(str, sorted(ranks)))}; the folder is inconsistent: export it again")
    return Adapters(rank, alpha, {k: tuple(v) for k, v in pairs.items()}, extras, str(folder))


def hf_base_of(run_dir: Path, base_model: str = "") -> str:
    """The Hugging Face folder PEFT should load the adapters onto: `base_model` when given, else the run's
    phase.load_checkpoint when that is a Hugging Face folder; a MindFormers checkpoint is no PEFT base (""),
    and the caller says how to make one."""
    import yaml

    from qwen15_exp.weights.check import is_hf_folder
    if base_model:
        if not is_hf_folder(Path(base_model)):
            raise UserError(f"base_model={base_model} is not a Hugging Face folder (config.json and *.safetensors); "
                            "convert the base with direction=mf2hf and give that folder")
        return str(Path(base_model).resolve())
    hydra_config = Path(run_dir) / ".hydra" / "config.yaml"
    base = yaml.safe_load(hydra_config.read_text())["phase"].get("load_checkpoint", "") if hydra_config.is_file() else ""
    return str(Path(base).resolve()) if base and is_hf_folder(Path(base)) else ""


def export_run(run_dir: Path, out_dir: Path, base_model: str = "") -> list[Path]:
    """A phase=lora run's newest adapters as a PEFT folder, naming the Hugging Face base they go on."""
    from qwen15_exp.weights.lora import adapters_of_run, run_pet_config
    if out_dir.suffix:
        raise UserError(f"output={out_dir}: a PEFT adapter is a folder; give a folder name without a suffix")
    adapters, _ = adapters_of_run(run_dir)
    base = hf_base_of(run_dir, base_model)
    files = export_peft(adapters, out_dir, base, run_pet_config(run_dir).get("lora_dropout", 0.0))
    print(f"exported {len(adapters.pairs)} LoRA adapter pairs (alpha {adapters.alpha}, rank {adapters.rank}) and "
          f"{len(adapters.extras)} trained tensors of {adapters.source} in PEFT format")
    print(f"base_model_name_or_path: {base}" if base else
          "base_model_name_or_path: empty - the run's base weights are no Hugging Face folder; convert them with "
          "direction=mf2hf and export again with base_model=<that folder>")
    return files
