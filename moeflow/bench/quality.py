"""`moeflow bench --workload quality`: how far the fast int8-activation CPU path moves the
model's next-token distributions from an fp32 reference, on a fixed text shipped with the
package, beside llama.cpp's own divergence of the same quantised file from its F32 copy.

The text is split like llama-perplexity splits it: chunks of --chunk-len tokens (BOS first when
the vocabulary adds one), the first half of each chunk is context, the tokens of the second
half are scored. Each chunk is one request: its context half is prefilled, then every scored
token goes through a decode step, teacher-forced (the text's token replaces the sampled one),
all chunks decoding together. So the scored logits come from the decode kernels (the fused
CPU decode step, the quantised GEMVs, the grouped MoE kernel): what users see after the
prompt. (Prefill of more than 16 rows multiplies with dequantised weights on the exact path and
through the int8 GEMMs on the int8 path: the scored tokens' context differs by that too.)

Three runs, each in its own process (a crash is reported): `reference` (every weight
dequantised to float32, no compiled kernel: plain torch), `exact` (the CPU kernels with fp32
activations, MOEFLOW_CPU_INT8=0) and `int8` (MOEFLOW_CPU_INT8=1, the default: activations
quantised to int8 as llama.cpp does).
Each writes its scored log-probabilities to a .npy file; KL(reference || x), top-1 agreement
and the text's NLL are computed here.

Shape legend: C chunks, T scored tokens per chunk, V vocab."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeflow import env
from moeflow.bench.gguf_models import FTYPES, bench_gguf
from moeflow.bench.llama_cpp_tools import PERPLEXITY, find_tool
from moeflow.kernels import cpu_ext
from moeflow.loading.presets import preset_config
from moeflow.loading.source import Preset, default_model_path, parse_model_source
from moeflow.weights.ggml_quants import GGMLType
from moeflow.weights.gguf import GGUFReader, GGUFValueType
from moeflow.weights.gguf_writer import GGUFWriter

TEXT = Path(__file__).with_name("quality_text.txt")
CONFIGS = ("reference", "exact", "int8")
# The F32 copy for llama.cpp's base logits is written only when it takes at most this share
# of the memory (llama.cpp maps it) and of the free disk.
_F32_SHARE = 0.5
_ROWS_PER_PASS = 64  # scored tokens per metric pass (bounds the float64 temporaries)


def run_quality(args: argparse.Namespace) -> int:
    """The workload described by the `moeflow bench` arguments; 0 on success."""
    threads = args.threads or os.cpu_count() or 1
    if args.chunk_len < 4 or args.chunk_len % 2:
        raise ValueError("--chunk-len: an even number of tokens >= 4")
    path = _model_file(args)
    text_path = Path(args.text) if args.text else TEXT
    print(f"model: {path} ({os.path.getsize(path) / 1e9:.2f} GB)")
    print(f"text: {text_path}, chunks of {args.chunk_len} tokens, {threads} threads")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="moeflow-quality-") as tmp:
        for config in CONFIGS:
            spec = {
                "path": str(path),
                "text": str(text_path),
                "chunk_len": args.chunk_len,
                "threads": threads,
                "config": config,
                "out": os.path.join(tmp, f"{config}.npy"),
            }
            results[config] = _run_child(spec)
        ref = results["reference"]
        if "error" not in ref:
            ref_lp = np.load(ref["out"], mmap_mode="r", allow_pickle=False)
            targets = np.asarray(ref["targets"], dtype=np.int64)
            ref.update(_metrics(ref_lp, ref_lp, targets))
            for config in CONFIGS[1:]:
                run = results[config]
                if "error" not in run:
                    x = np.load(run["out"], mmap_mode="r", allow_pickle=False)
                    run.update(_metrics(ref_lp, x, targets))
            del ref_lp
        for run in results.values():
            run.pop("out", None)
            run.pop("targets", None)
    peer = None
    if args.compare not in ("none", ""):
        tokens = ref.get("tokens") if "error" not in ref else None
        peer = run_peer(path, text_path, args.chunk_len, threads, tokens)
    for run in results.values():
        run.pop("tokens", None)
    print(_report(results, peer))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "command": " ".join(sys.argv),
                    "model": str(path),
                    "text": str(text_path),
                    "chunk_len": args.chunk_len,
                    "moeflow": results,
                    "llama_cpp": peer,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in results.values()) else 1


def _model_file(args: argparse.Namespace) -> Path:
    if args.model is None:
        return Path(default_model_path())
    source = parse_model_source(args.model)
    if isinstance(source, Preset):
        if args.gguf_type not in FTYPES:
            raise ValueError(f"--gguf-type: one of {', '.join(FTYPES)}")
        return bench_gguf(source.name, preset_config(source.name), args.gguf_type, args.num_layers)
    path = Path(source.path)
    if path.suffix != ".gguf":
        raise ValueError("--workload quality runs a .gguf file or preset:<name>")
    return path


# ---- moeflow's side, one configuration per process ----------------------------------------------
def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    code = "import sys; from moeflow.bench.quality import child_main; child_main(sys.argv[1])"
    environ = {**os.environ, "MOEFLOW_CPU_INT8": "1" if spec["config"] == "int8" else "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=environ,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"{spec['config']} run failed (status {proc.returncode}): {tail}"}
    return {**json.loads(lines[-1]), "out": spec["out"]}


def child_main(spec_json: str) -> None:
    """One configuration, in its own process: writes the scored log-probabilities [C, T, V]
    to spec["out"] and prints one JSON line (the tokens, the targets [C, T] flattened)."""
    from moeflow.api import LLM
    from moeflow.sampling_params import SamplingParams

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    if spec["config"] == "reference":  # weights dequantised on load, plain torch everywhere
        setattr(cpu_ext, "ops", lambda: None)  # noqa: B010
        setattr(cpu_ext, "available", lambda: False)  # noqa: B010
    chunk_len = spec["chunk_len"]
    llm = LLM(
        model=spec["path"],
        device="cpu",
        dtype="float32",
        max_model_len=chunk_len + 16,
        kv_cache_tokens=16 * (chunk_len + 16),
        max_num_seqs=16,
        max_num_batched_tokens=max(2048, chunk_len),
        enable_prefix_caching=False,
        overlap_schedule=False,
    )
    text = Path(spec["text"]).read_text(encoding="utf-8")
    tokens, chunks = chunk_tokens(llm.tokenizer, text, chunk_len)
    first = chunk_len // 2
    num_scored = chunk_len - 1 - first  # logits at positions first .. chunk_len - 2
    vocab = llm.loaded.model_config.vocab_size
    out = np.lib.format.open_memmap(
        spec["out"], mode="w+", dtype=np.float32, shape=(len(chunks), num_scored, vocab)
    )  # [C, T, V]
    chunk_of: dict[str, int] = {}
    runner = llm.engine.runner
    run = runner.run

    def run_and_keep(batch: Any, carry: Any = None, profile: Any = None) -> torch.Tensor:
        logits = run(batch, carry, profile)  # [S, V] for the rows that sample
        rows = [
            r
            for r, n in zip(batch.reqs, batch.num_new_tokens, strict=True)
            if r.num_computed_tokens + n == r.num_tokens
        ]
        for i, req in enumerate(rows):
            pos = req.num_tokens - 1
            if first <= pos < chunk_len - 1:
                lp = torch.log_softmax(logits[i, :vocab].double(), dim=-1)  # [V]
                out[chunk_of[req.request_id], pos - first] = lp.float().numpy()
        return logits

    runner.run = run_and_keep  # type: ignore[method-assign]
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=chunk_len - first, ignore_eos=True)
    for c, chunk in enumerate(chunks):
        chunk_of[engine.add_request(chunk[:first], params).request_id] = c
    reqs = list(engine.requests.values())
    text_of = {r.request_id: chunks[chunk_of[r.request_id]] for r in reqs}
    while engine.has_unfinished():
        for req in engine.step():  # teacher forcing: the text's token, not the sampled one
            if req.error is not None:
                raise RuntimeError(req.error)
            req.output_ids[-1] = text_of[req.request_id][req.num_tokens - 1]
    out.flush()
    targets = [t for chunk in chunks for t in chunk[first + 1 :]]
    print(json.dumps({"tokens": tokens, "targets": targets}), flush=True)


def chunk_tokens(tokenizer: Any, text: str, chunk_len: int) -> tuple[list[int], list[list[int]]]:
    """The text's tokens and its whole chunks of `chunk_len` tokens, as llama-perplexity makes
    them: tokenized once (BOS first when the vocabulary adds one), each chunk's first token
    replaced by BOS in that case."""
    tokens = tokenizer.encode(text, add_special_tokens=True)
    plain = tokenizer.encode(text, add_special_tokens=False)
    bos = tokens[0] if len(tokens) == len(plain) + 1 else None
    num_chunks = len(tokens) // chunk_len
    if num_chunks < 1:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than --chunk-len {chunk_len}")
    chunks = [tokens[c * chunk_len : (c + 1) * chunk_len] for c in range(num_chunks)]
    if bos is not None:
        chunks = [[bos, *chunk[1:]] for chunk in chunks]
    return tokens, chunks


def _metrics(ref: np.ndarray, x: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """KL(ref || x) per scored token (mean, 99th percentile, max), top-1 agreement with ref
    (%), the mean NLL of the text's tokens under x and its perplexity."""
    vocab = ref.shape[-1]
    ref2, x2 = ref.reshape(-1, vocab), x.reshape(-1, vocab)  # [C*T, V]
    kl, same, nll = [], [], []
    for s in range(0, len(ref2), _ROWS_PER_PASS):
        r = torch.from_numpy(np.array(ref2[s : s + _ROWS_PER_PASS])).double()  # [R, V]
        q = torch.from_numpy(np.array(x2[s : s + _ROWS_PER_PASS])).double()  # [R, V]
        kl.append((r.exp() * (r - q)).sum(-1))
        same.append(r.argmax(-1) == q.argmax(-1))
        t = torch.from_numpy(targets[s : s + _ROWS_PER_PASS])
        nll.append(-q.gather(1, t[:, None])[:, 0])
    kls, nlls = torch.cat(kl), torch.cat(nll)
    mean_nll = float(nlls.mean())
    return {
        "num_scored": len(kls),
        "kl_mean": float(kls.mean()),
        "kl_p99": float(torch.quantile(kls, 0.99)),
        "kl_max": float(kls.max()),
        "top1_agree_pct": 100.0 * float(torch.cat(same).double().mean()),
        "nll_mean": mean_nll,
        "ppl": math.exp(mean_nll),
    }


