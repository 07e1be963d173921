"""The IQ, ternary and MXFP4 GGUF types (weights/ggml_iq.py) against gguf-py's numpy
dequantisers on random blocks, their stored grids against gguf-py's, a GGUF file of them read
back, hostile tensors of them, and the load's log line about types dequantised at load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow.errors import ModelFormatError
from moeflow.kernels import cpu_ext
from moeflow.loading.quantize import dequantized_types_note
from moeflow.weights import ggml_iq, ggml_quants
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType, dequantize
from moeflow.weights.gguf import GGUFReader
from moeflow.weights.iq_grids import GRIDS
from tests.helpers.gguf import GGUF_F16_FIELDS

gguf = pytest.importorskip("gguf")

NEW_TYPES = [
    GGMLType.IQ2_XXS,
    GGMLType.IQ2_XS,
    GGMLType.IQ2_S,
    GGMLType.IQ3_XXS,
    GGMLType.IQ3_S,
    GGMLType.IQ1_S,
    GGMLType.IQ1_M,
    GGMLType.IQ4_NL,
    GGMLType.IQ4_XS,
    GGMLType.TQ1_0,
    GGMLType.TQ2_0,
    GGMLType.MXFP4,
]


def _sane_blocks(
    qtype: GGMLType, num_blocks: int, seed: int, fill: int | None = None
) -> np.ndarray:
    """Blocks [num_blocks, type_size] of random bytes (or every byte `fill`) with finite scales:
    random fp16 scales in +-2, IQ1_M's fp16 scale spread over its scale words' top nibbles, and
    MXFP4 exponents near 1.0."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    if fill is None:
        blocks = rng.integers(0, 256, size=(num_blocks, type_size), dtype=np.uint8)
    else:
        blocks = np.full((num_blocks, type_size), fill, dtype=np.uint8)
    d = rng.uniform(-2.0, 2.0, size=num_blocks).astype(np.float16)
    if qtype == GGMLType.IQ1_M:
        words = blocks[:, 48:56].copy().view("<u2")  # [nb, 4]
        bits = d.view(np.uint16)
        for j in range(4):
            words[:, j] = (words[:, j] & 0x0FFF) | (((bits >> (4 * j)) & 0xF) << 12)
        blocks[:, 48:56] = words.view(np.uint8)
    elif qtype == GGMLType.MXFP4:
        blocks[:, 0] = rng.integers(110, 140, size=num_blocks)
    else:
        for off in GGUF_F16_FIELDS[qtype]:
            blocks[:, off : off + 2] = d.view(np.uint8).reshape(num_blocks, 2)
    return blocks


def _reference(blocks: np.ndarray, qtype: GGMLType) -> torch.Tensor:
    out = gguf.quants.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType(int(qtype)))
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(-1)


@pytest.mark.parametrize("name", list(GRIDS))
def test_stored_grids_equal_gguf(name: str) -> None:
    cls = getattr(
        gguf.quants,
        {
            "IQ2XXS": "IQ2_XXS",
            "IQ2XS": "IQ2_XS",
            "IQ2S": "IQ2_S",
            "IQ3XXS": "IQ3_XXS",
            "IQ3S": "IQ3_S",
            "IQ1S": "IQ1_S",
        }[name],
    )
    cls.init_grid()
    ref = torch.from_numpy(np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape))
    assert torch.equal(ggml_iq.iq_grid(name, torch.device("cpu")), ref)


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype: GGMLType) -> None:
    """Random blocks, enough that the decode runs in several chunks; then blocks of all-zero and
    all-one bits (the smallest and largest grid indices, every sign bit clear or set)."""
    block_size, _ = GGML_QUANT_SIZES[qtype]
    num_blocks = ggml_quants._DEQUANTIZE_CHUNK // block_size * 2 + 7
    blocks = _sane_blocks(qtype, num_blocks, seed=int(qtype))
    shape = (num_blocks, block_size)
    ours = dequantize(torch.from_numpy(blocks.reshape(-1)), int(qtype), shape, torch.float32)
    assert ours.shape == shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours.reshape(-1), _reference(blocks, qtype), rtol=1e-6, atol=0)
    bf16 = dequantize(torch.from_numpy(blocks.reshape(-1)), int(qtype), shape, torch.bfloat16)
    assert torch.equal(bf16, ours.bfloat16())
    for fill in (0x00, 0xFF):
        edge = _sane_blocks(qtype, 8, seed=1, fill=fill)
        ours = dequantize(
            torch.from_numpy(edge.reshape(-1)), int(qtype), (8 * block_size,), torch.float32
        )
        torch.testing.assert_close(ours, _reference(edge, qtype), rtol=1e-6, atol=0)


