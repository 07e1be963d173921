"""Linear layers whose parameters are filled from checkpoint tensors by name. A merged linear
holds several checkpoint projections side by side (q/k/v -> qkv_proj, gate/up -> gate_up_proj).

A weight can also be kept quantised (GGUF blocks, or quantised on load): `weight` is then uint8
[out_features, row_bytes] and `qtype` its ggml type, multiplied by kernels/quant_gemm.py.

Tensor parallelism (distributed/parallel_state.py): a column-parallel linear holds its rank's
slice of the output rows (a merged one: of each shard), a row-parallel one its slice of the
input columns and sums the ranks' partial outputs. Each narrows the checkpoint tensor it is
given to its slice (a view of the memory-mapped file: the other ranks' rows are not read). A
quantised tensor (GGUF blocks) is narrowed the same way on its bytes: by whole rows of blocks,
or by input columns on block boundaries (`narrow_quantized`). With one process they are the
plain layers."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.distributed.comm import all_reduce
from moeflow.distributed.parallel_state import tp_rank_size
from moeflow.errors import ModelFormatError
from moeflow.kernels.gemm import linear
from moeflow.kernels.quant_gemm import qlinear, row_bytes
from moeflow.weights.ggml_quants import GGML_QUANT_SIZES, GGMLType, QuantizedTensor


class QuantizableWeight(nn.Module):
    """A module whose `weight` [out_features, in_features] the loader may fill with quantised
    blocks to keep (`keep_quantized`; False where the module reads `weight` itself)."""

    keep_quantized = True
    in_features: int
    out_features: int
    weight: nn.Parameter
    qtype: int | None = None

    def load(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor, shard: str | None = None
    ) -> None:
        tensor = self.shard_tensor(param_name, tensor)
        if isinstance(tensor, QuantizedTensor):
            if param_name == "weight" and self.keep_quantized:
                self.set_quantized(tensor)
                return
            tensor = tensor.dequantize(getattr(self, param_name).dtype)
        copy_checked(getattr(self, param_name), tensor, param_name)

    def shard_tensor(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor
    ) -> torch.Tensor | QuantizedTensor:
        """This rank's part of a whole checkpoint tensor (all of it without parallelism)."""
        return tensor

    def set_quantized(self, q: QuantizedTensor) -> None:
        """Replace the float weight by quantised blocks of the same logical shape."""
        expected = (self.out_features, self.in_features)
        if tuple(q.shape) != expected:
            raise ModelFormatError(f"quantised weight has shape {q.shape}, expected {expected}")
        nbytes = row_bytes(q.qtype, self.in_features)
        if tuple(q.data.shape) != (self.out_features, nbytes):
            raise ModelFormatError(
                f"quantised weight holds {tuple(q.data.shape)} bytes, expected "
                f"{(self.out_features, nbytes)}"
            )
        device = self.weight.device
        self.weight = nn.Parameter(q.data.to(device).contiguous(), requires_grad=False)
        self.weight.logical_shape = expected  # type: ignore[attr-defined]  # parameter counts
        self.qtype = q.qtype


class Linear(QuantizableWeight):
    """y = x W^T (+ b). Parameters are allocated uninitialised: the loader fills them."""

    quantize_on_load = True  # `--quantize` converts this layer's float weight

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # Quantised shards of different ggml types (GGUF's Q4_K_M mixes Q4_K q/k with a Q6_K
        # v): one Linear per shard, in row order, run one after the other (MergedLinear sets it).
        self.parts: nn.ModuleList | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qtype is not None:
            return qlinear(x, self.weight, self.qtype, self.bias)
        if self.parts is not None:
            y = torch.cat([part(x) for part in self.parts], dim=-1)  # [..., out_features]
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        q = f", qtype={self.qtype}" if self.qtype is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{q}"