# ---- llama.cpp's side ---------------------------------------------------------------------------
def run_peer(
    path: Path, text: Path, chunk_len: int, threads: int, tokens: list[int] | None
) -> dict[str, Any]:
    """llama-perplexity's KL divergence of `path` from its F32 copy (base logits from the F32
    file, then the quantised file against them), on the same text and chunks."""
    binary = find_tool(PERPLEXITY)
    if binary is None:
        return {"note": f"skipped: no {PERPLEXITY} (set MOEFLOW_LLAMA_CPP_BIN to its folder)"}
    f32 = _f32_path(path)
    try:
        if not f32.is_file():
            reason = _f32_unfit_reason(path, f32)
            if reason:
                return {"note": f"skipped: {reason}"}
            write_f32_gguf(path, f32)
    except (OSError, ValueError) as e:
        return {"note": f"skipped: could not write the F32 copy ({e})"}
    with tempfile.TemporaryDirectory(prefix="moeflow-kld-") as tmp:
        base = os.path.join(tmp, "base.kld")
        common = ["-c", str(chunk_len), "-b", str(chunk_len), "-t", str(threads)]
        common += ["--kl-divergence-base", base]
        status, log = _run([str(binary), "-m", str(f32), "-f", str(text), *common])
        if status != 0 or not os.path.isfile(base):
            return {"note": f"base logits failed ({_status(status)}): {_tail(log)}"}
        peer: dict[str, Any] = {"f32_file": str(f32)}
        peer["tokens_match"] = _tokens_note(base, tokens)
        status, log = _run([str(binary), "-m", str(path), *common, "--kl-divergence"])
    peer.update(parse_kld_log(log))
    if status != 0 or "kl_mean" not in peer:
        peer["note"] = f"KL run failed ({_status(status)}): {_tail(log)}"
    return peer