def test_mxfp4_every_exponent() -> None:
    """E8M0 scales 2**(e - 128) from the subnormal e = 0 to e = 255 (where 12 * 2**127
    overflows to inf, in gguf-py's decode too)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(256, 17), dtype=np.uint8)
    blocks[:, 0] = np.arange(256)
    ours = dequantize(
        torch.from_numpy(blocks.reshape(-1)), int(GGMLType.MXFP4), (256 * 32,), torch.float32
    )
    with np.errstate(over="ignore"):
        ref = _reference(blocks, GGMLType.MXFP4)
    assert torch.equal(ours.isinf(), ref.isinf())
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)


def test_bf16_reads_exactly() -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    raw = x.reshape(-1).view(torch.uint8)
    ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType.BF16).reshape(4, 64)
    ours = dequantize(raw, int(GGMLType.BF16), (4, 64), torch.float32)
    assert torch.equal(ours, torch.from_numpy(ref)) and torch.equal(ours, x.float())


def _write(path: Path, tensors: dict[str, tuple[GGMLType, np.ndarray]]) -> None:
    """A GGUF of raw block tensors: name -> (type, blocks [rows, row_bytes])."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (qtype, data) in tensors.items():
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_file_of_every_new_type_reads_back(tmp_path: Path) -> None:
    tensors = {}
    for qtype in [*NEW_TYPES]:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        rows, row_blocks = 3, 512 // block_size
        blocks = _sane_blocks(qtype, rows * row_blocks, seed=int(qtype) + 1)
        tensors[qtype.name.lower()] = (qtype, blocks.reshape(rows, row_blocks * type_size))
    path = tmp_path / "iq.gguf"
    _write(path, tensors)
    with GGUFReader(path) as r:
        for name, (qtype, data) in tensors.items():
            info = r.tensors[name]
            assert info.ggml_type == qtype and info.shape == (3, 512)
            ref = _reference(data, qtype).reshape(3, 512)
            torch.testing.assert_close(r.load(name, torch.float32), ref, rtol=1e-6, atol=0)


def test_hostile_tensors(tmp_path: Path) -> None:
    # bytes that do not match the type and shape
    with pytest.raises(ModelFormatError, match="IQ2_XXS tensor of shape .* needs 132 bytes"):
        dequantize(
            torch.zeros(131, dtype=torch.uint8), int(GGMLType.IQ2_XXS), (512,), torch.float32
        )
    with pytest.raises(ModelFormatError, match="in blocks of 256"):
        dequantize(torch.zeros(66, dtype=torch.uint8), int(GGMLType.IQ1_M), (128,), torch.float32)
    with pytest.raises(ModelFormatError, match="unknown ggml type id 40"):
        dequantize(torch.zeros(66, dtype=torch.uint8), 40, (256,), torch.float32)
    # a file whose IQ tensor runs past its end, and one whose rows are not whole blocks
    path = tmp_path / "trunc.gguf"
    _write(path, {"w": (GGMLType.IQ3_S, _sane_blocks(GGMLType.IQ3_S, 4, seed=0).reshape(2, -1))})
    with GGUFReader(path) as r:
        end = r.tensors["w"].data_offset + r.tensors["w"].nbytes
    valid = path.read_bytes()
    path.write_bytes(valid[: end - 1])
    with pytest.raises(ModelFormatError, match="past the end of the file"):
        GGUFReader(path)
    data = bytearray(valid)
    ne0 = data.find((512).to_bytes(8, "little"))  # the tensor info's first dim (row length)
    data[ne0 : ne0 + 8] = (384).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="not a multiple of the IQ3_S block size 256"):
        GGUFReader(path)
    # a type id this reader does not know
    data[ne0 : ne0 + 8] = (512).to_bytes(8, "little")
    type_at = ne0 + 16  # two dims, then the type
    assert int.from_bytes(data[type_at : type_at + 4], "little") == GGMLType.IQ3_S
    data[type_at : type_at + 4] = (77).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="unknown ggml type id 77"):
        GGUFReader(path)