class MergedLinear(Linear):
    """Output rows are the concatenation of named shards, e.g. ("q", "k", "v")."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        # Quantised shards wait here until every shard has come: all of one type, their rows
        # are concatenated into one quantised weight; all quantised but of several types, each
        # stays in its blocks as one of `parts`; float shards beside them: all dequantised.
        self._pending: dict[str, QuantizedTensor] = {}
        self._seen: set[str] = set()

    def load(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor, shard: str | None = None
    ) -> None:
        if shard is None:
            super().load(param_name, tensor)
            return
        if param_name == "weight" and isinstance(tensor, QuantizedTensor) and self.keep_quantized:
            self._pending[shard] = tensor
        else:
            self._copy_shard(param_name, shard, tensor)  # dequantises a QuantizedTensor
        if param_name == "weight":
            self._seen.add(shard)
            if self._seen >= set(self.shard_offsets):
                self._finish_shards()

    def _copy_shard(
        self, param_name: str, shard: str, tensor: torch.Tensor | QuantizedTensor
    ) -> None:
        if isinstance(tensor, QuantizedTensor):
            tensor = tensor.dequantize(getattr(self, param_name).dtype)
        offset, size = self.shard_offsets[shard]
        param = getattr(self, param_name)
        copy_checked(param.data.narrow(0, offset, size), tensor, f"{param_name}[{shard}]")

    def _finish_shards(self) -> None:
        pending, self._pending, self._seen = self._pending, {}, set()
        qtypes = {q.qtype for q in pending.values()}
        if len(pending) == len(self.shard_offsets):
            for shard, q in pending.items():
                if q.shape != (self.shard_offsets[shard][1], self.in_features):
                    raise ModelFormatError(
                        f"checkpoint tensor for weight[{shard}] has shape {q.shape}, expected "
                        f"{(self.shard_offsets[shard][1], self.in_features)}"
                    )
            order = sorted(pending, key=lambda s: self.shard_offsets[s][0])
            if len(qtypes) == 1:
                data = torch.cat([pending[s].data for s in order])
                self.set_quantized(
                    QuantizedTensor(data, qtypes.pop(), (self.out_features, self.in_features))
                )
                return
            parts = nn.ModuleList()
            for s in order:
                part = Linear(self.in_features, self.shard_offsets[s][1])
                part.set_quantized(pending[s])
                parts.append(part)
            self.parts = parts
            self.weight = None  # type: ignore[assignment]  # the blocks live in `parts`
            return
        for shard, q in pending.items():  # mixed types or float shards beside them
            self._copy_shard("weight", shard, q)


class ColumnParallelLinear(Linear):
    """Output rows split over the tensor-parallel ranks: rank r holds rows
    [r * out / tp, (r + 1) * out / tp) and returns that slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.tp_rank, self.tp_size = tp_rank_size()
        super().__init__(in_features, split_size(out_features, self.tp_size, "outputs"), bias)

    def shard_tensor(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor
    ) -> torch.Tensor | QuantizedTensor:
        return narrow_shard(tensor, 0, self.tp_rank, self.tp_size)


