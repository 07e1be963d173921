"""GGUF v2/v3 reader over read-only mmaps: bounds-checked header parsing, every tensor's extent
checked before any data is read, tensors handed out raw (zero-copy) or dequantised; a split set
(`name-00001-of-00003.gguf`, as llama.cpp's gguf-split writes it) read as one file. Executes
nothing from the file. Format read from llama.cpp's gguf docs and gguf-py (MIT); our own code."""

from __future__ import annotations

import dataclasses
import enum
import math
import mmap
import os
import re
import struct
import sys
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from moeflow.errors import ModelFormatError, ModelNotFoundError
from moeflow.utils import cdiv
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType, dequantize

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
# Header caps (docs/RELIABILITY.md, rule 3): well above any real model, far below a memory blow-up.
MAX_TENSORS = 1_000_000
MAX_KV = 1_000_000
MAX_ARRAY_LEN = 1 << 24
MAX_ARRAY_DEPTH = 8
MAX_KEY_LEN = 65_535
MAX_TENSOR_NAME_LEN = 4_096
MAX_DIMS = 4
MAX_DIM = 1 << 62
MAX_SPLITS = 65_535  # split.count is a u16
# The split keys gguf-split writes into every shard (the model's metadata is in the first only).
SPLIT_NO = "split.no"  # 0-based
SPLIT_COUNT = "split.count"
SPLIT_TENSORS_COUNT = "split.tensors.count"  # tensors over all shards
# `use_mmap=False` reads a tensor in spans of this many bytes, several at once
READ_CHUNK = 32 << 20
SHARD_NAME = re.compile(r"(?P<prefix>.*)-(?P<no>[0-9]{5})-of-(?P<count>[0-9]{5})\.gguf")


class GGUFValueType(enum.IntEnum):
    """Metadata value type ids (gguf spec `gguf_metadata_value_type`)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """One tensor's header entry; `shape` is torch order (GGUF `ne` reversed)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data_offset: int  # absolute byte offset in the file
    nbytes: int
    shard: int = 0  # index of the file of a split set that holds the data


