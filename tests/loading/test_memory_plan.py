"""The memory plan, made before loading, against the model actually loaded: the bytes of every
parameter (allocated, or GGUF blocks used in place, found in the file's mapping of
/proc/self/maps), the buffers and the KV cache are equal, byte for byte. A model that does not
fit stops `info`, `generate` and the offline API before any weight is read; `info` on a GGUF or
a safetensors folder reads headers only."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from moeflow import env
from moeflow.api import LLM
from moeflow.bench.gguf_models import bench_gguf, write_gguf_layout
from moeflow.bench.report import count_parameters
from moeflow.cli import main
from moeflow.config import EngineArgs
from moeflow.engine import factory
from moeflow.errors import InsufficientMemoryError
from moeflow.kernels import cpu_ext
from moeflow.loading import memory_plan
from moeflow.loading.memory_plan import Available, MemoryPlan, available_memory, check_memory
from moeflow.loading.presets import PRESETS
from moeflow.loading.quantize import keep_quantized_types
from moeflow.sampling_params import SamplingParams
from moeflow.weights import gguf, safetensors
from moeflow.weights.ggml_quants import QUANTIZE_TYPES, GGMLType
from tests.helpers.checkpoints import make_deepseek_checkpoint, make_tiny_checkpoint
from tests.helpers.gguf import TINY_QWEN3_MOE

# Small lengths keep the KV cache (and the test) small; the plan must still match it exactly.
_SMALL = {"device": "cpu", "max_model_len": 128, "kv_cache_tokens": 256}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memplan")
    return {
        "llama": make_tiny_checkpoint("llama", root / "llama"),
        "qwen3_moe": make_tiny_checkpoint("qwen3_moe", root / "qwen3_moe"),
        "deepseek_v3": make_deepseek_checkpoint("v3", root / "deepseek_v3"),
    }


@pytest.fixture
def tiny_moe_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A 2-layer Qwen3-MoE GGUF in Q4_K_M (Q4_K experts, a Q6_K v beside Q4_K q/k)."""
    cpu_ext.available()  # built (or found) under the session's cache dir before it moves
    monkeypatch.setattr(env, "MOEFLOW_CACHE_DIR", str(tmp_path))
    return bench_gguf("tiny-qwen3-moe", TINY_QWEN3_MOE, "q4_k_m", num_layers=2)


def _held(llm: LLM) -> tuple[int, int, int]:
    """(allocated, mapped, buffers) bytes of the loaded model: a parameter is mapped when its
    data lies inside the model file's mapping in /proc/self/maps."""
    path = os.path.realpath(llm.loaded.path)
    ranges = []
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == path:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    allocated = mapped = 0
    for p in llm.loaded.model.parameters():
        nbytes = p.numel() * p.element_size()
        if any(start <= p.data_ptr() < end for start, end in ranges):
            mapped += nbytes
        else:
            allocated += nbytes
    buffers = sum(b.numel() * b.element_size() for b in llm.loaded.model.buffers())
    return allocated, mapped, buffers


def _assert_plan_matches(args: EngineArgs) -> MemoryPlan:
    plan = factory.plan(args)
    llm = LLM.from_engine_args(args)
    allocated, mapped, buffers = _held(llm)
    assert (plan.weights_allocated, plan.weights_mapped) == (allocated, mapped)
    assert plan.buffers == buffers
    assert plan.kv_cache == llm.kv_cache_bytes
    assert plan.engine_config == llm.config
    loaded_counts = count_parameters(llm.loaded.model, llm.loaded.model_config)
    assert count_parameters(plan.model, plan.model_config) == loaded_counts
    return plan


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_gguf_plan_matches_the_loaded_model(smollm2_gguf: str, dtype: str) -> None:
    """SmolLM2 (Q4_1, tied head, llama's Q/K rows permuted back: copies, not mapped)."""
    plan = _assert_plan_matches(EngineArgs(model=smollm2_gguf, dtype=dtype, **_SMALL))
    if keep_quantized_types("cpu"):
        assert plan.weights_mapped > plan.weights_allocated > 0  # most blocks used in place


