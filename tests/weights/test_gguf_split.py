"""Split GGUF sets (`name-00001-of-00003.gguf`) written by gguf-py's GGUFWriter with
split_max_tensors, the layout llama.cpp's gguf-split and convert_hf_to_gguf.py --split-max-tensors
write (split.* keys in every shard, the model's metadata in the first): any shard opens the whole
set, and a missing, repeated, foreign or truncated shard is a ModelFormatError naming it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow.errors import ModelFormatError
from moeflow.weights.ggml_quants import GGMLType
from moeflow.weights.gguf import GGUFReader, GGUFValueType
from moeflow.weights.gguf_writer import GGUFWriter as OurWriter

gguf = pytest.importorskip("gguf")


def _tensors(num: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"t{i}.weight": rng.standard_normal((4, 8 + i)).astype(np.float32) for i in range(num)}


def _write_split(path: Path, tensors: dict[str, np.ndarray], per_shard: int) -> list[Path]:
    """The split set of `tensors`, at most `per_shard` per file; returns the shards in order."""
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=per_shard)
    w.add_block_count(1)
    w.add_token_list(["a", "b"])
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))


@pytest.fixture
def split_set(tmp_path: Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    tensors = _tensors(7)
    shards = _write_split(tmp_path / "model.gguf", tensors, per_shard=3)
    assert [p.name for p in shards] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return shards, tensors


def test_any_shard_opens_the_whole_set(split_set: tuple[list[Path], dict[str, np.ndarray]]) -> None:
    shards, tensors = split_set
    for given in shards:
        with GGUFReader(given) as r:
            assert r.path == str(given)
            assert r.shard_paths == [str(p) for p in shards]
            assert r.metadata["general.architecture"] == "llama"  # the first shard's metadata
            assert r.metadata["llama.block_count"] == 1
            assert set(r.tensors) == set(tensors)
            assert sorted({info.shard for info in r.tensors.values()}) == [0, 1, 2]
            for name, a in tensors.items():
                assert torch.equal(r.load(name, torch.float32), torch.from_numpy(a)), name


def test_missing_shard(split_set: tuple[list[Path], dict[str, np.ndarray]]) -> None:
    shards, _ = split_set
    shards[1].unlink()
    for given in (shards[0], shards[2]):
        with pytest.raises(ModelFormatError, match=r"shard 2 of 3 is missing: no file .*-00002-"):
            GGUFReader(given)


def test_truncated_shard(split_set: tuple[list[Path], dict[str, np.ndarray]]) -> None:
    shards, _ = split_set
    os.truncate(shards[2], shards[2].stat().st_size - 16)
    with pytest.raises(
        ModelFormatError, match=r"model-00003-of-00003.gguf: tensor .* past the end"
    ):
        GGUFReader(shards[0])
    os.truncate(shards[2], 20)
    with pytest.raises(ModelFormatError, match=r"model-00003-of-00003.gguf: truncated"):
        GGUFReader(shards[0])


def test_repeated_shard(split_set: tuple[list[Path], dict[str, np.ndarray]]) -> None:
    shards, _ = split_set
    shutil.copyfile(shards[0], shards[1])  # shard 1 under shard 2's name
    with pytest.raises(ModelFormatError, match=r"00002-of-00003.gguf: not shard 2 of this set"):
        GGUFReader(shards[0])


@pytest.mark.parametrize(
    ("num_tensors", "per_shard"), [(9, 3), (8, 2)], ids=["tensor-count", "split-count"]
)
def test_foreign_shard(
    split_set: tuple[list[Path], dict[str, np.ndarray]],
    tmp_path: Path,
    num_tensors: int,
    per_shard: int,
) -> None:
    """A shard of another set (more tensors, or more shards) in place of shard 2."""
    shards, _ = split_set
    (tmp_path / "other").mkdir()
    other = _write_split(tmp_path / "other" / "model.gguf", _tensors(num_tensors, 1), per_shard)
    shutil.copyfile(other[1], shards[1])
    with pytest.raises(ModelFormatError, match=r"00002-of-00003.gguf: not shard 2 of this set"):
        GGUFReader(shards[0])


def test_shard_name_must_say_where_the_others_are(
    split_set: tuple[list[Path], dict[str, np.ndarray]],
) -> None:
    shards, _ = split_set
    renamed = shards[0].with_name("model.gguf")
    shards[0].rename(renamed)
    with pytest.raises(ModelFormatError, match=r"name is not <prefix>-00001-of-00003.gguf"):
        GGUFReader(renamed)
    shards[1].rename(shards[1].with_name("model-00002-of-00004.gguf"))  # wrong count in the name
    with pytest.raises(ModelFormatError, match=r"name is not <prefix>-00002-of-00003.gguf"):
        GGUFReader(shards[1].with_name("model-00002-of-00004.gguf"))


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    """Two shards that both hold `t0` (each file valid on its own)."""
    for no in range(2):
        w = OurWriter()
        w.add("split.no", no)
        w.add("split.count", 2)
        w.add("split.tensors.count", 2)
        w.add_tensor("t0", (4,), GGMLType.F32, lambda: np.zeros(4, np.float32))
        w.write(tmp_path / f"m-0000{no + 1}-of-00002.gguf")
    with pytest.raises(ModelFormatError, match=r"m-00002-of-00002.gguf: tensor 't0' is in two"):
        GGUFReader(tmp_path / "m-00001-of-00002.gguf")


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"split.count": 0, "split.no": 0, "split.tensors.count": 1}, r"'split.count' must be"),
        ({"split.count": 2, "split.no": 2, "split.tensors.count": 1}, r"split.no 2 is not below"),
        ({"split.count": 1, "split.tensors.count": 1}, r"'split.no' must be an integer"),
        ({"split.count": True, "split.no": 0, "split.tensors.count": 1}, r"'split.count' must"),
        ({"split.count": 1, "split.no": 0, "split.tensors.count": 5}, r"holds 1 tensors"),
        ({"split.count": 2, "split.no": 0, "split.tensors.count": 1 << 40}, r"tensors.count' must"),
    ],
)
def test_bad_split_keys(tmp_path: Path, keys: dict[str, int], match: str) -> None:
    path = tmp_path / "m-00001-of-00002.gguf"
    w = OurWriter()
    for key, value in keys.items():
        w.add(key, value, _vtype(value))
    w.add_tensor("t0", (4,), GGMLType.F32, lambda: np.zeros(4, np.float32))
    w.write(path)
    with pytest.raises(ModelFormatError, match=match):
        GGUFReader(path)


def _vtype(value: int) -> GGUFValueType | None:
    """A u64 for what a u32 cannot hold; else the writer's own choice."""
    return GGUFValueType.UINT64 if value >= 1 << 32 else None
