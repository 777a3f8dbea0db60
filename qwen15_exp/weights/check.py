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
    return {}                          # a folder of rank_* checkpoints: MindFormers checks it itself


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