class MergedColumnParallelLinear(MergedLinear):
    """A merged linear whose every shard (q / k / v, gate / up) is split over the ranks: rank r
    holds its slice of each shard, side by side. `shard_sizes` are the whole model's."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        self.tp_rank, self.tp_size = tp_rank_size()
        self.full_sizes = dict(shard_sizes)
        local = {k: split_size(n, self.tp_size, f"{k} outputs") for k, n in shard_sizes.items()}
        super().__init__(in_features, local, bias)

    def load(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor, shard: str | None = None
    ) -> None:
        if shard is not None:
            tensor = narrow_shard(tensor, 0, self.tp_rank, self.tp_size)
        super().load(param_name, tensor, shard)

    def shard_tensor(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor
    ) -> torch.Tensor | QuantizedTensor:
        """A whole merged tensor: each shard's slice, concatenated."""
        if self.tp_size == 1:
            return tensor
        r, n = self.tp_rank, self.tp_size
        if isinstance(tensor, QuantizedTensor):  # rows of blocks: each shard's slice of rows
            rows = tensor.data.split(list(self.full_sizes.values()), dim=0)
            data = torch.cat([p.narrow(0, r * p.shape[0] // n, p.shape[0] // n) for p in rows])
            return QuantizedTensor(data, tensor.qtype, (data.shape[0], *tensor.shape[1:]))
        parts = tensor.split(list(self.full_sizes.values()), dim=0)
        return torch.cat([p.narrow(0, r * p.shape[0] // n, p.shape[0] // n) for p in parts])


class RowParallelLinear(Linear):
    """Input columns split over the ranks: rank r multiplies its slice of x (the output of a
    column-parallel layer) by its columns of W; the partial outputs are summed by an all-reduce
    (or later, by the caller, when `reduce_results` is False). The bias is added once."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True
    ) -> None:
        self.tp_rank, self.tp_size = tp_rank_size()
        self.reduce_results = reduce_results
        super().__init__(split_size(in_features, self.tp_size, "inputs"), out_features, bias)

    def shard_tensor(
        self, param_name: str, tensor: torch.Tensor | QuantizedTensor
    ) -> torch.Tensor | QuantizedTensor:
        if param_name == "bias":
            return tensor
        return narrow_shard(tensor, 1, self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        if self.qtype is not None:
            y = qlinear(x, self.weight, self.qtype, None)  # [..., out_features], this rank's part
        else:
            y = linear(x, self.weight)  # [..., out_features], this rank's part of the sum
        if self.reduce_results:
            y = all_reduce(y)
        if self.bias is not None and (self.reduce_results or self.tp_rank == 0):
            y = y + self.bias
        return y


def split_size(n: int, parts: int, what: str) -> int:
    """n / parts, which must divide it."""
    if n % parts:
        raise ModelFormatError(
            f"{n} {what} cannot be split over {parts} tensor-parallel ranks; choose a "
            f"tensor_parallel_size that divides it"
        )
    return n // parts


def narrow_shard(
    tensor: torch.Tensor | QuantizedTensor, dim: int, rank: int, parts: int
) -> torch.Tensor | QuantizedTensor:
    """Rank `rank`'s equal slice of `tensor` along `dim` (a view: nothing else is read)."""
    if parts == 1:
        return tensor
    if isinstance(tensor, QuantizedTensor):
        return narrow_quantized(tensor, dim, rank, parts)
    n = split_size(tensor.shape[dim], parts, f"rows of dim {dim}")
    return tensor.narrow(dim, rank * n, n)


def narrow_quantized(q: QuantizedTensor, dim: int, rank: int, parts: int) -> QuantizedTensor:
    """Rank `rank`'s equal slice of a quantised tensor along logical `dim`, a view of its bytes
    (data [..., rows, row_bytes]): whole rows (or experts) for a leading dim; for the last (the
    input columns) whole blocks of each row, so the slice must hold whole blocks (32 weights,
    256 for the K-quants): a ModelFormatError names the split otherwise."""
    dim = dim % len(q.shape)
    shape = list(q.shape)
    n = split_size(shape[dim], parts, f"rows of dim {dim}")
    shape[dim] = n
    if dim < len(shape) - 1:
        return QuantizedTensor(q.data.narrow(dim, rank * n, n), q.qtype, tuple(shape))
    qtype = GGMLType(q.qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n % block:
        raise ModelFormatError(
            f"a {qtype.name} tensor of shape {tuple(q.shape)} cannot be split by input columns "
            f"over {parts} tensor-parallel ranks: {n} columns per rank are not whole "
            f"{block}-weight blocks; choose a tensor_parallel_size that leaves whole blocks, "
            "or a float checkpoint"
        )
    nbytes = n // block * type_size
    return QuantizedTensor(q.data.narrow(-1, rank * nbytes, nbytes), q.qtype, tuple(shape))


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ModelFormatError(
            f"checkpoint tensor for {what} has shape {tuple(src.shape)}, "
            f"expected {tuple(dst.shape)}"
        )
    with torch.no_grad():
        dst.copy_(src)