def test_dequantized_types_note() -> None:
    types = [GGMLType.F32, GGMLType.IQ2_XXS, GGMLType.IQ2_XXS, GGMLType.Q4_K, GGMLType.IQ3_S]
    note = dequantized_types_note(types, "cuda", torch.bfloat16)
    assert note is not None
    assert note.startswith("dequantising Q4_K (1 tensor), IQ2_XXS (2 tensors), IQ3_S (1 tensor) ")
    assert "to bfloat16 at load" in note and "only on a CPU" in note
    note = dequantized_types_note(types, "cpu", torch.float32)
    assert note is not None
    if cpu_ext.available():
        assert "IQ2_XXS (2 tensors), IQ3_S (1 tensor) to float32" in note
        assert "Q4_K (" not in note and "the CPU kernels read" in note
    else:
        assert "unavailable" in note
    assert dequantized_types_note([GGMLType.F32, GGMLType.BF16], "cuda", torch.float32) is None


# The tiny Qwen3-MoE GGUF of bench/gguf_models.py with each matrix in another dequantised type
# (its random blocks get the type's scale field) and the output in IQ4_NL, which stays kept.
_MODEL_TYPES = {
    "ffn_gate_exps": GGMLType.IQ2_XXS,
    "ffn_up_exps": GGMLType.IQ3_S,
    "ffn_down_exps": GGMLType.IQ1_S,
    "attn_q": GGMLType.IQ2_XS,
    "attn_k": GGMLType.IQ2_S,
    "attn_v": GGMLType.IQ3_XXS,
    "attn_output": GGMLType.TQ1_0,
    "token_embd": GGMLType.TQ2_0,
    "output": GGMLType.IQ4_NL,
}


def test_model_of_iq_types_loads_and_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from moeflow import env
    from moeflow.bench import gguf_models
    from moeflow.layers.fused_experts import FusedExperts
    from moeflow.loading.loader import load_model
    from moeflow.loading.source import GGUFFile
    from tests.helpers.gguf import TINY_QWEN3_MOE

    cpu_ext.available()  # the kernels load from the shared cache before it moves
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    for qtype in _MODEL_TYPES.values():
        monkeypatch.setitem(gguf_models._F16_FIELDS, qtype, GGUF_F16_FIELDS[qtype])
        monkeypatch.setitem(gguf_models._QUANT_STD, qtype, 60.0)

    def rule(ftype: str, num_layers: int, num_experts: int) -> Callable[[str, int], GGMLType]:
        def type_of(name: str, layer: int) -> GGMLType:
            if name.endswith("ffn_gate_inp.weight"):
                return GGMLType.F32
            return _MODEL_TYPES[name.split(".")[-2]]

        return type_of

    monkeypatch.setattr(gguf_models, "_type_rule", rule)
    path = gguf_models.bench_gguf("tiny-qwen3-moe", TINY_QWEN3_MOE, "q8_0", num_layers=1)
    with caplog.at_level("INFO", logger="moeflow"):
        loaded = load_model(GGUFFile(str(path)), "cpu", torch.float32)
    notes = [r.getMessage() for r in caplog.records if "dequantising" in r.getMessage()]
    assert len(notes) == 1
    for qtype in _MODEL_TYPES.values():
        kept = qtype == GGMLType.IQ4_NL and cpu_ext.available()
        assert (f"{qtype.name} (" in notes[0]) != kept
    # the experts as loaded are gguf-py's dequantisation of the file's blocks
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    experts = next(m for m in loaded.model.modules() if isinstance(m, FusedExperts))
    inter = TINY_QWEN3_MOE["moe_intermediate_size"]
    for name, ours in [
        ("blk.0.ffn_gate_exps.weight", experts.w13[:, :inter]),
        ("blk.0.ffn_up_exps.weight", experts.w13[:, inter:]),
        ("blk.0.ffn_down_exps.weight", experts.w2),
    ]:
        t = tensors[name]
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        torch.testing.assert_close(ours, torch.from_numpy(ref.copy()), rtol=1e-6, atol=0)