def test_moe_gguf_plan_matches_the_loaded_model(tiny_moe_gguf: Path) -> None:
    """Experts kept as the file's blocks, q/k/v of two types kept as parts."""
    plan = _assert_plan_matches(EngineArgs(model=str(tiny_moe_gguf), **_SMALL))
    if keep_quantized_types("cpu"):
        e, i, h = 16, 256, 256  # every expert's gate, up (Q4_K) and down (Q6_K, its last layer)
        assert plan.weights_mapped >= 2 * e * (2 * i * h * 144 // 256 + h * i * 144 // 256)


def test_no_mmap_plan_matches_the_loaded_model(tiny_moe_gguf: Path) -> None:
    """--no-mmap: the blocks used in place are read into the process's memory, so the plan
    counts them allocated (none mapped), and the model generates the mapped model's tokens."""
    mapped = _assert_plan_matches(EngineArgs(model=str(tiny_moe_gguf), **_SMALL))
    args = EngineArgs(model=str(tiny_moe_gguf), use_mmap=False, **_SMALL)
    plan = _assert_plan_matches(args)
    assert plan.weights_mapped == 0
    assert plan.weights_allocated == mapped.weights_allocated + mapped.weights_mapped
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[7, 100, 42, 3], list(range(30, 50))]
    outs = []
    for use_mmap in (True, False):
        llm = LLM(str(tiny_moe_gguf), use_mmap=use_mmap, **_SMALL)
        outs.append([o.token_ids for o in llm.generate(prompts, params)])
        del llm
    assert outs[0] == outs[1] and all(outs[0])