class GGUFReader:
    """A parsed, validated GGUF file. Construction checks the whole header and every tensor's
    extent; tensor data is read lazily from the mmap by `raw()` / `load()`.

    Any shard of a split set opens the whole set: the shards are found by their file names
    (`<prefix>-NNNNN-of-MMMMM.gguf`, symlinks not followed to their targets' names), each is
    parsed and checked against the others (split.count, split.no, split.tensors.count), and
    `metadata` is the first shard's, `tensors` the union (`path` stays the path given).

    `use_mmap=False` (llama.cpp's --no-mmap): `raw()` reads each tensor's bytes from the file
    into memory of its own instead of handing out a view of the mapping (only the header is read
    through the mapping). Slower to load and never shared with other processes, but the kernels
    then read weights from the process's own memory, which some virtual machines serve faster
    than the page cache (docs/BENCHMARKS.md, "Weights in the process's own memory").

    Raises ModelNotFoundError when `path` does not exist and ModelFormatError (message starts
    with a path) for anything malformed or unsupported: a missing, repeated or foreign shard too.
    """

    def __init__(self, path: str | os.PathLike[str], use_mmap: bool = True) -> None:
        self.path = os.fspath(path)
        self.use_mmap = use_mmap
        self._mms: list[mmap.mmap] | None = None
        if sys.byteorder != "little":
            raise ModelFormatError(f"{self.path}: GGUF reading needs a little-endian host")
        mm = _map(self.path)
        self._mms = [mm]
        self.shard_paths = [self.path]  # the files of a split set, in order
        try:
            parsed = _parse_file(mm, self.path)
            self.version, self.metadata, self.tensors, self.alignment, self.data_start = parsed
            if SPLIT_COUNT in self.metadata or SPLIT_NO in self.metadata:
                self._open_split(mm, parsed)
        except (ModelFormatError, ModelNotFoundError):
            self.close()
            raise

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a 1-D uint8 view over the mmap (zero-copy), or with
        `use_mmap=False` a tensor of its own read from the file.

        NOTE: the view is read-only memory; writing to it crashes the process. Use `load()`
        for an owned tensor.
        """
        if not self.use_mmap:
            return self._read(self._info(name))
        return self._view(name)

    def _view(self, name: str) -> torch.Tensor:
        info = self._info(name)
        mm = self._require_open()[info.shard]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.frombuffer(
                mm, dtype=torch.uint8, count=info.nbytes, offset=info.data_offset
            )

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor dequantised to `dtype`, torch-order shape, in freshly allocated memory."""
        info = self._info(name)
        raw = self._view(name)
        try:
            out = dequantize(raw, info.ggml_type, info.shape, dtype)
        except ModelFormatError as e:
            raise ModelFormatError(f"{self.shard_paths[info.shard]}: tensor {name!r}: {e}") from e
        if out.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
            out = out.clone()  # never hand out a view of the read-only mapping
        return out

    def _read(self, info: GGUFTensorInfo) -> torch.Tensor:
        """The tensor's bytes read from its file into a new tensor (not through the mapping,
        whose pages would count in the process's resident memory beside the copy). A large
        tensor is read in READ_CHUNK spans by several threads: filling fresh memory is bound by
        its page faults, which the cores take in parallel (2 cores: ~4x one thread's rate, some
        virtual machines)."""
        self._require_open()
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        view = out.numpy().data  # a memoryview of its bytes
        path = self.shard_paths[info.shard]
        spans = [(a, min(info.nbytes, a + READ_CHUNK)) for a in range(0, info.nbytes, READ_CHUNK)]
        try:
            with open(path, "rb", buffering=0) as f:

                def read_span(span: tuple[int, int]) -> None:
                    a, b = span
                    while a < b:
                        n = os.preadv(f.fileno(), [view[a:b]], info.data_offset + a)
                        if n <= 0:
                            raise ModelFormatError(
                                f"{path}: tensor {info.name!r}: the file ended inside its bytes "
                                "(changed since it was opened?)"
                            )
                        a += n

                if len(spans) == 1:
                    read_span(spans[0])
                else:
                    threads = min(len(spans), os.cpu_count() or 1, 8)
                    with ThreadPoolExecutor(threads) as pool:
                        list(pool.map(read_span, spans))
        except OSError as e:
            raise ModelFormatError(f"{path}: tensor {info.name!r}: cannot read: {e}") from e
        return out

    def prefetch(self) -> int:
        """Ask the kernel to read every shard into the page cache ahead of use (madvise
        WILLNEED, as llama.cpp does on load): the reads run in the background, so the first
        prefill does not fault each expert in from disk. Returns the bytes advised (0 where the
        platform has no madvise)."""
        advised = 0
        for mm in self._require_open():
            try:
                mm.madvise(mmap.MADV_WILLNEED)
            except (AttributeError, OSError, ValueError):
                continue
            advised += len(mm)
        return advised

    def close(self) -> None:
        """Drop the reader's hold on the mapping: the file is unmapped once no view from `raw()`
        is alive (each view holds a reference to the mmap object).

        NOTE: never `mmap.close()` here: torch.frombuffer keeps a reference to the mmap but not
        a buffer export, so close() would succeed and unmap memory that live views (weights
        kept in their blocks) still point into."""
        self._mms = None

    def __enter__(self) -> GGUFReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> list[mmap.mmap]:
        if self._mms is None:
            raise ValueError(f"{self.path}: GGUFReader is closed")
        return self._mms

    def _open_split(self, given: mmap.mmap, parsed: _Parsed) -> None:
        """Replace the one shard parsed so far by the whole split set it belongs to."""
        count, no, num_tensors = _split_keys(self.metadata, self.path)
        if count == 1:
            if len(self.tensors) != num_tensors:
                raise ModelFormatError(
                    f"{self.path}: split.tensors.count {num_tensors} but the file holds "
                    f"{len(self.tensors)} tensors"
                )
            self.shard_paths = [self.path]
            return
        paths = split_paths(self.path, count, no)
        mms: list[mmap.mmap] = []
        shards: list[_Parsed] = []
        tensors: dict[str, GGUFTensorInfo] = {}
        for i, shard_path in enumerate(paths):
            if i == no:
                mm, shard = given, parsed
            else:
                if not os.path.isfile(shard_path):
                    raise ModelFormatError(
                        f"{self.path}: shard {i + 1} of {count} is missing: no file {shard_path}"
                    )
                mm = _map(shard_path)
                shard = _parse_file(mm, shard_path)
            mms.append(mm)
            shards.append(shard)
            self._mms = mms  # closed with the rest if a later shard fails
            shard_keys = _split_keys(shard[1], shard_path)
            if shard_keys != (count, i, num_tensors):
                raise ModelFormatError(
                    f"{shard_path}: not shard {i + 1} of this set: its split.count, split.no, "
                    f"split.tensors.count are {shard_keys}, expected ({count}, {i}, {num_tensors})"
                )
            for name, info in shard[2].items():
                if name in tensors:
                    raise ModelFormatError(f"{shard_path}: tensor {name!r} is in two shards")
                if len(tensors) == num_tensors:
                    raise ModelFormatError(
                        f"{shard_path}: the shards hold more than split.tensors.count "
                        f"{num_tensors} tensors"
                    )
                tensors[name] = dataclasses.replace(info, shard=i)
        if len(tensors) != num_tensors:
            raise ModelFormatError(
                f"{self.path}: the {count} shards hold {len(tensors)} tensors, split.tensors.count "
                f"says {num_tensors}"
            )
        self.version, self.metadata, _, self.alignment, self.data_start = shards[0]
        self.tensors = tensors
        self.shard_paths = paths

    def _info(self, name: str) -> GGUFTensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: no tensor named {name!r}")
        return info


