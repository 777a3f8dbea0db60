"""Do these weights fit this model? Checked tensor by tensor before anything is built.

Every network tensor's shape follows from the model config (MindFormers' Llama names). A checkpoint given to
a run, chat or the converter is read for its names and shapes only (a safetensors header; a .ckpt is parsed
by MindSpore), and a file that is unreadable or holds another model is a UserError that names the file, the
first differences and the model size the file looks like.
"""
from __future__ import annotations

from pathlib import Path

from qwen15_exp.errors import UserError
from qwen15_exp.weights.shapes import expected_shapes


def is_hf_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _unreadable(path: Path, why: str) -> UserError:
    return UserError(f"{path} cannot be read as weights ({why}); it may be truncated or not a checkpoint: copy it "
                     "again, or point phase.load_checkpoint at another file")


def tensor_shapes(path: Path) -> dict[str, tuple]:
    """MindFormers name -> shape of the network tensors in a checkpoint file or Hugging Face folder."""
    from qwen15_exp.weights.names import HF_TO_MF, rename
    from qwen15_exp.weights.tensors import hf_tensors, read_header
    path = Path(path)
    try:
        if is_hf_folder(path):
            return {rename(r.name, HF_TO_MF): tuple(r.shape) for r in hf_tensors(path)
                    if rename(r.name, HF_TO_MF)}
        if path.suffix == ".safetensors":
            return {r.name: tuple(r.shape) for r in read_header(path)}
        if path.suffix == ".ckpt":
            import mindspore as ms
            return {name: tuple(p.shape) for name, p in ms.load_checkpoint(str(path)).items()}
    except UserError:
        raise
    except Exception as e:             # struct/JSON/protobuf errors of a damaged file
        raise _unreadable(path, f"{type(e).__name__}: {str(e)[:200]}") from None
    if path.is_dir() and not any(d.is_dir() for d in path.glob("rank_*")):
        raise not_weights_folder(path)
    return {}                          # a folder of rank_* checkpoints: MindFormers checks it itself


def not_weights_folder(path: Path) -> UserError:
    """A folder that is none of the weights folders a run takes, saying what it lacks."""
    has_config, has_tensors = (path / "config.json").is_file(), any(path.glob("*.safetensors"))
    if has_tensors and not has_config:
        why = "it holds *.safetensors but no config.json (a Hugging Face folder needs both)"
    elif has_config and not has_tensors:
        why = "it holds config.json but no *.safetensors (a Hugging Face folder needs both)"
    else:
        why = "it holds neither a Hugging Face model (config.json + *.safetensors) nor rank_* checkpoint folders"
    return UserError(f"{path} is not a weights folder: {why}; give a checkpoint file, a Hugging Face folder, a "
                     "folder of rank_* folders or the dir of an earlier run")


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from a file people hand us, or a UserError naming it (damaged, nested beyond reason, or not
    an object)."""
    import json
    try:
        value = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not a readable {what} ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a {what} (a JSON object is expected, found {type(value).__name__})")
    return value


# config.json keys of a Qwen2ForCausalLM and the ModelConfig fields they must equal
HF_CONFIG_KEYS = (("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
                  ("num_attention_heads", "num_heads"), ("intermediate_size", "intermediate_size"),
                  ("vocab_size", "vocab_size"))


def check_hf_config(folder: Path, model) -> None:
    """A Hugging Face folder's config.json read and held against the chosen model: a Qwen2 model of the same
    shape (its tensors are checked next). A config that is damaged or names another model is a UserError."""
    config = read_json_file(folder / "config.json", "Hugging Face config.json")
    if config.get("model_type") not in (None, "qwen2"):
        raise UserError(f"{folder}/config.json says model_type={config.get('model_type')!r}: Qwen1.5 weights are "
                        "model_type qwen2 (Qwen2ForCausalLM)")
    wrong = []
    for key, field in HF_CONFIG_KEYS + (("num_key_value_heads", None),):
        value = config.get(key)
        want = (model.n_kv_heads or model.num_heads) if field is None else getattr(model, field)
        if value is None:
            continue                       # not stated (num_key_value_heads defaults to the heads): the tensors say
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{folder}/config.json: {key} is {value!r}, not a whole number; the file is damaged")
        if value != want:
            wrong.append(f"{key} {value} (model={model.name}: {want})")
    if wrong:
        raise UserError(f"{folder}/config.json does not describe model={model.name}: {'; '.join(wrong)}. Choose the "
                        "model=<size> the folder holds")


def looks_like(shapes: dict[str, tuple]) -> str:
    """The model options whose shapes the file has, e.g. 'model=tiny'."""
    from qwen15_exp.compose import group_options, load_group_option
    from qwen15_exp.schema import ModelConfig
    names = []
    for option in group_options("model"):
        model = load_group_option("model", option, ModelConfig)
        want = expected_shapes(model)
        if all(shapes.get(k) == s for k, s in want.items()):
            names.append(f"model={option}")
    return " or ".join(names)


def check_fits(path: str, model) -> None:
    """Raise a UserError naming the differences when the weights at `path` are not `model`'s."""
    if is_hf_folder(Path(path)):
        check_hf_config(Path(path), model)
    shapes = tensor_shapes(Path(path))
    if not shapes:
        return
    want = expected_shapes(model)
    missing = [k for k in want if k not in shapes]
    wrong = [k for k in want if k in shapes and shapes[k] != want[k]]
    if not missing and not wrong:
        return
    examples = [f"{k} is {shapes[k]} there, {want[k]} in model={model.name}" for k in wrong[:2]]
    examples += [f"{k} is missing" for k in missing[:2 if not wrong else 1]]
    guess = looks_like(shapes)
    raise UserError(f"{path} does not fit model={model.name}: {len(wrong)} tensor(s) of another shape, {len(missing)} "
                    f"missing (e.g. {'; '.join(examples)}). "
                    + (f"The file looks like {guess}: use that. " if guess else "")
                    + "Choose the model=<size> (and model.n_kv_heads / tie_word_embeddings) the weights belong to.")
