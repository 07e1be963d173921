"""The routed experts' weights of one MoE layer, stacked [E, ...] per projection: loaded (each
rank only its experts or its slice of the intermediate size), held in float or kept in their
GGUF blocks (or quantised on load with --quantize), and the float or block tensors the kernels
read (kernels/fused_moe.py). layers/moe.py routes tokens to them.

Shape legend: E experts (slots on this rank), H hidden, I expert intermediate size."""

from __future__ import annotations

import logging

import torch
from torch import nn

from moeflow.errors import ModelFormatError
from moeflow.kernels.fused_moe import QuantizedExperts, quantized_experts_supported
from moeflow.kernels.quant_gemm import repacked_for_cpu
from moeflow.layers.linear import copy_checked, narrow_shard, split_size
from moeflow.weights.ggml_quants import (
    QUANTIZE_TYPES,
    QuantizedTensor,
    quantize,
    quantize_kind_for,
)

logger = logging.getLogger("moeflow")


class FusedExperts(nn.Module):
    """Every routed expert's weights stacked, in one of two forms:
    - float: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I], filled from per-expert
      checkpoint tensors (shard "gate:e", "up:e", "down:e"), from stacked ones (whole, or the
      stacked halves "gate" / "up" of a GGUF file) or from random weights;
    - quantised: ggml blocks, `gate_proj` / `up_proj` [E, I, row_bytes(H)] and `down_proj`
      [E, H, row_bytes(I)] uint8, run by the grouped CPU kernel (kernels.fused_moe_quantized)
      where that kernel runs experts of this make-up: a GGUF file's stacked blocks kept as they
      are (usually views of the memory-mapped file; elsewhere dequantised into the float form
      on load), or float experts quantised by `--quantize` (`quantize`).
    NOTE: w13 and w2 start on the meta device and are allocated by the first float tensor
    loaded (or `materialize()`), so experts that stay quantised never reserve float memory.

    Parallel: `slots` names the checkpoint expert held in each of the E local slots (None: expert
    e in slot e, every expert); `tp` = (rank, size) splits every expert's intermediate size.
    Checkpoint tensors of experts not held here are skipped unread; held ones are narrowed to
    this rank's rows (ggml blocks too, and kept as blocks)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act: str = "silu",
        slots: list[int] | None = None,
        tp: tuple[int, int] = (0, 1),
    ) -> None:
        super().__init__()
        self.slots = slots
        self.tp_rank, self.tp_size = tp
        if slots is not None:
            num_experts = len(slots)
        intermediate_size = split_size(intermediate_size, self.tp_size, "expert intermediate rows")
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.hidden_size, self.act = hidden_size, act
        self._device = torch.get_default_device()
        self._dtype = torch.get_default_dtype()
        self.w13 = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, device="meta"),
            requires_grad=False,
        )
        self.w2 = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, device="meta"),
            requires_grad=False,
        )
        self.quantized: QuantizedExperts | None = None
        self._pending: dict[str, QuantizedTensor] = {}  # stacked blocks waiting for the rest
        # `--quantize`: the types of gate / up rows (H weights) and of down rows (I weights), and
        # the blocks [E, N, row_bytes] per projection that experts' float tensors are written to
        self._quantize_kinds: tuple[str, str] | None = None
        self._blocks: dict[str, torch.Tensor] = {}
        self._blocks_filled: set[str] = set()  # the shards ("gate:e", ...) written to _blocks

    def materialize(self) -> None:
        """Allocate the float weights (uninitialised) on the model's device."""
        if self.w13.is_meta:
            self.w13 = nn.Parameter(
                torch.empty_like(self.w13, device=self._device, dtype=self._dtype),
                requires_grad=False,
            )
            self.w2 = nn.Parameter(
                torch.empty_like(self.w2, device=self._device, dtype=self._dtype),
                requires_grad=False,
            )

    @property
    def is_parallel(self) -> bool:
        return self.slots is not None or self.tp_size > 1

    def checkpoint_experts(self) -> list[int]:
        """The checkpoint experts whose weights this layer holds, in order."""
        return sorted(set(self.slots)) if self.slots is not None else list(range(self.num_experts))

    def expected_shards(self, param_name: str) -> list[str]:
        kinds = ("gate", "up") if param_name == "w13" else ("down",)
        return [f"{k}:{e}" for e in self.checkpoint_experts() for k in kinds]

    def filled_shards(self, param_name: str, shard: str) -> list[str]:
        """A stacked half ("gate" / "up": every expert at once) fills each expert's shard."""
        if ":" in shard:
            return [shard]
        return [f"{shard}:{e}" for e in self.checkpoint_experts()]

    def load(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor, shard: str | None = None
    ) -> None:
        if self.is_parallel:
            self._load_parallel(param_name, tensor, shard)
        else:
            self._load_local(param_name, tensor, shard)

    def _load_local(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor, shard: str | None
    ) -> None:
        """A tensor of this layer's own experts and rows (local slot numbers)."""
        kind = shard if shard in ("gate", "up") else ("down" if param_name == "w2" else None)
        if isinstance(tensor, QuantizedTensor) and kind is not None and self.w13.is_meta:
            # the stacked blocks of one projection: kept once all three have come
            self._pending[kind] = tensor
            if len(self._pending) == 3:
                self._finish_quantized()
            return
        if (
            self._quantize_kinds is not None
            and self.w13.is_meta
            and isinstance(tensor, torch.Tensor)
            and shard is not None
            and ":" in shard
        ):
            self._quantize_shard(shard, tensor)  # one expert's projection, straight to blocks
            return
        # a float tensor beside blocks: every expert weight in floats
        self._flush_pending()
        self._flush_blocks()
        if isinstance(tensor, QuantizedTensor):
            tensor = tensor.dequantize(self._dtype)
        self._copy(param_name, tensor, shard)

    def _load_parallel(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor, shard: str | None
    ) -> None:
        """A checkpoint tensor (global expert numbering, whole intermediate size) into the local
        slots that hold its experts, narrowed to this rank's intermediate rows (gate / up) or
        columns (down; quantised blocks on block boundaries), then loaded as in one process:
        stacked quantised blocks stay blocks. Only the held experts' slices are read."""
        r, n = self.tp_rank, self.tp_size
        if shard is not None and ":" in shard:
            kind, _, expert = shard.partition(":")
            e = int(expert)
            i_dim = {"gate": 0, "up": 0, "down": 1}  # the intermediate dim of one expert
            one = narrow_shard(tensor, i_dim[kind], r, n)  # not read when no slot holds it
            for j, x in enumerate(self._slot_list()):
                if x == e:
                    if isinstance(one, QuantizedTensor):
                        one = one.dequantize(self._dtype)
                    self._load_local(param_name, one, f"{kind}:{j}")
            return
        if shard in ("gate", "up"):  # a stacked half [E, I, H]
            self._load_local(param_name, self._held(narrow_shard(tensor, 1, r, n)), shard)
        elif param_name == "w13":  # whole [E, 2I, H]: each half narrowed
            held = self._held(tensor)
            if isinstance(held, QuantizedTensor):
                held = held.dequantize(self._dtype)
            halves = [narrow_shard(h, 1, r, n) for h in held.chunk(2, dim=1)]
            self._load_local(param_name, torch.cat(halves, dim=1), None)  # type: ignore[arg-type]
        else:  # whole w2 [E, H, I]
            self._load_local(param_name, self._held(narrow_shard(tensor, 2, r, n)), None)

    def _held(self, stacked: torch.Tensor | QuantizedTensor) -> torch.Tensor | QuantizedTensor:
        """The slots' experts of a stacked [E, ...] tensor, in slot order: a copy of their
        bytes only (of a memory-mapped file's view, only those pages are read)."""
        index = torch.tensor(self._slot_list(), dtype=torch.int64)
        if isinstance(stacked, QuantizedTensor):
            data = stacked.data.index_select(0, index)  # [E_local, N, row_bytes]
            return QuantizedTensor(data, stacked.qtype, (len(index), *stacked.shape[1:]))
        return stacked.index_select(0, index)

    def _slot_list(self) -> list[int]:
        return self.slots if self.slots is not None else list(range(self.num_experts))

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for kind, q in pending.items():
            shard = None if kind == "down" else kind
            self._copy("w2" if kind == "down" else "w13", q.dequantize(self._dtype), shard)

    def _copy(self, param_name: str, tensor: torch.Tensor, shard: str | None) -> None:
        self.materialize()
        param: torch.Tensor = getattr(self, param_name)
        i = self.intermediate_size
        if shard is None:
            dst = param.data
        elif shard in ("gate", "up"):  # a stacked half of w13: every expert at once
            dst = param.data[:, :i] if shard == "gate" else param.data[:, i:]
        else:
            kind, _, expert = shard.partition(":")
            e = int(expert)
            if not 0 <= e < self.num_experts:
                raise ModelFormatError(f"expert {e} out of range ({self.num_experts} experts)")
            dst = {"gate": param.data[e, :i], "up": param.data[e, i:], "down": param.data[e]}[kind]
        copy_checked(dst, tensor, f"{param_name}[{shard}]")

    def _finish_quantized(self) -> None:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        gate, up, down = (self._pending[k] for k in ("gate", "up", "down"))
        for name, q, want in (
            ("gate", gate, (e, i, h)),
            ("up", up, (e, i, h)),
            ("down", down, (e, h, i)),
        ):
            if tuple(q.shape) != want:
                raise ModelFormatError(
                    f"experts' {name} weights have shape {q.shape}, expected {want}"
                )
        if not quantized_experts_supported(self.act, h, i, self._device):
            logger.info("experts of %s (%d x %d) run dequantised here", self.act, h, i)
            self._flush_pending()
            return
        self._pending = {}
        self._keep_blocks(gate, up, down)  # the float weights were never allocated (meta)

    def quantize(self, kind: str) -> bool:
        """`--quantize`: hold the experts as blocks of `kind` (q8_0 | q4_0 | q4_k; rows that are
        not whole blocks of it take ggml_quants.quantize_kind_for's fallback) for the grouped
        CPU kernel. Called before the weights load, each expert's float checkpoint tensor is
        quantised as it comes (an HF folder's per-expert tensors; w13 / w2 are never
        allocated); called on loaded float experts (stacked tensors, random weights), they are
        converted expert by expert and freed. False, changing nothing, where that kernel does
        not run these experts here (they stay float) or they already are blocks.
        NOTE: the peak while loading is the blocks + one expert's tensor and its float32
        temporaries; converting loaded experts, the float experts + the blocks (+27 % of
        float32 experts for q8_0, +14 % for q4_0 / q4_k) + one expert's temporaries."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        if self.quantized is not None:
            return False
        if not quantized_experts_supported(self.act, h, i, self._device):
            logger.info("experts of %s (%d x %d) stay float here", self.act, h, i)
            return False
        kind_h, kind_i = quantize_kind_for(kind, h), quantize_kind_for(kind, i)
        assert kind_h and kind_i  # the kernel runs only rows of whole 32-weight blocks
        self._quantize_kinds = (kind_h, kind_i)
        if self.w13.is_meta:
            return True  # quantised as they load
        w13, w2 = self.w13.data, self.w2.data  # [E, 2I, H], [E, H, I]
        for x in range(e):
            self._quantize_shard(f"gate:{x}", w13[x, :i])
            self._quantize_shard(f"up:{x}", w13[x, i:])
            self._quantize_shard(f"down:{x}", w2[x])  # the last drops w13 / w2 (freed on return)
        return True

    def _quantize_shard(self, shard: str, rows: torch.Tensor) -> None:
        """Quantise one expert's projection ("gate:e" [I, H], "up:e" [I, H], "down:e" [H, I])
        into the blocks; with the last of the 3E, the blocks replace the float weights."""
        assert self._quantize_kinds is not None
        h, i = self.hidden_size, self.intermediate_size
        proj, _, expert = shard.partition(":")
        e = int(expert)
        if not 0 <= e < self.num_experts:
            raise ModelFormatError(f"expert {e} out of range ({self.num_experts} experts)")
        want = (h, i) if proj == "down" else (i, h)
        if tuple(rows.shape) != want:
            raise ModelFormatError(
                f"checkpoint tensor for experts[{shard}] has shape {tuple(rows.shape)}, "
                f"expected {want}"
            )
        q = quantize(rows, self._quantize_kinds[proj == "down"])
        if proj not in self._blocks:
            shape = (self.num_experts, *q.data.shape)  # [E, N, row_bytes]
            self._blocks[proj] = torch.empty(shape, dtype=torch.uint8, device=self._device)
        self._blocks[proj][e] = q.data
        self._blocks_filled.add(shard)
        if len(self._blocks_filled) < 3 * self.num_experts:
            return
        blocks = [self._blocks_of(proj) for proj in ("gate", "up", "down")]
        self._blocks, self._blocks_filled = {}, set()
        self._keep_blocks(*blocks)

    def _blocks_of(self, proj: str) -> QuantizedTensor:
        """The blocks of one projection as a stacked QuantizedTensor."""
        assert self._quantize_kinds is not None
        h, i = self.hidden_size, self.intermediate_size
        qtype = QUANTIZE_TYPES[self._quantize_kinds[proj == "down"]]
        shape = (self.num_experts, h, i) if proj == "down" else (self.num_experts, i, h)
        return QuantizedTensor(self._blocks[proj], int(qtype), shape)

    def _flush_blocks(self) -> None:
        """Experts quantised on load beside a float tensor of another form: dequantised into
        the float weights (which `quantize` converts again once all are loaded)."""
        for shard in sorted(self._blocks_filled):
            proj, _, expert = shard.partition(":")
            q = self._blocks_of(proj)
            rows = q.data[int(expert)]  # [N, row_bytes]
            one = QuantizedTensor(rows, q.qtype, q.shape[1:]).dequantize(self._dtype)
            self._copy("w2" if proj == "down" else "w13", one, shard)
        self._blocks, self._blocks_filled = {}, set()

    def _keep_blocks(
        self, gate: QuantizedTensor, up: QuantizedTensor, down: QuantizedTensor
    ) -> None:
        """Hold the experts as blocks (Q4_K repacked where the kernel runs that layout faster:
        repacked_for_cpu): `quantized` for the kernel, and parameters gate_proj / up_proj /
        down_proj (with their logical shapes) in place of the float w13 / w2."""
        gate, up, down = (
            QuantizedTensor(*repacked_for_cpu(q.data, q.qtype), q.shape) for q in (gate, up, down)
        )
        self.quantized = QuantizedExperts(
            gate.data, up.data, down.data, gate.qtype, up.qtype, down.qtype
        )
        del self.w13, self.w2
        for name, q in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            param = nn.Parameter(q.data, requires_grad=False)
            param.logical_shape = tuple(q.shape)  # type: ignore[attr-defined]  # parameter counts
            self.register_parameter(name, param)


def materialize_experts(model: nn.Module) -> None:
    """Allocate every FusedExperts' float weights (uninitialised): for models filled other
    than by the loader (random weights)."""
    for module in model.modules():
        if isinstance(module, FusedExperts):
            module.materialize()
