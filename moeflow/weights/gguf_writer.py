"""A GGUF v3 writer: metadata, tensor infos, then each tensor's bytes streamed from a callback
(32-byte aligned), so files larger than memory can be written. The format follows the gguf spec
(llama.cpp docs/gguf.md); the code is our own. Used to write random-weight benchmark models."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType
from moeflow.weights.gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # torch order (rows first); written reversed as GGUF `ne`
    ggml_type: GGMLType
    nbytes: int
    data: Callable[[], np.ndarray]  # the tensor's bytes, produced when written


def tensor_nbytes(shape: Sequence[int], ggml_type: GGMLType) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    if shape[-1] % block:
        raise ValueError(f"a row of {shape[-1]} values is not whole {ggml_type.name} blocks")
    return int(np.prod(shape)) // block * size


class GGUFWriter:
    def __init__(self) -> None:
        self._kv: list[tuple[str, GGUFValueType, Any, GGUFValueType | None]] = []
        self._tensors: list[_Tensor] = []

    def add(self, key: str, value: Any, vtype: GGUFValueType | None = None) -> None:
        """One metadata value; ints are UINT32 and floats FLOAT32 unless `vtype` says (for an
        array, `vtype` is its element type)."""
        if isinstance(value, list | tuple):
            item = vtype or (_infer_type(value[0]) if value else GGUFValueType.UINT32)
            self._kv.append((key, GGUFValueType.ARRAY, list(value), item))
        else:
            self._kv.append((key, vtype or _infer_type(value), value, None))

    def add_tensor(
        self,
        name: str,
        shape: Sequence[int],
        ggml_type: GGMLType,
        data: Callable[[], np.ndarray],
    ) -> None:
        nbytes = tensor_nbytes(shape, ggml_type)
        self._tensors.append(_Tensor(name, tuple(shape), ggml_type, nbytes, data))

    def write(self, path: str | Path, with_data: bool = True) -> int:
        """Write the file; returns its size in bytes. Without data the tensors' bytes are a hole
        of their full size (a sparse file: a real model's layout on a few MB of disk, for what
        must read the header only)."""
        align = GGUF_DEFAULT_ALIGNMENT
        offsets, offset = [], 0
        for t in self._tensors:
            offsets.append(offset)
            offset += -(-t.nbytes // align) * align
        with open(path, "wb") as f:
            f.write(GGUF_MAGIC)
            f.write(struct.pack("<IQQ", 3, len(self._tensors), len(self._kv)))
            for key, vtype, value, item in self._kv:
                _write_string(f, key)
                f.write(struct.pack("<I", vtype))
                if vtype == GGUFValueType.ARRAY:
                    assert item is not None
                    f.write(struct.pack("<IQ", item, len(value)))
                    for v in value:
                        _write_value(f, item, v)
                else:
                    _write_value(f, vtype, value)
            for t, off in zip(self._tensors, offsets, strict=True):
                _write_string(f, t.name)
                f.write(struct.pack("<I", len(t.shape)))
                f.write(struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape)))
                f.write(struct.pack("<IQ", t.ggml_type, off))
            f.write(b"\0" * (-f.tell() % align))
            if not with_data:
                f.truncate(f.tell() + offset)
                return f.tell() + offset
            for t in self._tensors:
                data = np.ascontiguousarray(t.data()).view(np.uint8).reshape(-1)
                if data.size != t.nbytes:
                    raise ValueError(f"{t.name}: {data.size} bytes, expected {t.nbytes}")
                data.tofile(f)
                f.write(b"\0" * (-t.nbytes % align))
            return f.tell()


def _infer_type(value: Any) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    raise TypeError(f"no GGUF type for {type(value).__name__}")


def _write_string(f: Any, s: str) -> None:
    raw = s.encode("utf-8")
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def _write_value(f: Any, vtype: GGUFValueType, value: Any) -> None:
    if vtype == GGUFValueType.STRING:
        _write_string(f, value)
    else:
        f.write(struct.pack(_SCALAR_FORMATS[vtype], value))
