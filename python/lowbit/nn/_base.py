"""The QuantLinear base: what every lowbit layer shares (see lowbit.nn's docstring), the format
metadata codec, and the family registry (Family, register_family, family_of)."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from .._validate import (
    FLOAT_DTYPES,
    check_device,
    check_dtype,
    check_float_tensor,
    check_has_values,
    check_matmul_args,
)
from ..formats import nf4 as nf4_fmt


# 3 (2026-11-27): int codes are packed fields, not bit planes (lowbit.formats.intq); older int
# checkpoints are converted exactly when loaded (IntLinear._upgrade). 2: metadata in the state dict.
FORMAT_VERSION = 3
EXTRA_STATE = "_extra_state"
_DTYPE_NAMES = nf4_fmt.DTYPE_NAMES
_NAMED_DTYPES = nf4_fmt.NAMED_DTYPES


def _check_features(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _dtype_target(fn) -> Optional[torch.dtype]:
    """The float dtype that an nn.Module._apply function converts floating tensors to, or None
    when it leaves dtypes alone (.cuda(), .to(device), to_empty)."""
    a = fn(torch.zeros(1, dtype=torch.float32)).dtype
    if a != torch.float32:
        return a
    b = fn(torch.zeros(1, dtype=torch.float16)).dtype
    return b if b != torch.float16 else None


META_BYTES = 512  # fixed: DCP loads into existing tensors, so every layer's metadata has one size


def encode_meta(meta: dict) -> Tensor:
    raw = json.dumps(meta, sort_keys=True).encode("utf-8")
    if len(raw) > META_BYTES:
        raise ValueError(f"format metadata is {len(raw)} bytes, over the {META_BYTES} a layer stores")
    return torch.tensor(list(raw.ljust(META_BYTES, b" ")), dtype=torch.uint8)  # JSON ignores the padding


def decode_meta(t: Any, key: str) -> dict:
    """The metadata dict stored at state-dict key `key` (ValueError naming the key if unreadable)."""
    try:
        meta = json.loads(bytes(t.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, AttributeError, TypeError, RuntimeError) as e:
        raise ValueError(f"state dict entry {key!r} is not lowbit format metadata: {e}") from None
    if not isinstance(meta, dict) or "family" not in meta:
        raise ValueError(f"state dict entry {key!r} is not lowbit format metadata (no 'family')")
    return meta


class QuantLinear(nn.Module):
    """Base of lowbit's quantized linear layers (see the module docstring)."""

    FAMILY: ClassVar[str] = ""
    QUANT_TYPES: ClassVar[tuple[str, ...]] = ()
    OPTIONS: ClassVar[frozenset[str]] = frozenset()  # replace_linear options of from_linear
    KEEP_DTYPE: ClassVar[tuple[str, ...]] = ()  # parameters that keep their dtype (trainable scales)
    # storage laid out by output row, which lowbit.distributed shards across ranks (FSDP2)
    SHARDED_STORAGE: ClassVar[tuple[str, ...]] = ()
    # metadata fields the layer was built with: a checkpoint that differs is refused
    MUST_MATCH: ClassVar[tuple[str, ...]] = ("family", "in_features", "out_features")
    # what integrations ask of a layer beyond its Family record (lowbit.nn.family):
    STORES_WEIGHT: ClassVar[bool] = False  # a persistent tensor named "weight" (else save_pretrained's marker)
    DATA_DEPENDENT_SHAPES: ClassVar[bool] = False  # storage sizes depend on the data (SZ streams)
    FROZEN_BIAS: ClassVar[bool] = False  # from_linear leaves the bias requires_grad=False

    in_features: int
    out_features: int
    compute_dtype: Optional[torch.dtype]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__} ({bias!r}); format options are "
                            "keyword-only")
        device = check_device("device", device)
        self.compute_dtype = None if dtype is None else check_dtype("dtype", dtype)
        self.weight_dtype = torch.float32  # the dtype that was quantized (metadata)
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32))
                     if bias else None)

    # -- construction from a dense layer ---------------------------------------------------------
    @classmethod
    def _check_linear(cls, linear: Any) -> nn.Linear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        check_has_values("linear.weight", linear.weight)
        return linear

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias.data = linear.bias.detach().clone()

    # -- the dtype policy -------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        target = _dtype_target(fn)
        if target is not None and target not in FLOAT_DTYPES:
            raise ValueError(f"{type(self).__name__} computes in float32, float16 or bfloat16; converting it to "
                             f"{str(target).replace('torch.', '')} is not supported")
        buffers = {n: b for n, b in self._buffers.items() if b is not None}
        kept = {n: self._parameters[n] for n in self.KEEP_DTYPE if self._parameters.get(n) is not None}
        for n in buffers:
            del self._buffers[n]
        for n in kept:
            del self._parameters[n]
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in buffers.items():
                moved = fn(t)  # takes the device (and to_empty's allocation), never the dtype
                self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
            for n, p in kept.items():
                moved = fn(p.data)
                moved = moved if moved.dtype == p.dtype else p.data.to(moved.device)
                grad = p.grad
                if grad is not None:  # the gradient follows the parameter's device, as nn.Module does it
                    g = fn(grad)
                    grad = g if g.dtype == grad.dtype else grad.to(g.device)
                if torch._has_compatible_shallow_copy_type(p.data, moved):
                    p.data = moved
                    self._parameters[n] = p
                else:
                    self._parameters[n] = nn.Parameter(moved, requires_grad=p.requires_grad)
                self._parameters[n].grad = grad
        if target is not None and target in FLOAT_DTYPES:
            self.compute_dtype = target
        return self

    def _decode_bias(self, x: Tensor, storage: Tensor) -> Optional[Tensor]:
        """What a decode-time forward checks: x only (the layer's own buffers are consistent by
        construction, so no format object is built and nothing else is re-validated: Python overhead
        per call, docs/benchmarks.md). Returns the bias as the matmul takes it."""
        bias = check_matmul_args(x, self.out_features, self.in_features, self.bias)
        if x.device != storage.device:
            raise ValueError(f"x is on {x.device} but this {type(self).__name__} is on {storage.device}")
        return bias

    def _compute(self, x: Tensor) -> tuple[Tensor, torch.dtype]:
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            # refuse before converting: an int64 x cast to the compute dtype and back would be a
            # truncated, wrong output (the float check in _decode_bias sees only the converted x)
            check_float_tensor("x", x, allow_empty=True)
            x = x.to(self.compute_dtype)
        return x, in_dtype

    # -- format metadata --------------------------------------------------------------------------
    def format_fields(self) -> dict:
        """The family's metadata fields (subclasses extend)."""
        return {}

    def format_metadata(self) -> dict:
        return {"family": self.FAMILY, "format_version": FORMAT_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "dtype": _DTYPE_NAMES.get(self.weight_dtype, "float32"),
                **self.format_fields()}

    def get_extra_state(self) -> Tensor:
        return encode_meta(self.format_metadata())

    def set_extra_state(self, state: Any) -> None:
        # Checked and adopted in _load_from_state_dict, before the buffers are copied.
        pass

    def _adopt(self, meta: dict, sd: dict, prefix: str) -> None:
        """Take the checkpoint's data-describing fields (subclasses extend)."""
        self.weight_dtype = _NAMED_DTYPES.get(meta.get("dtype", "float32"), torch.float32)

    def _check_meta(self, meta: dict, key: str) -> None:
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{key}: the checkpoint has lowbit format version {meta['format_version']}; this "
                             f"lowbit reads versions <= {FORMAT_VERSION}: upgrade lowbit to load it")
        mine = self.format_metadata()
        for field in self.MUST_MATCH:
            if field in meta and meta[field] != mine.get(field):
                raise ValueError(
                    f"{key}: the checkpoint holds {field}={meta[field]!r} but this {type(self).__name__} has "
                    f"{field}={mine.get(field)!r}; build the layer with the checkpoint's format to load it"
                )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + EXTRA_STATE
        self._convert_foreign(state_dict, prefix)
        if key in state_dict:
            meta = decode_meta(state_dict[key], key)
            self._check_meta(meta, key)
            self._adopt(meta, state_dict, prefix)
            self._upgrade(int(meta.get("format_version", 1)), state_dict, prefix)
        elif any(k.startswith(prefix) for k in state_dict):
            self._load_without_metadata(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _load_without_metadata(self, state_dict: dict, prefix: str) -> None:
        """A checkpoint without `_extra_state` (written before format version 2, built by hand, or
        filtered): trust the layer's format, as those versions did; torch still checks every buffer's
        shape. A family whose bytes changed between versions of one shape refuses instead (IntLinear)."""
        state_dict[prefix + EXTRA_STATE] = self.get_extra_state()
        self._upgrade(1, state_dict, prefix)

    def _convert_foreign(self, state_dict: dict, prefix: str) -> None:
        """Rewrite another library's keys for this layer into lowbit's, in place (4-bit: bnb)."""

    def _upgrade(self, version: int, state_dict: dict, prefix: str) -> None:
        """Rewrite this layer's tensors of a checkpoint written in format `version` (< FORMAT_VERSION)
        into the current layout, in place, exactly (subclasses whose bytes changed)."""

    # -- shared API -------------------------------------------------------------------------------
    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        raise NotImplementedError

    def _default_dtype(self, dtype: Optional[torch.dtype]) -> torch.dtype:
        if dtype is not None:
            return check_dtype("dtype", dtype)
        return self.compute_dtype or self.weight_dtype

    @property
    def bits_per_param(self) -> float:
        raise NotImplementedError

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.format_fields().items())
        bpp = "" if self._is_meta() else f", bits_per_param={self.bits_per_param:.3f}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{fields}{bpp}")

    def _is_meta(self) -> bool:
        return any(b.device.type == "meta" for b in self.buffers(recurse=False))

    # -- merging (PEFT) -----------------------------------------------------------------------------
    def requantize_(self, target: Tensor) -> str:
        """Quantize the dense fp32 weight `target` [out, in] into this layer, in place, in its own format and
        options (merging a LoRA adapter: lowbit.integrations.peft); returns a short description of the format
        for the merge report. TypeError for a family that cannot (ValueError for one that refuses on purpose)."""
        raise TypeError(f"lowbit: cannot merge a LoRA adapter into a {type(self).__name__}")

    # -- serving (lowbit.integrations.vllm) ---------------------------------------------------------
    def check_compute_dtype(self, dtype: torch.dtype) -> None:
        """ValueError when this layer cannot compute in `dtype` within its format's promise (SZ: a bound finer
        than the dtype's precision); every dtype is fine by default."""

    @classmethod
    def cat_rows(cls, layers: list) -> Optional["QuantLinear"]:
        """One layer holding `layers`' output rows one after another (vLLM's fused qkv / gate_up shards), when
        the family's storage joins by row exactly; None when it does not (the shards are then run apart)."""
        return None

    # -- tensor parallelism ------------------------------------------------------------------------
    def narrow(self, dim: int, start: int, length: int) -> "QuantLinear":
        """A new layer of the same format holding weight[start:start + length] along `dim` (0: output rows,
        1: input columns), made by slicing the stored codes and scales: never re-quantized, so its output is
        the matching slice (dim 0) or partial sum (dim 1) of this layer's. The bias follows the rows (dim 0)
        and is dropped for dim 1 (a row-parallel shard's partial sums are added before the bias, once).
        This is how a tensor-parallel rank takes its part of a checkpoint layer (lowbit.integrations.vllm).
        ValueError naming the rule when the family's storage cannot be cut there (a group or block split)."""
        for name, v in (("dim", dim), ("start", start), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (output rows) or 1 (input columns), got {dim}")
        size = self.out_features if dim == 0 else self.in_features
        if start < 0 or length <= 0 or start + length > size:
            raise ValueError(f"narrow({dim}, start={start}, length={length}) is outside the layer's "
                             f"{'out' if dim == 0 else 'in'}_features={size}")
        if self._is_meta():
            raise ValueError("narrow: the layer's storage is on the meta device (nothing to slice)")
        if (start, length) == (0, size):
            return self
        m = self._narrow(dim, start, start + length)
        m.weight_dtype, m.compute_dtype = self.weight_dtype, self.compute_dtype
        if dim == 0 and self.bias is not None:
            m.bias = nn.Parameter(self.bias.detach()[start:start + length].clone(),
                                  requires_grad=self.bias.requires_grad)
        return m

    def _narrow(self, dim: int, start: int, stop: int) -> "QuantLinear":
        """The family's slice (see narrow; arguments checked, bias handled there), bias=False."""
        raise ValueError(f"{type(self).__name__} ({self.FAMILY}) storage cannot be split: serve it whole "
                         "(tensor_parallel_size=1)")
