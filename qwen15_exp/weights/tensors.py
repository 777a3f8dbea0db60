"""Streaming safetensors I/O: one tensor in memory at a time.

Tensors are read one at a time from the file (by offset) and written one at a time behind a header computed
from shapes alone, so converting a checkpoint holds one tensor in memory, not the model. bf16 has no numpy
dtype: it travels as uint16 bit patterns and is widened/narrowed exactly (round to nearest even).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ST_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2), "I32": (np.int32, 4),
             "I64": (np.int64, 8), "F64": (np.float64, 8)}
NAMES = {"fp32": "F32", "float32": "F32", "fp16": "F16", "float16": "F16", "bf16": "BF16", "bfloat16": "BF16"}

@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    dtype: str              # safetensors dtype code
    shape: tuple
    begin: int              # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> list[TensorRef]:
    """The tensors of a safetensors file; a file shorter than its header says (truncated) is a ValueError."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size:
            raise ValueError(f"header length {n} is more than the file's {size} bytes")
        header = json.loads(f.read(n))
    base = 8 + n
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        refs.append(TensorRef(name, path, info["dtype"], tuple(info["shape"]), base + a, base + b))
    if refs and max(r.end for r in refs) > size:
        raise ValueError(f"truncated: the header describes {max(r.end for r in refs)} bytes, the file has {size}")
    return refs


def hf_tensors(folder_or_file: Path) -> list[TensorRef]:
    """Every tensor of a Hugging Face checkpoint: one .safetensors, or a folder (sharded with its index)."""
    p = Path(folder_or_file)
    if p.is_file():
        return read_header(p)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [r for f in files for r in read_header(p / f)]
    files = sorted(p.glob("*.safetensors"))
    return [r for f in files for r in read_header(f)]


def load_array(ref: TensorRef) -> np.ndarray:
    dtype, _ = ST_DTYPES[ref.dtype]
    with open(ref.file, "rb") as f:
        f.seek(ref.begin)
        buf = f.read(ref.nbytes)
    return np.frombuffer(buf, dtype=dtype).reshape(ref.shape)


@dataclass(frozen=True)
class Loaded:
    """A tensor already in memory (MindSpore reads a .ckpt whole), used like a TensorRef."""
    name: str
    dtype: str              # safetensors dtype code
    array: np.ndarray

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes


def tensor_array(ref) -> np.ndarray:
    """The values of a TensorRef (read now) or a Loaded tensor."""
    return ref.array if isinstance(ref, Loaded) else load_array(ref)


def checkpoint_tensors(src: Path) -> list:
    """The tensors of a MindFormers checkpoint: TensorRefs of a .safetensors (read one at a time when used),
    Loaded tensors of a .ckpt (bf16 as bit patterns, like safetensors)."""
    src = Path(src)
    if src.suffix == ".safetensors":
        return read_header(src)
    if src.suffix == ".ckpt":
        import mindspore as ms
        out = []
        for name, p in ms.load_checkpoint(str(src)).items():
            t = p.value() if hasattr(p, "value") else p
            if t.dtype == ms.bfloat16:
                out.append(Loaded(name, "BF16", f32_to_bf16(t.astype(ms.float32).asnumpy())))
            else:
                arr = t.asnumpy()
                code = {"float32": "F32", "float16": "F16", "int32": "I32", "int64": "I64",
                        "float64": "F64"}.get(str(arr.dtype))
                if code:
                    out.append(Loaded(name, code, arr))
        return out
    from qwen15_exp.errors import UserError
    raise UserError(f"{src}: give a MindFormers .safetensors or .ckpt file")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def cast(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Between safetensors dtype codes; bf16 arrays are uint16 bit patterns."""
    if src == dst:
        return array
    as_f32 = bf16_to_f32(array) if src == "BF16" else array.astype(np.float32)
    if dst == "BF16":
        return f32_to_bf16(as_f32)
    return as_f32.astype(ST_DTYPES[dst][0])


def write_streaming(path: Path, items: list[tuple[str, str, tuple]], produce, metadata: dict | None = None,
                    progress=None) -> Path:
    """Write a safetensors file: header from (name, dtype, shape), then produce(name) for each, in order."""
    from qwen15_exp.atomic import atomic_path
    header, offset = {}, 0
    for name, dtype, shape in items:
        size = int(np.prod(shape, dtype=np.int64)) * ST_DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                  # the format aligns the data to 8 bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in items:
            array = produce(name)
            if array.dtype.itemsize != ST_DTYPES[dtype][1] or tuple(array.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {array.dtype}{array.shape}, header says {dtype}{shape}")
            f.write(memoryview(np.ascontiguousarray(array)).cast("B"))   # no copy
            if progress is not None:
                progress.update(1)
    return path
