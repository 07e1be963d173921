"""The `--quantize` block writers (weights/ggml_quants.py quantize): Q4_K's fields read back by
our dequantiser and by gguf-py's, its blocks against ggml's own quantiser, its round-trip error
against the float weight, and the fallback of rows that are not whole super-blocks. Q8_0 / Q4_0
against gguf-py's quantiser are in tests/models/test_quantized_cpu.py."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from moeflow.weights import ggml_quants
from moeflow.weights.ggml_quants import GGMLType, dequantize, quantize, quantize_kind_for


def _representable_q4_k(nb: int, seed: int) -> torch.Tensor:
    """[nb, 256] weights that Q4_K holds exactly: d * sc * q - dmin * m with fp16 d, dmin, 6-bit
    sc, m whose largest is 63 in each super-block and q spanning 0..15 in each sub-block (so
    the best fit is the exact one)."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(nb, 1, 1, generator=g) * 1e-3 + 1e-4).half().float()
    dmin = (torch.rand(nb, 1, 1, generator=g) * 1e-3 + 1e-4).half().float()
    sc = torch.randint(1, 64, (nb, 8, 1), generator=g).float()
    mn = torch.randint(0, 64, (nb, 8, 1), generator=g).float()
    sc[:, 0], mn[:, 1] = 63, 63
    q = torch.randint(0, 16, (nb, 8, 32), generator=g).float()
    q[:, :, 0], q[:, :, 1] = 0, 15
    return ((d * sc) * q - dmin * mn).reshape(nb, 256)


def test_q4_k_recovers_representable_weights() -> None:
    """Weights Q4_K holds exactly come back exactly through our dequantiser: every field (fp16
    d and dmin, the 12 bytes of 6-bit scales and mins, the nibbles) is where ggml reads it."""
    w = _representable_q4_k(64, seed=1)
    q = quantize(w, "q4_k")
    assert q.qtype == int(GGMLType.Q4_K) and q.data.shape == (64, 144)
    assert q.data.dtype == torch.uint8
    back = dequantize(q.data.reshape(-1), q.qtype, q.shape, torch.float32)
    torch.testing.assert_close(back, w, rtol=0, atol=1e-7)


def test_q4_k_read_back_by_gguf_py() -> None:
    """gguf-py's Q4_K dequantiser (written from ggml's C) reads our blocks as our dequantiser
    does, for random weights and for the exactly representable ones."""
    gguf = pytest.importorskip("gguf")
    for w in (torch.randn(32, 512), _representable_q4_k(16, seed=2)):
        q = quantize(w, "q4_k")
        ours = q.dequantize(torch.float32)
        theirs = gguf.quants.dequantize(q.data.numpy(), gguf.GGMLQuantizationType.Q4_K)
        torch.testing.assert_close(torch.from_numpy(theirs).reshape(q.shape), ours)


def test_q4_k_matches_ggml_reference() -> None:
    """Against ggml's own quantize_row_q4_K_ref (llama-cpp-python's libggml-base, through
    ctypes): nearly every block is byte for byte the same, and the round-trip error is ggml's.
    The few blocks that differ are near-ties of the search (its sums are added in another
    order), each a valid Q4_K block of the same quality."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not lib_path.is_file():
        pytest.skip(f"no {lib_path}")
    ggml_quantize = ctypes.CDLL(str(lib_path)).quantize_row_q4_K_ref
    ggml_quantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    ggml_quantize.restype = None
    g = torch.Generator().manual_seed(5)
    for w in (torch.randn(128, 1024, generator=g), torch.randn(128, 1024, generator=g) ** 3):
        theirs = torch.empty(128, 4 * 144, dtype=torch.uint8)  # [rows, row_bytes]
        ggml_quantize(w.data_ptr(), theirs.data_ptr(), w.numel())
        ours = quantize(w, "q4_k").data
        differ = (ours != theirs).reshape(-1, 144).any(-1)  # [blocks]
        assert differ.float().mean().item() < 0.08
        back_ours = quantize(w, "q4_k").dequantize(torch.float32)
        back_theirs = dequantize(theirs.reshape(-1), int(GGMLType.Q4_K), w.shape, torch.float32)
        err_ours = (back_ours - w).square().sum().item()
        err_theirs = (back_theirs - w).square().sum().item()
        assert err_ours == pytest.approx(err_theirs, rel=2e-3)


def test_q4_k_round_trip_error() -> None:
    """Gaussian weights: the relative RMS error of the Q4_K round trip is below Q4_0's (the same
    4.5 bits a weight: 8 fitted scales and mins a super-block against one scale per 32), and
    no weight moves by more than its sub-block's range / 15 (one quantisation step)."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    back = {k: quantize(w, k).dequantize(torch.float32) for k in ("q4_k", "q4_0", "q8_0")}
    rel = {k: ((b - w).square().mean() / w.square().mean()).sqrt().item() for k, b in back.items()}
    assert rel["q8_0"] < 0.01
    assert rel["q4_k"] < 0.085
    assert rel["q4_k"] < 0.92 * rel["q4_0"]
    sub = w.reshape(-1, 32)
    step = (sub.amax(-1) - sub.amin(-1).clamp(max=0)) / 15  # [sub-blocks]
    err = (back["q4_k"] - w).reshape(-1, 32).abs().amax(-1)
    assert bool((err <= step).all())


def test_q4_k_edge_blocks() -> None:
    """Zero, constant, all-positive and all-negative sub-blocks, and a super-block mixing them."""
    rows = torch.zeros(5, 256)
    rows[1] = 0.25  # constant > 0: min 0, one step across the sub-block
    rows[2] = -0.5  # constant < 0: scale 0, held by the min alone
    rows[3] = torch.linspace(0.1, 2.0, 256)  # all positive
    rows[4, :128] = torch.linspace(-3.0, -1.0, 128)  # negative sub-blocks beside zero ones
    back = quantize(rows, "q4_k").dequantize(torch.float32)
    assert torch.isfinite(back).all()
    torch.testing.assert_close(back[0], rows[0])
    torch.testing.assert_close(back[1], rows[1], rtol=0, atol=1e-3)
    torch.testing.assert_close(back[2], rows[2], rtol=0, atol=1e-3)
    torch.testing.assert_close(back[3:], rows[3:], rtol=0, atol=0.08)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_k"])
def test_quantize_in_chunks(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows go through a few at a time (here 3 of 256): the blocks are those of one pass."""
    w = torch.randn(10, 256, generator=torch.Generator().manual_seed(4))
    whole = quantize(w, kind)
    monkeypatch.setattr(ggml_quants, "_QUANTIZE_CHUNK", 1000)
    chunked = quantize(w, kind)
    assert chunked.shape == whole.shape and torch.equal(chunked.data, whole.data)


def test_quantize_kind_for() -> None:
    assert quantize_kind_for("q4_k", 512) == "q4_k"
    assert quantize_kind_for("q4_k", 96) == "q4_0"  # not whole super-blocks
    assert quantize_kind_for("q8_0", 96) == "q8_0"
    assert quantize_kind_for("q4_k", 48) is None
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(torch.randn(4, 96), "q4_k")
    with pytest.raises(ValueError, match="unknown quantisation"):
        quantize(torch.randn(4, 256), "q5_k")