def parse_kld_log(log: str) -> dict[str, float]:
    """The figures of llama-perplexity --kl-divergence's summary."""
    patterns = {
        "kl_mean": r"Mean\s+KLD:\s+([-\d.eE+]+)",
        "kl_p99": r"99\.0%\s+KLD:\s+([-\d.eE+]+)",
        "kl_max": r"Maximum KLD:\s+([-\d.eE+]+)",
        "top1_agree_pct": r"Same top p:\s+([-\d.eE+]+)",
        "ppl": r"Mean PPL\(Q\)\s+:\s+([-\d.eE+]+)",
        "ppl_base": r"Mean PPL\(base\)\s+:\s+([-\d.eE+]+)",
    }
    found = {}
    for key, pattern in patterns.items():
        m = re.search(pattern, log)
        if m:
            found[key] = float(m.group(1))
    if "ppl" in found:
        found["nll_mean"] = math.log(found["ppl"])
    return found


def write_f32_gguf(src: Path, dst: Path) -> int:
    """A copy of the GGUF file `src` with every tensor dequantised to F32 (metadata kept, its
    value types re-inferred: ints UINT32, the token types INT32, empty arrays of strings; file
    type ALL_F32)."""
    reader = GGUFReader(src)
    w = GGUFWriter()
    for key, value in reader.metadata.items():
        if key in ("general.alignment", "general.quantization_version"):
            continue
        if key.startswith("split."):  # a split set's copy is one file
            continue
        if key == "general.file_type":
            value = 0  # LLAMA_FTYPE_ALL_F32
        vtype = GGUFValueType.INT32 if key == "tokenizer.ggml.token_type" else None
        if isinstance(value, list) and not value:
            vtype = GGUFValueType.STRING  # (an empty merges list, llama.cpp requires it)
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            vtype = GGUFValueType.INT32
        w.add(key, value, vtype)
    for name, info in reader.tensors.items():
        w.add_tensor(
            name,
            info.shape,
            GGMLType.F32,
            lambda name=name: reader.load(name, torch.float32).numpy(),
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    size = w.write(tmp)
    os.replace(tmp, dst)
    reader.close()
    return size


def _f32_path(path: Path) -> Path:
    stat = path.stat()
    key = f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    return Path(env.MOEFLOW_CACHE_DIR) / "bench-models" / f"{key}-f32.gguf"


def _f32_unfit_reason(path: Path, f32: Path) -> str | None:
    with GGUFReader(path) as reader:
        need = sum(4 * math.prod(t.shape) for t in reader.tensors.values())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    f32.parent.mkdir(parents=True, exist_ok=True)
    free = os.statvfs(f32.parent).f_bavail * os.statvfs(f32.parent).f_frsize
    if need > _F32_SHARE * min(memory, free):
        return (
            f"the F32 copy would take {need / 1e9:.1f} GB (memory {memory / 1e9:.1f} GB, "
            f"free disk {free / 1e9:.1f} GB)"
        )
    return None


def _tokens_note(base: str, tokens: list[int] | None) -> str:
    """Whether llama.cpp's tokens (in its base-logits file) are moeflow's."""
    with open(base, "rb") as f:
        head = f.read(8 + 12)
        if head[:8] != b"_logits_":
            return "unknown (unexpected base file)"
        n_ctx, _, n_chunk = np.frombuffer(head[8:], dtype=np.int32)
        theirs = np.fromfile(f, dtype=np.int32, count=int(n_ctx) * int(n_chunk)).tolist()
    if tokens is None:
        return f"unknown (llama.cpp: {len(theirs)} tokens in {n_chunk} chunks)"
    ours = tokens[: len(theirs)]
    if ours == theirs:
        return f"yes ({len(theirs)} tokens in {n_chunk} chunks)"
    differ = sum(a != b for a, b in zip(ours, theirs, strict=False))
    return f"no: {differ} of {len(theirs)} tokens differ"


def _run(cmd: list[str], timeout_s: float = 3600.0) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=timeout_s, errors="replace"
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, f"{type(e).__name__}: {e}"
    return proc.returncode, proc.stdout + proc.stderr


def _status(status: int) -> str:
    return f"signal {-status}" if status < 0 else f"status {status}"


def _tail(log: str) -> str:
    return " | ".join(log.strip().splitlines()[-3:])


def _report(results: dict[str, dict[str, Any]], peer: dict[str, Any] | None) -> str:
    head = (
        f"{'':<28} {'KL mean':>10} {'KL p99':>10} {'KL max':>10} {'top-1 %':>8} "
        f"{'NLL':>7} {'PPL':>8}"
    )
    lines = ["", "KL(reference || x) per scored token, nats", head, "-" * len(head)]
    labels = {
        "reference": "moeflow reference (fp32)",
        "exact": "moeflow exact (fp32 act.)",
        "int8": "moeflow int8 (fast path)",
    }
    for config, run in results.items():
        if "error" in run:
            lines.append(f"{labels[config]:<28} {run['error']}")
            continue
        lines.append(_row(labels[config], run, with_kl=config != "reference"))
    if peer is not None:
        if "kl_mean" in peer:
            lines.append(_row("llama.cpp (vs its F32 copy)", peer, with_kl=True))
            lines.append(f"llama.cpp base PPL {peer.get('ppl_base', float('nan')):.3f}")
            lines.append(f"llama.cpp tokens are moeflow's: {peer.get('tokens_match')}")
        if peer.get("note"):
            lines.append(f"llama.cpp: {peer['note']}")
    scored = next((r["num_scored"] for r in results.values() if "num_scored" in r), None)
    lines.append(
        f"{scored} scored tokens (second half of each chunk), moeflow's through teacher-forced "
        "decode steps; llama.cpp's through its batched evaluation of each chunk"
    )
    return "\n".join(lines)


def _row(label: str, run: dict[str, Any], with_kl: bool) -> str:
    def f(key: str, fmt: str) -> str:
        v = run.get(key)
        return "-" if v is None or not with_kl and key.startswith(("kl", "top1")) else fmt % v

    return (
        f"{label:<28} {f('kl_mean', '%.3g'):>10} {f('kl_p99', '%.3g'):>10} "
        f"{f('kl_max', '%.3g'):>10} {f('top1_agree_pct', '%.2f'):>8} {f('nll_mean', '%.4f'):>7} "
        f"{f('ppl', '%.3f'):>8}"
    )
