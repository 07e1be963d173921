"""GGUFReader, dequantize and the GGUF -> HF mapping: against gguf-py and transformers, on the
SmolLM2 GGUF, and on hostile files that must each raise one ModelFormatError within a fixed
work budget."""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest
import torch

from moeflow.errors import ModelFormatError, ModelNotFoundError
from moeflow.loading.source import default_model_path
from moeflow.weights import gguf as gguf_reader
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType, dequantize
from moeflow.weights.gguf import GGUFReader
from moeflow.weights.gguf_hf import gguf_to_hf_config, iter_hf_weights
from tests.helpers.gguf import GGUF_F16_FIELDS

gguf = pytest.importorskip("gguf")


def _random_blocks(qtype: GGMLType, num_blocks: int, seed: int) -> np.ndarray:
    """Random bytes [num_blocks, type_size] with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(num_blocks, type_size), dtype=np.uint8)
    for off in GGUF_F16_FIELDS[qtype]:
        scales = rng.uniform(-2.0, 2.0, size=num_blocks).astype(np.float16)
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(num_blocks, 2)
    return blocks


@pytest.mark.parametrize("qtype", list(GGUF_F16_FIELDS), ids=lambda t: t.name)
def test_dequantize_matches_gguf_py(qtype: GGMLType) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    num_blocks = 4096
    blocks = _random_blocks(qtype, num_blocks, seed=int(qtype))
    ref = gguf.quants.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType(int(qtype)))
    shape = (num_blocks // 4, 4 * block_size)
    ours = dequantize(torch.from_numpy(blocks.reshape(-1)), int(qtype), shape, torch.float32)
    assert ours.shape == shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.from_numpy(ref).reshape(shape), rtol=1e-6, atol=0)
    ours_bf16 = dequantize(torch.from_numpy(blocks.reshape(-1)), int(qtype), shape, torch.bfloat16)
    assert torch.equal(ours_bf16, ours.bfloat16())


@pytest.mark.parametrize(
    ("qtype", "torch_dtype"),
    [(GGMLType.F32, torch.float32), (GGMLType.F16, torch.float16), (GGMLType.BF16, torch.bfloat16)],
)
def test_dequantize_plain_types(qtype: GGMLType, torch_dtype: torch.dtype) -> None:
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
    raw = x.reshape(-1).view(torch.uint8)
    assert torch.equal(dequantize(raw, int(qtype), (6, 10), torch_dtype), x)
    assert torch.equal(dequantize(raw, int(qtype), (6, 10), torch.float32), x.float())


def test_dequantize_rejects_bad_input() -> None:
    raw = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(ModelFormatError, match="needs 68 bytes"):
        dequantize(raw, int(GGMLType.Q8_0), (2, 32), torch.float32)
    with pytest.raises(ModelFormatError, match="unknown ggml type id 99"):
        dequantize(raw, 99, (34,), torch.float32)
    with pytest.raises(ModelFormatError, match="unsupported tensor type Q8_K"):
        dequantize(torch.zeros(292, dtype=torch.uint8), int(GGMLType.Q8_K), (256,), torch.float32)


# ------------------------------------------------------------------------------------------
# Files written by gguf-py


def _write_sample(path: Path) -> dict[str, np.ndarray]:
    """A small GGUF with varied metadata and F32/F16/Q8_0 tensors; returns the float tensors."""
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 8)).astype(np.float32),
        "f16": rng.standard_normal((2, 4, 16)).astype(np.float16),
        "q8": rng.standard_normal((16, 32)).astype(np.float32),
    }
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int16("t.i16", -1234)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int64("t.i64", -(2**40))
    w.add_uint64("t.u64", 2**63)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_str", ["a", "bc", ""])
    w.add_array("t.arr_nested", [[1, 2], [3]])
    w.add_tensor("f32", tensors["f32"])
    w.add_tensor("f16", tensors["f16"])
    q8 = gguf.quants.quantize(tensors["q8"], gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors["q8"] = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    return tensors


def test_round_trip_gguf_writer(tmp_path: Path) -> None:
    path = tmp_path / "sample.gguf"
    expected = _write_sample(path)
    with GGUFReader(path) as r:
        assert r.version == 3
        md = r.metadata
        assert md["general.architecture"] == "llama"
        assert (md["t.u8"], md["t.i16"], md["t.u32"]) == (200, -1234, 4_000_000_000)
        assert (md["t.i64"], md["t.u64"]) == (-(2**40), 2**63)
        assert (md["t.f32"], md["t.f64"], md["t.bool"]) == (0.5, 1e-300, True)
        assert md["t.str"] == "héllo ✓"
        assert md["t.arr_i32"] == [1, -2, 3]
        assert md["t.arr_str"] == ["a", "bc", ""]
        assert md["t.arr_nested"] == [[1, 2], [3]]
        assert r.tensors["f32"].shape == (3, 8) and r.tensors["f32"].ggml_type == GGMLType.F32
        assert r.tensors["f16"].shape == (2, 4, 16) and r.tensors["f16"].ggml_type == GGMLType.F16
        assert r.tensors["q8"].shape == (16, 32) and r.tensors["q8"].ggml_type == GGMLType.Q8_0
        assert torch.equal(r.load("f32", torch.float32), torch.from_numpy(expected["f32"]))
        assert torch.equal(r.load("f16", torch.float16), torch.from_numpy(expected["f16"]))
        assert torch.equal(
            r.load("f16", torch.float32), torch.from_numpy(expected["f16"].astype(np.float32))
        )
        assert torch.equal(r.load("q8", torch.float32), torch.from_numpy(expected["q8"]))
        raw = r.raw("q8")
        assert raw.dtype == torch.uint8 and raw.numel() == r.tensors["q8"].nbytes
        loaded = r.load("f32", torch.float32)
        loaded.add_(1)  # load() hands out owned, writable memory
        with pytest.raises(ModelFormatError, match="no tensor named 'nope'"):
            r.load("nope", torch.float32)
    del raw


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`, the transform llama.cpp applies at convert."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_tiny_model(path: Path, arch: str, hf: dict[str, np.ndarray], permute: bool) -> None:
    n_head, n_kv, hidden = 4, 2, 32
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(48)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(4.0)
    w.add_rope_scaling_orig_ctx_len(32)
    w.add_token_list([f"t{i}" for i in range(64)])
    w.add_bos_token_id(5)
    w.add_eos_token_id(6)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.q_proj.bias": "blk.0.attn_q.bias",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.k_proj.bias": "blk.0.attn_k.bias",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "model.layers.0.self_attn.q_norm.weight": "blk.0.attn_q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight": "blk.0.attn_k_norm.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    }
    for hf_name, gguf_name in names.items():
        t = hf[hf_name]
        if permute and "q_proj" in hf_name:
            t = _llama_permute(t, n_head)
        elif permute and "k_proj" in hf_name:
            t = _llama_permute(t, n_kv)
        w.add_tensor(gguf_name, t)
    w.add_tensor("rope_freqs.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_hf_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    shapes = {
        "model.embed_tokens.weight": (64, 32),
        "model.norm.weight": (32,),
        "lm_head.weight": (64, 32),
        "model.layers.0.self_attn.q_proj.weight": (32, 32),
        "model.layers.0.self_attn.q_proj.bias": (32,),
        "model.layers.0.self_attn.k_proj.weight": (16, 32),
        "model.layers.0.self_attn.k_proj.bias": (16,),
        "model.layers.0.self_attn.v_proj.weight": (16, 32),
        "model.layers.0.self_attn.o_proj.weight": (32, 32),
        "model.layers.0.self_attn.q_norm.weight": (8,),
        "model.layers.0.self_attn.k_norm.weight": (8,),
        "model.layers.0.input_layernorm.weight": (32,),
        "model.layers.0.post_attention_layernorm.weight": (32,),
        "model.layers.0.mlp.gate_proj.weight": (48, 32),
        "model.layers.0.mlp.up_proj.weight": (48, 32),
        "model.layers.0.mlp.down_proj.weight": (32, 48),
    }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_hf_mapping_and_llama_unpermute(tmp_path: Path, arch: str) -> None:
    hf = _tiny_hf_weights()
    path = tmp_path / f"{arch}.gguf"
    _write_tiny_model(path, arch, hf, permute=arch == "llama")
    with GGUFReader(path) as r:
        config = gguf_to_hf_config(r)
        unused: list[str] = []
        ours = dict(iter_hf_weights(r, torch.float32, unused))
    expected_arch = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    assert config["architectures"] == [f"{expected_arch}ForCausalLM"]
    assert config["model_type"] == arch
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (
        64,
        32,
        48,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["head_dim"], config["num_hidden_layers"]) == (8, 1)
    assert config["rope_theta"] == 1e6 and config["max_position_embeddings"] == 128
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (5, 6)
    assert unused == ["rope_freqs.weight"]
    assert set(ours) == set(hf)
    for name, t in hf.items():
        assert torch.equal(ours[name], torch.from_numpy(t)), name


def test_unknown_arch(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with (
        GGUFReader(path) as r,
        pytest.raises(ModelFormatError, match="deepseek2, glm4moe, llama, olmoe"),
    ):
        gguf_to_hf_config(r)


# ------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct Q4_1


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    try:
        return default_model_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


def test_smollm2_config_and_tensors(smollm2_path: str) -> None:
    with GGUFReader(smollm2_path) as r:
        config = gguf_to_hf_config(r)
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
        assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
        assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
        ref = gguf.GGUFReader(smollm2_path)
        ref_tensors = {t.name: t for t in ref.tensors}
        for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
            t = ref_tensors[name]
            expected = torch.from_numpy(
                gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy()
            )
            assert r.tensors[name].ggml_type == int(t.tensor_type)
            assert r.tensors[name].shape == tuple(int(n) for n in reversed(t.shape))
            torch.testing.assert_close(r.load(name, torch.float32), expected, rtol=1e-6, atol=0)


def test_prefetch_advises_the_whole_file(smollm2_path: str) -> None:
    """GGUFReader.prefetch (madvise WILLNEED, as llama.cpp on load) covers every byte of the
    file on Linux and leaves the tensors readable as before."""
    with GGUFReader(smollm2_path) as r:
        before = r.load("blk.0.attn_q.weight", torch.float32)
        assert r.prefetch() == os.path.getsize(smollm2_path)
        assert torch.equal(r.load("blk.0.attn_q.weight", torch.float32), before)
    closed = GGUFReader(smollm2_path)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        closed.prefetch()


def test_no_mmap_reads_each_tensor_into_its_own_memory(
    smollm2_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """use_mmap=False (--no-mmap): raw() gives every tensor's bytes as the mapping holds them,
    in writable memory of its own, read in several spans at once (a small READ_CHUNK here); a
    file cut short after it was opened is a ModelFormatError naming the tensor."""
    monkeypatch.setattr(gguf_reader, "READ_CHUNK", 64 * 1024 + 96)
    with GGUFReader(smollm2_path) as mapped, GGUFReader(smollm2_path, use_mmap=False) as read:
        for name in mapped.tensors:
            copy = read.raw(name)
            assert torch.equal(copy, mapped.raw(name)), name
        big = max(mapped.tensors.values(), key=lambda t: t.nbytes)
        assert big.nbytes > 8 * gguf_reader.READ_CHUNK
        copy = read.raw(big.name)
        copy[0] ^= 0xFF  # its own memory: the mapping is read-only
        assert copy[0] != mapped.raw(big.name)[0]
        assert torch.equal(read.load(big.name, torch.float32), mapped.load(big.name, torch.float32))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(smollm2_path).read_bytes())
    with GGUFReader(cut, use_mmap=False) as read:
        last = max(read.tensors.values(), key=lambda t: t.data_offset)
        os.truncate(cut, last.data_offset + last.nbytes // 2)
        with pytest.raises(ModelFormatError, match=f"{last.name}.*ended inside"):
            read.raw(last.name)


@pytest.mark.slow
def test_smollm2_unpermute_matches_transformers(smollm2_path: str) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    folder, name = Path(smollm2_path).parent, Path(smollm2_path).name
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    theirs = dict(model.named_parameters())
    wanted = {
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 29) for p in ("q", "k", "v")
    }
    with GGUFReader(smollm2_path) as r:
        ours = {n: t for n, t in iter_hf_weights(r, torch.float32) if n in wanted}
    assert set(ours) == wanted
    for n in wanted:
        torch.testing.assert_close(ours[n], theirs[n].detach(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Hostile files


def _gstr(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, v: int) -> bytes:
    return _gstr(key) + struct.pack("<II", 4, v)


def _tensor_info(name: str, ne: list[int], ggml_type: int, offset: int) -> bytes:
    out = _gstr(name) + struct.pack("<I", len(ne))
    out += b"".join(struct.pack("<Q", n) for n in ne)
    return out + struct.pack("<IQ", ggml_type, offset)


def _gguf(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes,
    *,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    version: int = 3,
    magic: bytes = b"GGUF",
) -> bytes:
    head = magic + struct.pack("<IQQ", version, n_tensors or len(infos), n_kv or len(kvs))
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % 32)
    return body + data


def _valid_small() -> bytes:
    """Two F32 tensors of 32 and 64 bytes: the file ends exactly where the last tensor does."""
    kvs = [
        _gstr("general.architecture") + struct.pack("<I", 8) + _gstr("llama"),
        _kv_u32("a.u32", 7),
        _gstr("a.arr") + struct.pack("<IIQ", 9, 8, 2) + _gstr("x") + _gstr("yz"),
    ]
    infos = [_tensor_info("a", [8], 0, 0), _tensor_info("b", [4, 4], 0, 32)]
    return _gguf(kvs, infos, bytes(range(96)))


# The reader's work, counted as the lines of moeflow/weights/gguf.py it executes: a stand-in for
# its running time that a loaded machine does not change. Each hostile file below is rejected
# within a few hundred lines; a loop driven by a count the header declares, not by the bytes the
# file holds (what RELIABILITY.md rule 3 forbids), runs thousands.
HOSTILE_LINE_BUDGET = 1_000


@contextlib.contextmanager
def _reader_lines(budget: int) -> Iterator[list[int]]:
    """Count the lines GGUFReader executes (one-element list, read after the block); past
    `budget` raise AssertionError inside the reader, so a runaway loop fails the test at once
    instead of hanging it (the reader catches only ModelFormatError and a few parse errors)."""
    count = [0]

    def count_lines(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            count[0] += 1
            if count[0] > budget:
                raise AssertionError(f"GGUFReader ran past {budget} lines: unbounded work")
        return count_lines

    def on_call(frame: FrameType, event: str, arg: object) -> Any:
        return count_lines if frame.f_code.co_filename == gguf_reader.__file__ else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield count
    finally:
        sys.settrace(previous)


def _expect_error(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with (
            _reader_lines(HOSTILE_LINE_BUDGET) as lines,
            pytest.raises(ModelFormatError, match=match) as info,
        ):
            GGUFReader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < lines[0] <= HOSTILE_LINE_BUDGET
    assert peak < 16 << 20
    assert str(path) in str(info.value)


def test_valid_small_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(_valid_small())
    with GGUFReader(path) as r:
        assert r.metadata["a.arr"] == ["x", "yz"] and r.metadata["a.u32"] == 7
        assert r.tensors["b"].shape == (4, 4)
        b = r.load("b", torch.float32)
        assert torch.equal(b.reshape(-1).view(torch.uint8), torch.arange(32, 96, dtype=torch.uint8))


def test_every_truncation_raises(tmp_path: Path) -> None:
    """Every prefix of a valid file raises within the hostile-file budget (reading the whole file
    takes about 400 lines)."""
    data = _valid_small()
    path = tmp_path / "trunc.gguf"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with _reader_lines(HOSTILE_LINE_BUDGET) as lines, pytest.raises(ModelFormatError):
            GGUFReader(path)
        assert 0 < lines[0] <= HOSTILE_LINE_BUDGET


_ARCH = _gstr("general.architecture") + struct.pack("<I", 8) + _gstr("llama")
_ONE = [_tensor_info("a", [8], 0, 0)]
_DATA = bytes(32)
_MANY_KVS = [_gstr(f"k{i}") + struct.pack("<IB", 0, 1) for i in range(4096)]  # u8 values
_MANY_INFOS = [_tensor_info(f"t{i}", [8], 0, 0) for i in range(4096)]

_HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "bad_magic": (lambda: _gguf([], [], b"", magic=b"GGML"), "not a GGUF file"),
    "version_1": (lambda: _gguf([], [], b"", version=1), "v1 is not supported"),
    "version_9": (lambda: _gguf([], [], b"", version=9), "unsupported GGUF version 9"),
    "big_endian": (lambda: _gguf([], [], b"", version=3 << 24), "big-endian"),
    "huge_n_kv": (lambda: _gguf([_ARCH], [], b"", n_kv=2**63), "metadata count"),
    "n_kv_past_end": (lambda: _gguf([_ARCH], [], b"", n_kv=500_000), "cannot fit"),
    "huge_n_tensors": (lambda: _gguf([], _ONE, _DATA, n_tensors=2**40), "tensor count"),
    "huge_key_len": (
        lambda: _gguf([struct.pack("<Q", 2**64 - 1) + b"k" * 16], [], b""),
        "exceeds the cap",
    ),
    "huge_string_len": (
        lambda: _gguf([_gstr("k") + struct.pack("<IQ", 8, 2**62)], [], b""),
        "truncated",
    ),
    "huge_array_len": (
        lambda: _gguf([_gstr("k") + struct.pack("<IIQ", 9, 10, 2**61)], [], b""),
        "array length",
    ),
    "array_past_end": (
        lambda: _gguf([_gstr("k") + struct.pack("<IIQ", 9, 10, 1_000_000)], [], b""),
        "truncated",
    ),
    "string_array_past_end": (
        lambda: _gguf([_gstr("k") + struct.pack("<IIQ", 9, 8, 10_000_000)], [], b""),
        "truncated",
    ),
    # The three above again, with 4096 real entries before the end: rejected from the declared
    # count before any entry is parsed (parsing them would take HOSTILE_LINE_BUDGET many times).
    "n_kv_past_end_with_entries": (
        lambda: _gguf(_MANY_KVS, [], b"", n_kv=500_000),
        "cannot fit",
    ),
    "n_tensors_past_end_with_infos": (
        lambda: _gguf([], _MANY_INFOS, _DATA, n_tensors=500_000),
        "cannot fit",
    ),
    "string_array_past_end_with_strings": (
        lambda: _gguf(
            [_gstr("k") + struct.pack("<IIQ", 9, 8, 10_000_000) + _gstr("") * 4096], [], b""
        ),
        "truncated",
    ),
    "deep_nesting": (
        lambda: _gguf([_gstr("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 64], [], b""),
        "nested deeper",
    ),
    "unknown_value_type": (lambda: _gguf([_gstr("k") + struct.pack("<I", 13)], [], b""), "type 13"),
    "duplicate_key": (lambda: _gguf([_kv_u32("k", 1), _kv_u32("k", 2)], [], b""), "duplicate"),
    "bad_alignment": (lambda: _gguf([_kv_u32("general.alignment", 3)], [], b""), "alignment"),
    "zero_alignment": (lambda: _gguf([_kv_u32("general.alignment", 0)], [], b""), "alignment"),
    "n_dims_0": (lambda: _gguf([], [_tensor_info("a", [], 0, 0)], _DATA), "n_dims 0"),
    "n_dims_5": (lambda: _gguf([], [_tensor_info("a", [1] * 5, 0, 0)], _DATA), "n_dims 5"),
    "n_dims_huge": (
        lambda: _gguf([], [_gstr("a") + struct.pack("<I", 2**32 - 1) + bytes(64)], _DATA),
        "n_dims",
    ),
    "dim_zero": (lambda: _gguf([], [_tensor_info("a", [8, 0], 0, 0)], _DATA), "dims"),
    "dim_huge": (lambda: _gguf([], [_tensor_info("a", [2**63], 0, 0)], _DATA), "dims"),
    "dims_product_huge": (
        lambda: _gguf([], [_tensor_info("a", [2**40] * 4, 0, 0)], _DATA),
        "past the end",
    ),
    "offset_past_end": (lambda: _gguf([], [_tensor_info("a", [8], 0, 2**20)], _DATA), "past"),
    "offset_wraps": (lambda: _gguf([], [_tensor_info("a", [8], 0, 2**64 - 32)], _DATA), "past"),
    "misaligned_offset": (lambda: _gguf([], [_tensor_info("a", [4], 0, 4)], _DATA), "multiple"),
    "overlap": (
        lambda: _gguf(
            [], [_tensor_info("a", [16], 0, 0), _tensor_info("b", [8], 0, 32)], _DATA * 3
        ),
        "overlap",
    ),
    "duplicate_tensor": (
        lambda: _gguf([], [_tensor_info("a", [8], 0, 0), _tensor_info("a", [8], 0, 32)], _DATA * 2),
        "duplicate tensor name",
    ),
    "unknown_type": (lambda: _gguf([], [_tensor_info("a", [8], 99, 0)], _DATA), "type id 99"),
    "removed_type_4": (lambda: _gguf([], [_tensor_info("a", [32], 4, 0)], _DATA), "type id 4"),
    "row_not_block_multiple": (
        lambda: _gguf([], [_tensor_info("a", [16, 2], int(GGMLType.Q8_0), 0)], _DATA * 2),
        "block size",
    ),
    "empty_file": (lambda: b"", "empty file"),
}


@pytest.mark.parametrize("case", list(_HOSTILE))
def test_hostile_file(tmp_path: Path, case: str) -> None:
    make, match = _HOSTILE[case]
    _expect_error(tmp_path, make(), match)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        GGUFReader(tmp_path / "absent.gguf")


def test_random_corruption_never_escapes(tmp_path: Path) -> None:
    """Flipping header bytes of a valid file gives a reader or a ModelFormatError, nothing else."""
    data = bytearray(_valid_small())
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.gguf"
    header_len = len(data) - 96
    for _ in range(300):
        bad = bytearray(data)
        for pos in rng.integers(0, header_len, size=3):
            bad[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(bad))
        try:
            r: Any = GGUFReader(path)
        except ModelFormatError:
            continue
        for name in r.tensors:
            with contextlib.suppress(ModelFormatError):
                r.load(name, torch.float32)
        r.close()


@pytest.mark.parametrize(
    ("arch", "extra", "tensor", "match"),
    [
        (
            "llama",
            {"expert_count": 8, "expert_used_count": 2},
            "blk.0.ffn_gate.0.weight",
            "pre-2024",
        ),
        ("llama", {"expert_count": 2, "expert_used_count": 4}, None, "used_count 4 > expert"),
        ("glm4moe", {"nextn_predict_layers": 2}, None, "leaves no main layer"),
        ("glm4moe", {"rope.dimension_count": 10}, None, "must be even and <= the head size 8"),
        ("glm4moe", {"expert_gating_func": 1}, None, "expert_gating_func 1 is not supported"),
        (
            "olmoe",
            {"expert_count": 8, "expert_used_count": 2, "attention.clamp_kqv": -1.0},
            None,
            "clamp_kqv' must be > 0",
        ),
    ],
)
def test_moe_metadata_errors(
    tmp_path: Path, arch: str, extra: dict[str, float], tensor: str | None, match: str
) -> None:
    """Files the new architectures refuse, each with the reason."""
    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_feed_forward_length(64)
    w.add_vocab_size(16)
    defaults = {"expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 16}
    for key, value in ({**defaults, **extra} if arch == "glm4moe" else extra).items():
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    if tensor is not None:
        w.add_tensor(tensor, np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFReader(path) as r, pytest.raises(ModelFormatError, match=match):
        gguf_to_hf_config(r)
