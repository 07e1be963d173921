"""SafetensorsFile and iter_folder_tensors: round trips against the safetensors package, and
hostile files that must each raise one ModelFormatError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from moeflow.errors import ModelFormatError, ModelNotFoundError
from moeflow.weights.safetensors import SafetensorsFile, iter_folder_tensors

save_file = pytest.importorskip("safetensors.torch").save_file


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "f8e4m3": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "f8e5m2": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "i16": torch.arange(5, dtype=torch.int16),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(
        a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
        b.view(torch.uint8) if b.dtype.itemsize == 1 else b,
    )


def test_round_trip_all_dtypes(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with SafetensorsFile(path) as st:
        assert sorted(st.keys()) == sorted(tensors)
        assert st.metadata == {"format": "pt"}
        for name, ref in tensors.items():
            assert st.dtype(name) == ref.dtype and st.shape(name) == tuple(ref.shape)
            _assert_same(st.get(name), ref)
    # Views stay valid after close (the mapping lives as long as the tensors).
    st2 = SafetensorsFile(path)
    view = st2.get("f32")
    st2.close()
    del st2
    assert torch.equal(view, tensors["f32"])
    assert torch.equal(dict(iter_folder_tensors(tmp_path))["i64"], tensors["i64"])


def test_sharded_folder_with_index(tmp_path: Path) -> None:
    tensors = {f"layers.{i}.weight": torch.full((2, i + 1), float(i)) for i in range(6)}
    shards = {
        "model-00001-of-00002.safetensors": [0, 1, 2],
        "model-00002-of-00002.safetensors": [3, 4, 5],
    }
    weight_map = {}
    for shard, ids in shards.items():
        save_file(
            {f"layers.{i}.weight": tensors[f"layers.{i}.weight"] for i in ids},
            str(tmp_path / shard),
        )
        weight_map.update({f"layers.{i}.weight": shard for i in ids})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = dict(iter_folder_tensors(tmp_path))
    assert loaded.keys() == tensors.keys()
    for name, ref in tensors.items():
        assert torch.equal(loaded[name], ref)


def test_glob_fallback_and_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        list(iter_folder_tensors(tmp_path))
    with pytest.raises(ModelNotFoundError):
        list(iter_folder_tensors(tmp_path / "nope"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "b.safetensors"))
    assert [n for n, _ in iter_folder_tensors(tmp_path)] == ["a", "b"]


# ---- hostile files --------------------------------------------------------------------------
def _raw_file(
    path: Path, header: object | bytes, data: bytes = b"", header_len: int | None = None
) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def _entry(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict[str, object]:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def test_truncated_at_every_point(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(3, 4), "b": torch.arange(10, dtype=torch.int16)}, str(good))
    blob = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in range(len(blob)):
        bad.write_bytes(blob[:cut])
        with pytest.raises(ModelFormatError):
            SafetensorsFile(bad)


@pytest.mark.parametrize(
    ("header", "data", "header_len", "reason"),
    [
        ({"a": _entry()}, b"\0" * 8, 1 << 62, "header length"),
        ({"a": _entry()}, b"\0" * 8, 200 * 1024 * 1024, "header length"),
        (b"{not json", b"", None, "JSON"),
        (b"\xff\xfe{}", b"", None, "JSON"),
        (b"[1, 2]", b"", None, "not an object"),
        (b'{"a": NaN}', b"", None, "JSON"),
        (b'{"a": 1, "a": 2}', b"", None, "JSON"),
        (b"[" * 100000, b"", None, "JSON"),
        ({"a": _entry(dtype="F4")}, b"\0" * 8, None, "dtype"),
        ({"a": _entry(dtype=7)}, b"\0" * 8, None, "dtype"),
        ({"a": _entry(offsets=(0, 16))}, b"\0" * 8, None, "outside"),
        ({"a": _entry(offsets=(-8, 0))}, b"\0" * 8, None, "outside"),
        ({"a": _entry(offsets=(8, 0))}, b"\0" * 8, None, "outside"),
        ({"a": _entry(offsets=[0])}, b"\0" * 8, None, "data_offsets"),
        ({"a": _entry(offsets=[0.0, 8.0])}, b"\0" * 8, None, "data_offsets"),
        ({"a": _entry(shape=(3,))}, b"\0" * 8, None, "does not match"),
        ({"a": _entry(shape=(1 << 40, 1 << 40, 1 << 40))}, b"\0" * 8, None, "does not match"),
        ({"a": _entry(shape=(-2, -1))}, b"\0" * 8, None, "shape"),
        ({"a": _entry(shape=(True, 2))}, b"\0" * 8, None, "shape"),
        ({"a": _entry(shape="2")}, b"\0" * 8, None, "shape"),
        ({"a": [1, 2]}, b"\0" * 8, None, "not an object"),
        ({"a": _entry(), "b": _entry(offsets=(4, 12))}, b"\0" * 12, None, "overlaps"),
        ({"a": _entry(), "b": _entry()}, b"\0" * 8, None, "overlaps"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
        ({"__metadata__": [1]}, b"", None, "__metadata__"),
    ],
)
def test_hostile_headers(
    tmp_path: Path, header: object, data: bytes, header_len: int | None, reason: str
) -> None:
    path = _raw_file(tmp_path / "x.safetensors", header, data, header_len)
    with pytest.raises(ModelFormatError, match=reason) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_hand_written_file_is_accepted(tmp_path: Path) -> None:
    # Unaligned data (header of odd length) is copied, not viewed; values still match.
    data = struct.pack("<2f", 1.5, -2.0) + struct.pack("<h", 7)
    header = {
        "b": _entry("I16", (1,), (8, 10)),
        "a": _entry(),
        "e": _entry("F16", (0, 3), (10, 10)),
    }
    body = json.dumps(header).encode()
    body += b" " * ((1 - 8 - len(body)) % 4)  # data section starts at 1 mod 4
    path = _raw_file(tmp_path / "x.safetensors", body, data)
    with SafetensorsFile(path) as st:
        assert st.keys() == ["a", "b", "e"]
        assert st.get("a").tolist() == [1.5, -2.0]
        assert st.get("b").tolist() == [7]
        assert st.get("e").shape == (0, 3)


@pytest.mark.parametrize(
    "shard", ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "", 3]
)
def test_index_path_traversal(tmp_path: Path, shard: object) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(ModelFormatError, match="plain file name"):
        list(iter_folder_tensors(tmp_path))


@pytest.mark.parametrize(
    "index",
    ['{"weight_map": {"a": "missing.safetensors"}}', "not json", "[]", '{"weight_map": {}}'],
)
def test_bad_index(tmp_path: Path, index: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ModelFormatError):
        list(iter_folder_tensors(tmp_path))


def test_index_names_missing_tensor(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s.safetensors"))
    weight_map = {"a": "s.safetensors", "b": "s.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelFormatError, match="not in it"):
        list(iter_folder_tensors(tmp_path))