@pytest.mark.skipif(cpu_ext.isa() != "avx512", reason="Q4_K experts repack for AVX-512 only")
def test_repacked_experts_plan_matches_the_loaded_model(
    tiny_moe_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int8 activations: the Q4_K blocks of the experts and of the linear layers are repacked
    copies (allocated); the rest stays mapped (the embedding and head tables among them)."""
    monkeypatch.setattr(env, "MOEFLOW_CPU_INT8", True)
    mapped = _assert_plan_matches(EngineArgs(model=str(tiny_moe_gguf), **_SMALL))
    monkeypatch.setattr(env, "MOEFLOW_CPU_REPACK", False)
    kept = _assert_plan_matches(EngineArgs(model=str(tiny_moe_gguf), **_SMALL))
    with gguf.GGUFReader(tiny_moe_gguf) as reader:
        q4k = sum(
            t.nbytes
            for t in reader.tensors.values()
            if t.ggml_type == GGMLType.Q4_K and t.name not in ("token_embd.weight", "output.weight")
        )
    moved = mapped.weights_allocated - kept.weights_allocated  # mapped blocks now copies
    assert moved == kept.weights_mapped - mapped.weights_mapped
    # the experts' Q4_K (gate and up of both layers, down of the first) at least; merged q/k/v
    # rows were copies already
    assert 16 * (2 * 2 + 1) * 256 * 256 * 144 // 256 < moved <= q4k


def test_moe_gguf_plan_without_the_cpu_kernels(
    tiny_moe_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the kernels every block is dequantised on load: all allocated, none mapped."""
    monkeypatch.setattr(cpu_ext, "ops", lambda: None)
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    plan = _assert_plan_matches(EngineArgs(model=str(tiny_moe_gguf), **_SMALL))
    assert plan.weights_mapped == 0


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_plan_matches_the_loaded_model(
    tiny_folders: dict[str, Path], family: str, dtype: str
) -> None:
    plan = _assert_plan_matches(EngineArgs(model=str(tiny_folders[family]), dtype=dtype, **_SMALL))
    assert plan.weights_mapped == 0


@pytest.mark.parametrize("kind", sorted(QUANTIZE_TYPES))
def test_quantize_plan_matches_the_loaded_model(tiny_folders: dict[str, Path], kind: str) -> None:
    if not keep_quantized_types("cpu"):
        pytest.skip(f"--quantize needs the CPU kernels: {cpu_ext.unavailable_reason()}")
    for family in ("llama", "qwen3_moe"):
        args = EngineArgs(model=str(tiny_folders[family]), quantize=kind, **_SMALL)
        plan = _assert_plan_matches(args)
        floats = EngineArgs(model=str(tiny_folders[family]), dtype="float32", **_SMALL)
        assert plan.weights_allocated < factory.plan(floats).weights_allocated


def test_preset_plan_matches_the_loaded_model() -> None:
    tiny = {**TINY_QWEN3_MOE, "num_hidden_layers": 2}
    _assert_plan_matches(
        EngineArgs(model="preset:qwen3-30b-a3b", hf_overrides=tiny, dtype="float32", **_SMALL)
    )


def test_info_reads_headers_only(
    smollm2_gguf: str,
    tiny_folders: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No tensor is read (GGUFReader.raw / load, SafetensorsFile.get) and nothing is loaded."""

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data read")

    monkeypatch.setattr(gguf.GGUFReader, "raw", no_data)
    monkeypatch.setattr(gguf.GGUFReader, "load", no_data)
    monkeypatch.setattr(safetensors.SafetensorsFile, "get", no_data)
    monkeypatch.setattr(factory, "load_model", no_data)
    for model in (smollm2_gguf, str(tiny_folders["qwen3_moe"])):
        assert main(["info", "--model", model, "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert "memory plan" in out and "verdict        fits" in out
        assert "parameters" in out and "KV cache" in out


def test_info_no_mmap_counts_every_block_allocated(
    smollm2_gguf: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`moeflow info --no-mmap`: the blocks the engine would map are counted as allocated."""
    lines = {}
    for flags in ([], ["--no-mmap"]):
        assert main(["info", "--model", smollm2_gguf, "--device", "cpu", *flags]) == 0
        out = capsys.readouterr().out
        lines[bool(flags)] = next(ln for ln in out.splitlines() if "weights        " in ln)
    if keep_quantized_types("cpu"):
        assert "mapped from the file" in lines[False]
    assert "mapped" not in lines[True] and "allocated" in lines[True]


def test_info_on_a_full_size_gguf_reads_no_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Qwen3-30B-A3B in Q4_K_M, llama.cpp's layout at full size (17 GiB of tensors, a sparse
    file): the plan comes from its header alone."""
    path = tmp_path / "qwen3-30b-a3b-q4_k_m.gguf"
    size = write_gguf_layout(PRESETS["qwen3-30b-a3b"], "q4_k_m", path)
    assert size > 17 * 2**30

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data read")

    monkeypatch.setattr(gguf.GGUFReader, "raw", no_data)
    monkeypatch.setattr(gguf.GGUFReader, "load", no_data)
    assert main(["info", "--model", str(path), "--device", "cpu"]) in (0, 1)  # 1: no room here
    out = capsys.readouterr().out
    assert "total          30,532,122,624 (30.53B)" in out  # the published parameter count
    assert "experts          128 routed, top-8" in out

    plan = factory.plan(EngineArgs(model=str(path), device="cpu"))
    with gguf.GGUFReader(path) as reader:  # header only: raw / load are never called
        experts = sum(t.nbytes for t in reader.tensors.values() if "_exps" in t.name)
    if keep_quantized_types("cpu"):
        assert experts <= plan.weights_mapped < size  # the experts stay in the file's blocks
        assert plan.weights_allocated < 2**30


def _too_small(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    monkeypatch.setattr(memory_plan, "available_memory", lambda device: Available(nbytes, "test"))


def test_a_model_that_does_not_fit_exits_before_loading(
    tiny_folders: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader ran")

    monkeypatch.setattr(factory, "load_model", never)
    _too_small(monkeypatch, 2**20)
    model = str(tiny_folders["llama"])
    assert main(["generate", "--model", model, "--device", "cpu", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "does not fit in memory" in err and "1.00 MiB is available (test)" in err
    assert "MOEFLOW_SKIP_MEMORY_CHECK" in err

    assert main(["info", "--model", model, "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "does NOT fit" in captured.out  # the plan is printed, then the error
    assert "does not fit in memory" in captured.err

    with pytest.raises(InsufficientMemoryError, match="does not fit in memory"):
        LLM(model=model, device="cpu")


def test_skip_memory_check_loads_anyway(
    tiny_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _too_small(monkeypatch, 2**20)
    monkeypatch.setattr(env, "MOEFLOW_SKIP_MEMORY_CHECK", True)
    with caplog.at_level(logging.WARNING, logger="moeflow"):
        llm = LLM(model=str(tiny_folders["llama"]), **_SMALL)
    assert llm.generate([1, 2, 3])[0].token_ids
    assert "loading anyway" in caplog.text


def test_mapped_blocks_that_do_not_fit_warn(
    smollm2_gguf: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Mapped blocks may be evicted and read again: a warning, not an error."""
    plan = factory.plan(EngineArgs(model=smollm2_gguf, **_SMALL))
    if not plan.weights_mapped:
        pytest.skip("no block is used in place without the CPU kernels")
    _too_small(monkeypatch, plan.allocated + plan.weights_mapped // 2)
    plan = factory.plan(EngineArgs(model=smollm2_gguf, **_SMALL))
    assert plan.fits and not plan.mapped_fits
    with caplog.at_level(logging.WARNING, logger="moeflow"):
        check_memory(plan)
    assert "read pages from disk again" in caplog.text
    _too_small(monkeypatch, plan.allocated - 1)
    with pytest.raises(InsufficientMemoryError):
        check_memory(factory.plan(EngineArgs(model=smollm2_gguf, **_SMALL)))


def test_available_memory_takes_the_cgroup_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 4000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(memory_plan, "_MEMINFO", str(meminfo))
    monkeypatch.setattr(memory_plan, "_CGROUP", str(cgroup))
    assert available_memory("cpu").bytes == 4000000 * 1024  # no cgroup files: MemAvailable
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert available_memory("cpu").bytes == 4000000 * 1024  # no limit
    (cgroup / "memory.max").write_text(f"{3 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{2**30}\n")
    got = available_memory("cpu")
    assert got.bytes == 2 * 2**30  # the limit leaves less than MemAvailable
    assert "cgroup memory.max 3.00 GiB" in got.source
    (cgroup / "memory.stat").write_text(f"active_file 5\ninactive_file {2**29}\n")
    assert available_memory("cpu").bytes == 2 * 2**30 + 2**29  # inactive page cache is reclaimed
    (cgroup / "memory.current").write_text(f"{4 * 2**30}\n")
    (cgroup / "memory.stat").unlink()
    assert available_memory("cpu").bytes == 0  # over the limit already
    meminfo.unlink()
    (cgroup / "memory.max").write_text("max\n")
    assert available_memory("cpu").bytes is None  # nothing known: no check


def test_kv_cache_size_and_how_it_was_chosen(tiny_folders: dict[str, Path]) -> None:
    folder = str(tiny_folders["llama"])
    auto = factory.plan(EngineArgs(model=folder, dtype="float32", device="cpu", max_model_len=256))
    assert "auto on a CPU" in auto.kv_sizing
    per_token = 2 * 3 * 2 * 16 * 4  # K and V x layers x kv_heads x head_dim x fp32
    assert auto.kv_bytes_per_token == per_token
    assert auto.kv_cache == (auto.engine_config.num_kv_blocks + 1) * 16 * per_token
    given = factory.plan(
        EngineArgs(model=folder, dtype="float32", device="cpu", kv_cache_tokens=512)
    )
    assert given.kv_sizing == "--kv-cache-tokens 512"
    assert given.kv_cache == (512 // 16 + 1) * 16 * per_token
    assert torch.device(given.engine_config.device).type == "cpu"


def test_the_dry_runs_rotary_tables_are_never_the_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the dry run's `torch.get_default_device()` answers the target device (as a real
    load's does), so the cached cos/sin tables were keyed alike: the real load took the dry
    run's meta tables, in the default dtype (bf16), and the rotary kernel read no memory. Here
    the CPU is made to answer as a GPU does."""
    from moeflow.layers.rotary import RotaryEmbedding

    monkeypatch.setattr(torch, "get_default_device", lambda: torch.device("cpu"))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with memory_plan._OnMeta(), torch.device("cpu"):
            planned = RotaryEmbedding(64, 4096, 12345.0)
        real = RotaryEmbedding(64, 4096, 12345.0)
    finally:
        torch.set_default_dtype(prev)
    assert planned.cos_cache.is_meta and planned.cos_cache.dtype == torch.float32
    for table in (real.cos_cache, real.sin_cache):
        assert not table.is_meta and table.dtype == torch.float32 and table.shape == (4096, 64)
    assert torch.equal(real.cos_cache[1, :32], torch.cos(1.0 / 12345.0 ** (torch.arange(32) / 32)))
