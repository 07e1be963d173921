"""Bounds-checked safetensors reader: mmap, validate the header, hand out zero-copy tensor views.
Every malformed file raises one ModelFormatError; nothing in a checkpoint is ever executed."""

from __future__ import annotations

import json
import mmap
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import torch

from moeflow.errors import ModelFormatError, ModelNotFoundError
from moeflow.utils import is_int

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_INDEX_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ITEMSIZE: dict[str, int] = {k: torch.empty(0, dtype=v).element_size() for k, v in _DTYPES.items()}


class _TensorInfo:
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.dtype = dtype
        self.shape = shape
        self.begin = begin
        self.end = end


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped read-only; `get` returns views over the map.

    NOTE: the tensors returned by `get` share the read-only mapping and keep it alive after
    `close()`; they must not be written in place (copy or move them to a device first).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._mmap: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise self._error(
                        f"file is {size} bytes, shorter than the 8-byte header length"
                    )
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > MAX_HEADER_BYTES:
                    raise self._error(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
                if header_len > size - 8:
                    raise self._error(
                        f"header length {header_len} exceeds the {size - 8} bytes after it"
                    )
                header_bytes = f.read(header_len)
                if len(header_bytes) != header_len:
                    raise self._error("file shrank while reading the header")
                self._data_start = 8 + header_len
                data_len = size - self._data_start
                self._metadata, self._infos = self._parse_header(header_bytes, data_len)
                # An empty data section can still be mapped: the file itself is never empty here.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError as e:
            raise ModelNotFoundError(f"{self.path}: no such file") from e
        except OSError as e:
            raise self._error(f"cannot read: {e}") from e
        if len(self._mmap) != size:
            raise self._error("file changed size while opening")

    # ---- public API ----------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, str]:
        """The optional `__metadata__` string map (empty when absent)."""
        return dict(self._metadata)

    def keys(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return list(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._infos))

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of tensor `name` without mapping its data."""
        return _DTYPES[self._info(name).dtype]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name` without mapping its data."""
        return self._info(name).shape

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as a zero-copy, read-only view over the mapped file.

        A tensor whose data is not aligned to its element size is copied instead.
        """
        info = self._info(name)
        if self._mmap is None:
            raise ValueError(f"{self.path}: file is closed")
        dtype = _DTYPES[info.dtype]
        nbytes = info.end - info.begin
        if nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        offset = self._data_start + info.begin
        with warnings.catch_warnings():
            # torch warns that the mapping is not writable; the NOTE on the class covers it.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(self._mmap, dtype=torch.uint8, count=nbytes, offset=offset)
        if offset % _ITEMSIZE[info.dtype] != 0:
            raw = raw.clone()
        return raw.view(dtype).reshape(info.shape)

    def close(self) -> None:
        """Drop this object's reference to the mapping; views already handed out stay valid."""
        # NOTE: never mmap.close(): torch.frombuffer keeps the mmap object alive, not its
        # buffer export, so closing it would unmap memory under live tensors.
        self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self._infos)} tensors)"

    # ---- validation ----------------------------------------------------------------------
    def _error(self, reason: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {reason}")

    def _info(self, name: str) -> _TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _parse_header(
        self, header_bytes: bytes, data_len: int
    ) -> tuple[dict[str, str], dict[str, _TensorInfo]]:
        try:
            header = json.loads(
                header_bytes.decode("utf-8"),
                object_pairs_hook=_no_duplicate_keys,
                parse_constant=_reject_constant,
            )
        except (ValueError, RecursionError) as e:
            raise self._error(f"header is not valid JSON: {_short(e)}") from None
        if not isinstance(header, dict):
            raise self._error(f"header is a JSON {type(header).__name__}, not an object")

        metadata: dict[str, str] = {}
        raw_meta = header.pop("__metadata__", None)
        if raw_meta is not None:
            if not isinstance(raw_meta, dict) or not all(
                isinstance(v, str) for v in raw_meta.values()
            ):
                raise self._error("__metadata__ must be an object of string values")
            metadata = raw_meta

        infos: list[tuple[str, _TensorInfo]] = []
        for name, entry in header.items():
            infos.append((name, self._parse_entry(name, entry, data_len)))

        # Tensors sorted by offset must not overlap (empty tensors occupy no bytes).
        infos.sort(key=lambda item: (item[1].begin, item[1].end))
        prev_end, prev_name = 0, ""
        for name, info in infos:
            if info.end == info.begin:
                continue
            if info.begin < prev_end:
                raise self._error(f"tensor {name!r} overlaps tensor {prev_name!r}")
            prev_end, prev_name = info.end, name
        return metadata, dict(infos)

    def _parse_entry(self, name: str, entry: object, data_len: int) -> _TensorInfo:
        if not isinstance(entry, dict):
            raise self._error(f"tensor {name!r}: entry is not an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise self._error(f"tensor {name!r}: unsupported dtype {_short(dtype)}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise self._error(f"tensor {name!r}: shape must be a list of non-negative integers")
        offsets = entry.get("data_offsets")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
        ):
            raise self._error(f"tensor {name!r}: data_offsets must be two integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise self._error(
                f"tensor {name!r}: data_offsets [{begin}, {end}] outside the data section "
                f"of {data_len} bytes"
            )
        nbytes = _checked_nbytes(shape, _ITEMSIZE[dtype], limit=data_len)
        if nbytes is None or nbytes != end - begin:
            raise self._error(
                f"tensor {name!r}: shape {_short(shape)} x {dtype} does not match "
                f"the {end - begin} bytes of its data_offsets"
            )
        return _TensorInfo(dtype, tuple(shape), begin, end)


def iter_folder_tensors(folder: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every weight of an HF folder's safetensors checkpoint.

    Looks for `model.safetensors`, then `model.safetensors.index.json` (its shards), then any
    `*.safetensors`. Tensors are zero-copy read-only views (see SafetensorsFile).
    """
    for st, name in _iter_folder(folder):
        yield name, st.get(name)


def iter_folder_headers(
    folder: str | os.PathLike[str],
) -> Iterator[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Yield (name, dtype, shape) for the tensors iter_folder_tensors yields, in the same order,
    reading only the headers (the memory plan, loading/memory_plan.py)."""
    for st, name in _iter_folder(folder):
        yield name, st.dtype(name), st.shape(name)


def _iter_folder(folder: str | os.PathLike[str]) -> Iterator[tuple[SafetensorsFile, str]]:
    """(open file, tensor name) for every weight of the folder's checkpoint."""
    root = Path(folder)
    if not root.is_dir():
        raise ModelNotFoundError(f"{root}: not a directory")
    single = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    if single.is_file():
        yield from _iter_file(single)
    elif index.is_file():
        yield from _iter_index(root, index)
    else:
        files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
        if not files:
            raise ModelNotFoundError(f"{root}: no .safetensors files")
        for path in files:
            yield from _iter_file(path)


def _iter_file(path: Path) -> Iterator[tuple[SafetensorsFile, str]]:
    with SafetensorsFile(path) as st:
        for name in st:
            yield st, name


def _iter_index(root: Path, index: Path) -> Iterator[tuple[SafetensorsFile, str]]:
    weight_map = _read_weight_map(index)
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    for shard, names in shards.items():
        path = root / shard
        if not path.is_file():
            raise ModelFormatError(f"{index}: shard {shard!r} is missing")
        with SafetensorsFile(path) as st:
            missing = [n for n in names if n not in st]
            if missing:
                raise ModelFormatError(
                    f"{index}: {len(missing)} tensors mapped to {shard!r} are not in it, "
                    f"e.g. {missing[0]!r}"
                )
            wanted = set(names)
            for name in st:
                if name in wanted:
                    yield st, name


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise ModelFormatError(f"{index}: larger than {MAX_INDEX_BYTES} bytes")
        with open(index, "rb") as f:
            data = json.loads(f.read(MAX_INDEX_BYTES + 1).decode("utf-8"))
    except OSError as e:
        raise ModelFormatError(f"{index}: cannot read: {e}") from e
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{index}: not valid JSON: {_short(e)}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{index}: weight_map must be a non-empty object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _is_plain_file_name(shard):
            raise ModelFormatError(
                f"{index}: tensor {name!r} maps to {_short(shard)}, not a plain file name "
                "inside the folder"
            )
    return weight_map


def _is_plain_file_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and ":" not in name
        and os.path.basename(name) == name
    )


def _checked_nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """numel * itemsize, or None once it provably exceeds `limit` (no huge intermediates)."""
    if 0 in shape:
        return 0
    total = itemsize
    for dim in shape:
        total *= dim
        if total > limit:
            return None
    return total


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
