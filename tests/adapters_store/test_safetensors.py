"""The hand-written safetensors header check refuses corrupt files before the library reads them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters_store import AdapterError
from adapters_store.safetensors_check import check_header, load_checked, refuse_pickles


def _write(path: Path, header: dict, data: bytes, *, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_valid_file_roundtrips(tmp_path: Path) -> None:
    p = tmp_path / "ok.safetensors"
    save_file({"a": torch.randn(3, 4), "b": torch.randn(2, dtype=torch.float16)}, str(p), metadata={"k": "v"})
    infos = check_header(p)
    assert infos["a"].shape == (3, 4) and infos["b"].dtype == "F16"
    out = load_checked(p)
    assert out["b"].dtype == torch.float32 and out["a"].shape == (3, 4)


def test_hand_built_valid_file(tmp_path: Path) -> None:
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    p = _write(tmp_path / "x.safetensors", {"t": _entry("F32", [2, 3], 0, 24)}, data)
    assert load_checked(p)["t"].tolist() == [[0, 1, 2], [3, 4, 5]]


CORRUPT = {
    "header_past_eof": ({"t": _entry("F32", [1], 0, 4)}, b"\0" * 4, 10_000, "runs past the end"),
    "bad_json": (None, b"", None, "not valid JSON"),
    "shape_length_mismatch": ({"t": _entry("F32", [2, 3], 0, 20)}, b"\0" * 20, None, "needs 24 bytes"),
    "offset_past_data": ({"t": _entry("F32", [2], 0, 8)}, b"\0" * 4, None, "past the data area"),
    "overlap": ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, b"\0" * 12, None, "overlaps"),
    "gap": ({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, b"\0" * 12, None, "belong to no"),
    "trailing_bytes": ({"a": _entry("F32", [1], 0, 4)}, b"\0" * 8, None, "belong to no tensor"),
    "unknown_dtype": ({"t": _entry("F128", [1], 0, 16)}, b"\0" * 16, None, "unknown dtype 'F128'"),
    "negative_shape": ({"t": _entry("F32", [-1], 0, 4)}, b"\0" * 4, None, "invalid shape"),
    "reversed_offsets": ({"t": _entry("F32", [0], 4, 0)}, b"\0" * 4, None, "invalid data_offsets"),
    "extra_field": ({"t": {**_entry("F32", [1], 0, 4), "x": 1}}, b"\0" * 4, None, "exactly dtype"),
    "bad_metadata": ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_files_refused(case: str, tmp_path: Path) -> None:
    header, data, length, needle = CORRUPT[case]
    p = tmp_path / "bad.safetensors"
    if header is None:
        raw = b"{not json"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    else:
        _write(p, header, data, length=length)
    with pytest.raises(AdapterError, match="not a valid safetensors file") as info:
        load_checked(p)
    assert needle in str(info.value)
    assert info.value.field == "adapter_model.safetensors"


def test_too_short_and_duplicate_keys(tmp_path: Path) -> None:
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\1\2")
    with pytest.raises(AdapterError, match="too short"):
        check_header(p)
    raw = b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t": {"dtype": "F32", "shape": [1], ' \
          b'"data_offsets": [0, 4]}}'
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(AdapterError, match="duplicate key"):
        check_header(p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_refused(bad: float, dtype: torch.dtype, tmp_path: Path) -> None:
    t = torch.zeros(4, 4, dtype=dtype)
    t[1, 2] = bad
    p = tmp_path / "nan.safetensors"
    save_file({"w": t}, str(p))
    with pytest.raises(AdapterError, match="NaN/Inf") as info:
        load_checked(p)
    assert info.value.field == "w"


def test_integer_tensors_refused(tmp_path: Path) -> None:
    p = tmp_path / "int.safetensors"
    save_file({"w": torch.zeros(2, dtype=torch.int64)}, str(p))
    with pytest.raises(AdapterError, match="dtype I64"):
        load_checked(p)


@pytest.mark.parametrize("name", ["adapter_model.bin", "x.PT", "a.pth", "b.pkl", "c.ckpt", "d.pickle"])
def test_pickles_refused(name: str) -> None:
    with pytest.raises(AdapterError, match="pickled") as info:
        refuse_pickles(["adapter_config.json", name])
    assert name in str(info.value)
