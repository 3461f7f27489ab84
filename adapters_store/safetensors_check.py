"""Check a safetensors file by hand before the library sees it; refuse pickles without opening them.

Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data area. Each tensor
entry names a dtype, a shape and [begin, end) offsets into the data area; we require the entries to
tile the data area exactly (no overlap, no gap, no trailing bytes), as the format promises.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from adapters_store.errors import AdapterError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def refuse_pickles(names: Iterable[str]) -> None:
    """Raise AdapterError if any file name looks like a pickle (loading those runs code)."""
    for name in names:
        if name in ("pytorch_adapter.bin", "pytorch_model_head.bin"):  # AdapterHub's default (pickled) save
            raise AdapterError(
                f"file {name!r} is a pickled checkpoint, which can run code when loaded; re-save the adapter with "
                "model.save_adapter(dir, name, use_safetensors=True) to get adapter.safetensors",
                field="files", status=422,
            )
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterError(
                f"file {name!r} is a pickled checkpoint, which can run code when loaded; "
                "upload adapter_model.safetensors instead (PeftModel.save_pretrained writes it by default)",
                field="files", status=422,
            )


def _bad(msg: str, name: str) -> AdapterError:
    return AdapterError(f"{name} is not a valid safetensors file: {msg}", field=name)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def check_header(path: str | Path, *, name: str = "adapter_model.safetensors") -> dict[str, TensorInfo]:
    """Validate the header of the safetensors file at `path` against its size; return its tensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(f"file is {size} bytes, too short for the 8-byte header length", name)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _bad(f"header length {n} runs past the end of the file ({size} bytes)", name)
        if n > MAX_HEADER_BYTES:
            raise _bad(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes", name)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"header is not valid JSON ({e})", name) from None
    if not isinstance(header, dict):
        raise _bad("header is not a JSON object", name)

    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _bad("__metadata__ must map strings to strings", name)
            continue
        tensors[key] = _check_entry(key, entry, name)

    pos = 0
    for key, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.end > data_len:
            raise _bad(f"tensor {key!r} ends at byte {t.end}, past the data area ({data_len} bytes)", name)
        if t.begin < pos:
            raise _bad(f"tensor {key!r} at bytes [{t.begin}, {t.end}) overlaps the previous tensor", name)
        if t.begin > pos:
            raise _bad(f"bytes [{pos}, {t.begin}) before tensor {key!r} belong to no tensor", name)
        pos = t.end
    if pos != data_len:
        raise _bad(f"bytes [{pos}, {data_len}) at the end of the data area belong to no tensor", name)
    return tensors


def _ints_ok(xs: object) -> bool:
    return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)


def _check_entry(key: str, entry: object, name: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad(f"tensor {key!r} must have exactly dtype, shape and data_offsets", name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise _bad(f"tensor {key!r} has unknown dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}", name)
    if not _ints_ok(shape):
        raise _bad(f"tensor {key!r} has invalid shape {shape!r}", name)
    if not _ints_ok(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _bad(f"tensor {key!r} has invalid data_offsets {offsets!r}", name)
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if nbytes != offsets[1] - offsets[0]:
        raise _bad(
            f"tensor {key!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes but its offsets "
            f"{offsets} span {offsets[1] - offsets[0]}",
            name,
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def load_checked(path: str | Path, *, name: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    """Check the file, load it on CPU, and refuse non-float or non-finite tensors. Returns fp32 tensors."""
    infos = check_header(path, name=name)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in infos:
                out[key] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as e:  # the library's own checks, should ours have missed something
        raise _bad(str(e), name) from None
    for key, info in infos.items():
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterError(
                f"tensor {key!r} has dtype {info.dtype}; adapter weights must be F32, F16, BF16 or F64",
                field=key,
            )
        t = out[key].to(torch.float32)
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(f"tensor {key!r} holds {bad} NaN/Inf values; weights must be finite", field=key)
        out[key] = t
    return out