# ----------------------------------------------------------------------------------------------
# Private helpers: header parsing

_SCALARS: dict[int, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
# (version, metadata, tensors, alignment, data_start) of one file
_Parsed = tuple[int, dict[str, Any], dict[str, GGUFTensorInfo], int, int]
_U32 = struct.Struct("<I")
_UNEXPECTED_PARSE_ERRORS = (
    struct.error,
    ValueError,
    OverflowError,
    IndexError,
    MemoryError,
    RecursionError,
)
_U64 = struct.Struct("<Q")
_STRING_MIN_BYTES = 8  # u64 length
_ARRAY_MIN_BYTES = 12  # u32 element type + u64 count
_TENSOR_INFO_MIN_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_KV_MIN_BYTES = 8 + 4 + 1  # key length, value type, smallest value


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file."""

    __slots__ = ("buf", "pos", "end", "path")

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def fail(self, reason: str) -> NoReturn:
        raise ModelFormatError(f"{self.path}: {reason}")

    def take(self, n: int, what: str) -> int:
        """Advance past `n` bytes and return where they start."""
        if n > self.remaining:
            self.fail(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"file has {self.remaining} left"
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.u64(f"{what} length")
        if max_len is not None and n > max_len:
            self.fail(f"{what} length {n} exceeds the cap of {max_len}")
        start = self.take(n, what)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            return scalar.unpack_from(self.buf, self.take(scalar.size, what))[0]
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype != GGUFValueType.ARRAY:
            self.fail(f"{what}: unknown metadata value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = self.u32(f"{what} element type")
        count = self.u64(f"{what} element count")
        scalar = _SCALARS.get(etype)
        if scalar is not None:
            min_size = scalar.size
        elif etype == GGUFValueType.STRING:
            min_size = _STRING_MIN_BYTES
        elif etype == GGUFValueType.ARRAY:
            min_size = _ARRAY_MIN_BYTES
        else:
            self.fail(f"{what}: unknown array element type {etype}")
        if count > MAX_ARRAY_LEN:
            self.fail(f"{what}: array length {count} exceeds the cap of {MAX_ARRAY_LEN}")
        if count * min_size > self.remaining:
            self.fail(
                f"truncated: {what} holds {count} elements of >= {min_size} bytes, "
                f"file has {self.remaining} left"
            )
        if scalar is not None:
            start = self.take(count * scalar.size, what)
            return list(struct.unpack_from(f"<{count}{scalar.format[1:]}", self.buf, start))
        return [self.value(etype, what, depth + 1) for _ in range(count)]


def split_paths(path: str, count: int, no: int) -> list[str]:
    """The paths of the `count` shards of the split set whose shard `no` (0-based) is at `path`:
    its file name must be `<prefix>-NNNNN-of-MMMMM.gguf` with NNNNN = no + 1, MMMMM = count."""
    folder, name = os.path.split(path)
    m = SHARD_NAME.fullmatch(name)
    if m is None or (int(m["no"]), int(m["count"])) != (no + 1, count):
        raise ModelFormatError(
            f"{path}: shard {no + 1} of a {count}-file split set (split.no, split.count), but "
            f"its name is not <prefix>-{no + 1:05d}-of-{count:05d}.gguf, so the other shards "
            f"cannot be found"
        )
    return [
        os.path.join(folder, f"{m['prefix']}-{i + 1:05d}-of-{count:05d}.gguf") for i in range(count)
    ]


# Every live mapping of a GGUF file: (first address, length, the mmap), for release_mapped.
_MAPPINGS: list[tuple[int, int, weakref.ReferenceType[mmap.mmap]]] = []


def _map(path: str) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ModelFormatError(f"{path}: empty file, not a GGUF file")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*")
                base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
            _MAPPINGS[:] = [m for m in _MAPPINGS if m[2]() is not None]
            _MAPPINGS.append((base, len(mm), weakref.ref(mm)))
            return mm
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"{path}: no such file") from e
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: cannot map file: {e}") from e


def release_mapped(view: torch.Tensor) -> int:
    """Drop the pages of a view of a GGUF file's mapping (`GGUFReader.raw()`) from this
    process's resident memory (madvise DONTNEED on the whole pages inside it), for blocks that
    were copied elsewhere and are never read here again: they stay in the page cache, and a
    later read of the view would fault them back in. Returns the bytes released; 0 for memory
    that is not such a view (never touched) or where the platform has no madvise."""
    if not view.is_contiguous():
        return 0
    start = view.data_ptr()
    end = start + view.numel() * view.element_size()
    for base, length, ref in _MAPPINGS:
        mm = ref()
        if mm is None or not base <= start < end <= base + length:
            continue
        first = -(-(start - base) // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (end - base) // mmap.PAGESIZE * mmap.PAGESIZE
        if last <= first:
            return 0
        try:
            mm.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (AttributeError, OSError, ValueError):
            return 0
        return last - first
    return 0


def _parse_file(buf: mmap.mmap, path: str) -> _Parsed:
    try:
        return _parse(buf, path)
    except _UNEXPECTED_PARSE_ERRORS as e:
        # Defence in depth: the explicit checks in _parse should make this unreachable.
        raise ModelFormatError(f"{path}: malformed GGUF header ({e!r})") from e


def _split_keys(metadata: dict[str, Any], path: str) -> tuple[int, int, int]:
    """(split.count, split.no, split.tensors.count) of one shard, each checked."""
    values = []
    for key, low, high in (
        (SPLIT_COUNT, 1, MAX_SPLITS),
        (SPLIT_NO, 0, MAX_SPLITS - 1),
        (SPLIT_TENSORS_COUNT, 0, MAX_TENSORS),
    ):
        value = metadata.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ModelFormatError(
                f"{path}: split metadata {key!r} must be an integer in {low}..{high}, "
                f"got {value!r:.80}"
            )
        values.append(value)
    count, no, num_tensors = values
    if no >= count:
        raise ModelFormatError(f"{path}: split.no {no} is not below split.count {count}")
    return count, no, num_tensors


def _parse(buf: mmap.mmap, path: str) -> _Parsed:
    """Returns (version, metadata, tensors, alignment, data_start); raises ModelFormatError."""
    cur = _Cursor(buf, path)
    magic = buf[cur.take(4, "magic") : 4]
    if magic != GGUF_MAGIC:
        cur.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.u32("version")
    if version not in (2, 3):
        if version == 1:
            cur.fail("GGUF v1 is not supported (re-convert the model with a recent llama.cpp)")
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
            cur.fail("big-endian GGUF files are not supported")
        cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_tensors > MAX_TENSORS:
        cur.fail(f"tensor count {n_tensors} exceeds the cap of {MAX_TENSORS}")
    if n_kv > MAX_KV:
        cur.fail(f"metadata count {n_kv} exceeds the cap of {MAX_KV}")
    if n_kv * _KV_MIN_BYTES + n_tensors * _TENSOR_INFO_MIN_BYTES > cur.remaining:
        cur.fail(
            f"truncated: {n_kv} metadata entries and {n_tensors} tensor infos cannot fit in "
            f"the {cur.remaining} bytes left"
        )

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_KEY_LEN)
        if key in metadata:
            cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"metadata {key!r} value type")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        cur.fail(f"general.alignment must be a positive power of two, got {alignment!r}")

    # (name, ggml type, ne in GGUF order, offset relative to the data section)
    entries: list[tuple[str, GGMLType, list[int], int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name", MAX_TENSOR_NAME_LEN)
        if name in names:
            cur.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.u32(f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name!r}: n_dims {n_dims} is outside 1..{MAX_DIMS}")
        ne = [cur.u64(f"tensor {name!r} dim {d}") for d in range(n_dims)]
        if any(not 1 <= n <= MAX_DIM for n in ne):
            cur.fail(f"tensor {name!r}: dims {ne} must each be in 1..2**62")
        type_id = cur.u32(f"tensor {name!r} type")
        try:
            qtype = GGMLType(type_id)
        except ValueError:
            cur.fail(f"tensor {name!r}: unknown ggml type id {type_id}")
        offset = cur.u64(f"tensor {name!r} offset")
        if offset % alignment != 0:
            cur.fail(f"tensor {name!r}: offset {offset} is not a multiple of {alignment}")
        entries.append((name, qtype, ne, offset))

    data_start = cdiv(cur.pos, alignment) * alignment
    file_size = len(buf)
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, qtype, ne, offset in entries:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if ne[0] % block_size != 0:
            cur.fail(
                f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                f"{qtype.name} block size {block_size}"
            )
        numel = math.prod(ne)  # python ints: no overflow
        nbytes = numel // block_size * type_size
        start = data_start + offset
        if start + nbytes > file_size:
            cur.fail(
                f"tensor {name!r}: data [{start}, {start + nbytes}) lies past the end of the "
                f"file ({file_size} bytes)"
            )
        tensors[name] = GGUFTensorInfo(name, int(qtype), tuple(reversed(ne)), start, nbytes)

    by_offset = sorted(tensors.values(), key=lambda t: t.data_offset)
    for prev, nxt in zip(by_offset, by_offset[1:], strict=False):
        if prev.data_offset + prev.nbytes > nxt.data_offset:
            cur.fail(f"tensors {prev.name!r} and {nxt.name!r} overlap")
    return version, metadata, tensors, alignment, data_start
