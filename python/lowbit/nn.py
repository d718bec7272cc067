"""Drop-in layers: the QuantLinear base, one subclass per format family, LoRALinear, replace_linear.

Every layer takes the same leading arguments as nn.Linear,
    Layer(in_features, out_features, bias=True, *, device=None, dtype=None, <format options>)
and is built from a dense layer with `Layer.from_linear(linear, <format options>)`.

QuantLinear owns what all families share:
- validation of the common arguments;
- construction that only allocates final-shape buffers (never quantizes: it works under
  `torch.device("meta")`, then `to_empty()` + `load_state_dict()`); a constructed layer holds
  a zero weight until it is loaded or built with from_linear;
- the dtype policy: storage buffers (codes, scales, tables, SZ streams) and the parameters named
  in `KEEP_DTYPE` never change dtype under `.to(dtype)` / `.half()` / `.float()`; the compute
  dtype follows the module both ways (`.half()` computes in fp16, `.float()` back in fp32) and
  the bias converts like nn.Linear's;
- format metadata (family, format version and the family's fields) in the state dict, as a
  uint8 JSON tensor under `<prefix>_extra_state` (torch's extra-state key, so it travels
  through safetensors, DCP and FSDP state dicts). Loading compares it with the layer: a field
  the layer was built with (quant_type, blocksize, bits, group size, error bound, ...) that
  differs raises ValueError naming the key and both values; a field that only describes the
  stored data (double quantization, the original dtype, SZ stream sizes) is adopted from the
  checkpoint. Checkpoints written before format version 2 carry no metadata: they load as
  before (the layer's own format is trusted) and their shapes are still checked.

A new family subclasses QuantLinear, sets FAMILY / QUANT_TYPES / OPTIONS and implements
_allocate, _quantize_from, format_fields, forward and dequantized_weight; `__init_subclass__`
registers it for replace_linear.

This file is over 500 lines on purpose: the base class and its three subclasses are read
together (each subclass is the base's contract filled in for one family), and splitting the
subclasses into files of their own would hide the contract they implement.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import (
    FLOAT_DTYPES,
    check_choice,
    check_device,
    check_dtype,
    check_float_tensor,
    check_has_values,
    check_matmul_args,
    check_power_of_two,
)
from .autograd import matmul_4bit_unchecked, matmul_int_unchecked
from .formats import codebooks
from .formats import intq as intq_fmt
from .formats import nf4 as nf4_fmt
from .formats import nf4_aware
from .formats import sz as sz_fmt
from .functional import check_sz_dtype, dequantize_4bit, dequantize_int, quantize_4bit
from ._ops import sz_decode, sz_matmul

# 3 (2026-11-27): int codes are packed fields, not bit planes (lowbit.formats.intq); older int
# checkpoints are converted exactly when loaded (IntLinear._upgrade). 2: metadata in the state dict.
FORMAT_VERSION = 3
EXTRA_STATE = "_extra_state"
_REGISTRY: dict[str, type["QuantLinear"]] = {}
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

    in_features: int
    out_features: int
    compute_dtype: Optional[torch.dtype]

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        for qt in cls.QUANT_TYPES:
            _REGISTRY[qt] = cls

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


# ==============================================================================================
# 4-bit LUT family
# ==============================================================================================

_NF4_BUFFERS = ("weight", "weight_absmax", "weight_code", "weight_nested_absmax", "weight_nested_code",
                "weight_offset")


class Linear4bit(QuantLinear):
    """nn.Linear with a frozen 4-bit weight (NF4/FP4/optimal, bitsandbytes-compatible bytes).

    Buffers, laid out by output row so that a row-sharding (FSDP2-style) split needs no repack:
      weight               uint8 [out, in/2]        (flat [ceil(out*in/2)] when in % blocksize != 0)
      weight_absmax        fp32 or uint8 [out, in/blocksize]   (flat when in % blocksize != 0)
      weight_code          fp32 [16]
      weight_nested_absmax, weight_nested_code, weight_offset   (double quantization only)
    The bias is an ordinary trainable parameter. `compute_dtype` (bitsandbytes' name) is an alias
    of `dtype`: the dtype the matmul runs in (default: the input's).
    """

    FAMILY = "nf4"
    QUANT_TYPES = nf4_fmt.QUANT_TYPES
    OPTIONS = frozenset({"blocksize", "double_quant", "compute_dtype"})
    SHARDED_STORAGE = ("weight", "weight_absmax")
    MUST_MATCH = QuantLinear.MUST_MATCH + ("quant_type", "blocksize")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: Optional[torch.dtype] = None, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None) -> None:
        if compute_dtype is not None and dtype is not None and compute_dtype != dtype:
            raise ValueError(f"compute_dtype={compute_dtype} and dtype={dtype} disagree; give one of them")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype or compute_dtype)
        check_choice("quant_type", quant_type, nf4_fmt.QUANT_TYPES)
        check_power_of_two("blocksize", blocksize, 32, 4096)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self._allocate(check_device("device", device))

    def _row_layout(self) -> bool:
        return self.in_features % self.blocksize == 0

    def _allocate(self, device) -> None:
        out, inn, bs = self.out_features, self.in_features, self.blocksize
        numel = out * inn
        nblocks = -(-numel // bs)
        rows = self._row_layout()
        z = dict(device=device)
        self.register_buffer("weight", torch.zeros((out, inn // 2) if rows else ((numel + 1) // 2,),
                                                   dtype=torch.uint8, **z))
        scale_dtype = torch.uint8 if self.double_quant else torch.float32
        self.register_buffer("weight_absmax", torch.zeros((out, inn // bs) if rows else (nblocks,),
                                                          dtype=scale_dtype, **z))
        table = codebooks.code_table("nf4" if self.quant_type == "optimal" else self.quant_type)
        self.register_buffer("weight_code", table.to(device) if device is not None else table)
        self._allocate_nested(nblocks, device)

    def _allocate_nested(self, nblocks: int, device) -> None:
        for name in ("weight_nested_absmax", "weight_nested_code", "weight_offset"):
            self._buffers.pop(name, None)
        if self.double_quant:
            z = dict(device=device, dtype=torch.float32)
            self.register_buffer("weight_nested_absmax", torch.zeros(-(-nblocks // nf4_fmt.NESTED_BLOCKSIZE), **z))
            ncode = codebooks.dynamic_map()
            self.register_buffer("weight_nested_code", ncode.to(device) if device is not None else ncode)
            self.register_buffer("weight_offset", torch.zeros((), **z))

    # the quant_types whose fit uses calibration statistics (from_linear's input_moments): nf4 and fp4 are
    # bitsandbytes' fixed tables at absmax scales, byte for byte, and refuse them
    CALIBRATED_TYPES = ("optimal",)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None,
                    input_moments: Optional[Tensor] = None) -> "Linear4bit":
        """Quantize linear.weight. input_moments (quant_type "optimal" only): h [in_features], the second
        moment of each input channel on calibration text (lowbit.calibration.input_second_moments); the
        table and block scales are then fitted to the layer's output error sum h[k] * E[n, k]^2
        (formats.nf4_aware) instead of the weights' RMSE. Same bytes and kernels either way.
        ValueError for input_moments with nf4/fp4, or h that is not finite, negative or of the wrong length."""
        cls._check_linear(linear)
        w = linear.weight.detach()
        self = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                   quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                   compute_dtype=compute_dtype)
        if input_moments is None:
            q = quantize_4bit(w, blocksize, quant_type, double_quant)
        else:
            if quant_type not in cls.CALIBRATED_TYPES:
                raise ValueError(f"quant_type {quant_type!r} does not take calibration (input_moments): its table "
                                 f"and absmax scales are bitsandbytes' own; use quant_type='optimal'")
            q = nf4_aware.quantize_aware(w, input_moments, blocksize, double_quant)  # checks w and h
        self.load_quantized(q)
        self._copy_bias(linear)
        return self

    def load_quantized(self, q: nf4_fmt.Quant4bit) -> None:
        """Take the bytes of `q` (a Quant4bit of this layer's shape and format)."""
        if not isinstance(q, nf4_fmt.Quant4bit):
            raise TypeError(f"q must be a lowbit.Quant4bit, got {type(q).__name__}")
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"q has shape {tuple(q.shape)}, the layer is {(self.out_features, self.in_features)}")
        for field in ("quant_type", "blocksize"):
            if getattr(q, field) != getattr(self, field):
                raise ValueError(f"q has {field}={getattr(q, field)!r}, the layer {getattr(self, field)!r}")
        q.validate()
        out, inn = self.out_features, self.in_features
        rows = self._row_layout()
        self.double_quant = q.double_quant
        self.weight_dtype = q.dtype
        self.weight = q.codes.view(out, inn // 2) if rows else q.codes
        self.weight_absmax = q.absmax.view(out, inn // self.blocksize) if rows else q.absmax
        self.weight_code = q.code
        self._allocate_nested(q.nblocks, q.codes.device)
        if q.double_quant:
            self.weight_nested_absmax, self.weight_nested_code, self.weight_offset = (
                q.nested_absmax, q.nested_code, q.offset)

    @property
    def quantized_weight(self) -> nf4_fmt.Quant4bit:
        dq = self.double_quant
        return nf4_fmt.Quant4bit(
            codes=self.weight.reshape(-1),
            absmax=self.weight_absmax.reshape(-1),
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            code=self.weight_code,
            nested_absmax=self.weight_nested_absmax if dq else None,
            nested_code=self.weight_nested_code if dq else None,
            offset=self.weight_offset if dq else None,
        )

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return dequantize_4bit(self.quantized_weight, self._default_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        x, in_dtype = self._compute(x)
        codes = self.weight
        bias = self._decode_bias(x, codes)
        dq = self.double_quant
        buffers = self._buffers
        y = matmul_4bit_unchecked(
            x, codes.view(-1), self.weight_absmax.view(-1), buffers["weight_code"], self.blocksize, self.out_features,
            self.in_features, buffers["weight_nested_absmax"] if dq else None,
            buffers["weight_nested_code"] if dq else None, buffers["weight_offset"] if dq else None,
            nf4_fmt.NESTED_BLOCKSIZE, bias)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def _narrow(self, dim: int, start: int, stop: int) -> "Linear4bit":
        # Rows and columns are cut at whole blocks of the row layout. Double-quantized scales are decoded to
        # fp32 first (their second-level blocks of 256 span rows and the offset is per tensor): the slice then
        # holds exactly the scales the kernels would have decoded, at 32 bits each instead of ~8.
        bs = self.blocksize
        if not self._row_layout():
            raise ValueError(f"a {self.quant_type} layer whose in_features={self.in_features} is not a multiple of "
                             f"its blocksize={bs} has blocks that cross rows and cannot be split")
        if dim == 1 and (start % bs or stop % bs):
            raise ValueError(f"columns {start}:{stop} of a {self.quant_type} layer with blocksize={bs} would split a "
                             f"block; the cut must be at a multiple of {bs}")
        q = self.quantized_weight
        absmax = q.scales().view(self.out_features, self.in_features // bs)
        codes = self.weight
        if dim == 0:
            codes, absmax, out, inn = codes[start:stop], absmax[start:stop], stop - start, self.in_features
        else:
            codes, absmax = codes[:, start // 2:stop // 2], absmax[:, start // bs:stop // bs]
            out, inn = self.out_features, stop - start
        m = Linear4bit(inn, out, bias=False, device=codes.device, quant_type=self.quant_type, blocksize=bs,
                       double_quant=False)
        m.weight, m.weight_absmax = codes.contiguous().clone(), absmax.to(torch.float32).contiguous().clone()
        m.weight_code = self.weight_code.clone()
        return m

    @property
    def bits_per_param(self) -> float:
        return self.quantized_weight.bits_per_param

    def format_fields(self) -> dict:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant}

    def _adopt(self, meta: dict, sd: dict, prefix: str) -> None:
        super()._adopt(meta, sd, prefix)
        dq = bool(meta.get("double_quant", prefix + "weight_nested_absmax" in sd))
        if dq != self.double_quant:
            self._set_double_quant(dq, sd, prefix)

    def _set_double_quant(self, dq: bool, sd: dict, prefix: str) -> None:
        # The scales' dtype and the nested buffers follow the checkpoint's double-quant choice.
        self.double_quant = dq
        dev = self.weight.device
        self._allocate_nested(-(-self.out_features * self.in_features // self.blocksize), dev)
        self.weight_absmax = torch.zeros(self.weight_absmax.shape, dtype=torch.uint8 if dq else torch.float32,
                                         device=dev)

    def _convert_foreign(self, state_dict: dict, prefix: str) -> None:
        if prefix + "weight.absmax" not in state_dict:
            if prefix + EXTRA_STATE not in state_dict and prefix + "weight_absmax" in state_dict:
                # lowbit format 1 (no metadata): adopt double quantization from the buffers present
                dq = prefix + "weight_nested_absmax" in state_dict
                if dq != self.double_quant:
                    self._set_double_quant(dq, state_dict, prefix)
            return
        q = nf4_fmt.from_bnb_entries(state_dict, prefix)
        key = prefix + "weight.quant_state"
        if q.quant_type != self.quant_type and self.quant_type != "optimal":
            raise ValueError(f"{key}: the bitsandbytes checkpoint holds quant_type={q.quant_type!r} but this "
                             f"Linear4bit has quant_type={self.quant_type!r}")
        if q.blocksize != self.blocksize:
            raise ValueError(f"{key}: the bitsandbytes checkpoint holds blocksize={q.blocksize} but this Linear4bit "
                             f"has blocksize={self.blocksize}")
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{key}: the bitsandbytes checkpoint holds shape {tuple(q.shape)}, the layer is "
                             f"{(self.out_features, self.in_features)}")
        for k in [k for k in state_dict if k.startswith(prefix + "weight.")]:
            del state_dict[k]
        out, inn = self.out_features, self.in_features
        rows = self._row_layout()
        state_dict[prefix + "weight"] = q.codes.view(out, inn // 2) if rows else q.codes
        state_dict[prefix + "weight_absmax"] = q.absmax.view(out, inn // self.blocksize) if rows else q.absmax
        state_dict[prefix + "weight_code"] = q.code
        if q.double_quant:
            state_dict[prefix + "weight_nested_absmax"] = q.nested_absmax
            state_dict[prefix + "weight_nested_code"] = q.nested_code
            state_dict[prefix + "weight_offset"] = q.offset
        meta = {**self.format_metadata(), "quant_type": self.quant_type, "double_quant": q.double_quant,
                "dtype": _DTYPE_NAMES[q.dtype]}
        state_dict[prefix + EXTRA_STATE] = encode_meta(meta)


# ==============================================================================================
# Integer family
# ==============================================================================================


class IntLinear(QuantLinear):
    """nn.Linear whose weight is s * (Q - z) with frozen integer codes Q, zero points z (PEQA).

    State (see lowbit.formats.intq for the byte layout):
      codes  buffer    int32 [out, in/32, bits]   Q as packed fields (lowbit.formats.intq, format 3)
      zeros  buffer    uint8 [out] or [out, G]
      scale  Parameter fp32  [out] or [out, G]   the trainable tensor; stays fp32
                       under .half()/.to(dtype) (an fp16 copy would lose the small updates)
      G = ceil(in/group_size): when group_size does not divide in_features, a row's last group is
      ragged (shorter); group-dividing shapes are as they always were.
      bias   Parameter (requires_grad=False by default; set it True to train it too)
    """

    FAMILY = "intq"
    QUANT_TYPES = ("int2", "int3", "int4")
    OPTIONS = frozenset({"group_size", "method"})
    KEEP_DTYPE = ("scale",)
    SHARDED_STORAGE = ("codes", "zeros")
    MUST_MATCH = QuantLinear.MUST_MATCH + ("bits", "group_size")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: Optional[torch.dtype] = None, bits: int = 3, group_size: Optional[int] = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        intq_fmt.check_in_features(in_features)
        self.bits = intq_fmt.check_bits(bits)
        self.group_size = intq_fmt.check_group_size(group_size, in_features)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = check_device("device", device)
        n, k = out_features, in_features
        sshape = (n,) if group_size is None else (n, intq_fmt.n_groups(k, group_size))
        self.register_buffer("codes", torch.zeros((n, k // 32, bits), dtype=torch.int32, device=dev))
        self.register_buffer("zeros", torch.zeros(sshape, dtype=torch.uint8, device=dev))
        self.scale = nn.Parameter(torch.zeros(sshape, dtype=torch.float32, device=dev))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int = 3, group_size: Optional[int] = None,
                    method: str = "rtn") -> "IntLinear":
        cls._check_linear(linear)
        check_choice("method", method, intq_fmt.METHODS)
        w = linear.weight.detach()
        self = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                   bits=bits, group_size=group_size)
        q = intq_fmt.quantize_int(w, bits, group_size, method)
        self.codes, self.zeros = q.codes, q.zeros
        self.scale.data = q.scale.clone()
        self.weight_dtype = w.dtype
        self._copy_bias(linear)
        self.bias is not None and self.bias.requires_grad_(False)
        return self

    @property
    def quantized_weight(self) -> intq_fmt.QuantInt:
        """The layer's weight with its current (possibly fine-tuned) scales, detached."""
        return intq_fmt.QuantInt(self.codes, self.scale.detach(), self.zeros,
                                 torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.bits,
                                 self.group_size)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return dequantize_int(self.quantized_weight, self._default_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        x, in_dtype = self._compute(x)
        bias = self._decode_bias(x, self.codes)  # a QuantInt and its validation per call cost ~15 us
        y = matmul_int_unchecked(x, self.scale, bias, self.codes, self.zeros, self.bits,
                                 self.group_size or self.in_features, self.out_features, self.in_features)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def _narrow(self, dim: int, start: int, stop: int) -> "IntLinear":
        # codes are [N, K/32, bits]: one packed word group per 32 columns; scales and zero points are
        # [N, groups] (or [N] per row). Columns are cut at whole groups (whole rows' chunks of 32 without groups).
        # int3 packs 4 chunks (128 columns) into one quad of words (formats/intq.py), so its cuts are at 128s.
        g, k = self.group_size, self.in_features
        chunk = 128 if self.bits == 3 else 32
        unit = math.lcm(g or 1, chunk)
        if dim == 1 and (start % unit or (stop % unit and stop != k)):
            what = " and ".join(([f"a group of {g}"] if g else []) + [f"a {chunk}-column chunk of packed codes"])
            raise ValueError(f"columns {start}:{stop} of an int{self.bits} layer with group_size={g} would split "
                             f"{what}; the cut must be at a multiple of {unit} (or at in_features={k})")
        codes, zeros, scale = self.codes, self.zeros, self.scale.detach()
        if dim == 0:
            codes, zeros, scale, out, inn = codes[start:stop], zeros[start:stop], scale[start:stop], stop - start, k
        else:
            codes = codes[:, start // 32:-(-stop // 32)]
            if g is not None:
                zeros, scale = zeros[:, start // g:-(-stop // g)], scale[:, start // g:-(-stop // g)]
            out, inn = self.out_features, stop - start
        gs = None if g is None else min(g, -(-inn // 32) * 32)  # a lone last group keeps its (ragged) length
        if g is not None and -(-inn // gs) != zeros.shape[1]:
            raise ValueError(f"columns {start}:{stop}: the slice's groups do not line up with group_size={g}")
        m = IntLinear(inn, out, bias=False, device=codes.device, bits=self.bits, group_size=gs)
        m.codes, m.zeros = codes.contiguous().clone(), zeros.contiguous().clone()
        m.scale = nn.Parameter(scale.contiguous().clone(), requires_grad=self.scale.requires_grad)
        return m

    @property
    def bits_per_param(self) -> float:
        nbytes = sum(t.numel() * t.element_size() for t in (self.codes, self.zeros, self.scale))
        return 8.0 * nbytes / (self.out_features * self.in_features)

    def format_fields(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    def _load_without_metadata(self, state_dict: dict, prefix: str) -> None:
        # Format 1 (bit planes) and format 3 (packed fields) codes have the same shape and dtype: without
        # the metadata no check can tell them apart, and guessing either loads wrong weights silently.
        key = prefix + "codes"
        if key not in state_dict:
            return super()._load_without_metadata(state_dict, prefix)  # torch names the missing keys
        raise ValueError(
            f"{prefix + EXTRA_STATE}: missing; an int state dict without lowbit's metadata is ambiguous ({key} "
            "may hold format-3 packed fields or format-1/2 bit planes, of the same shape). If it came from this "
            f"lowbit (e.g. quantize_int), add state_dict[{prefix + EXTRA_STATE!r}] = layer.get_extra_state(); "
            "if it holds bit planes, add metadata with format_version 1 (lowbit.nn.encode_meta)")

    def _upgrade(self, version: int, state_dict: dict, prefix: str) -> None:
        key = prefix + "codes"
        if version >= 3 or key not in state_dict:
            return
        codes = state_dict[key]
        if type(codes) is not torch.Tensor or codes.device.type == "meta":
            raise ValueError(f"{key}: a format-{version} int checkpoint (bit-plane codes) must be loaded from plain "
                             f"tensors to be converted, got {type(codes).__name__} on {codes.device}; load it into an "
                             "unsharded model once and save it again")
        if codes.dtype != torch.int32 or codes.dim() != 3 or codes.shape[-1] != self.bits:
            return  # torch's own shape check names the mismatch
        state_dict[key] = intq_fmt.planes_to_packed(codes, self.bits)


# ==============================================================================================
# SZ family
# ==============================================================================================

_SZ_BUFFERS = ("payload", "lane_index", "lengths", "outlier_idx", "outlier_val", "step", "meta", "bounds")


class SZLinear(QuantLinear):
    """nn.Linear whose weight is stored SZ-compressed (plain tensor buffers) and decompressed into
    the compute dtype on every forward. The weight is frozen; gradients flow to the input (and the
    bias when it requires grad). Every element of the decoded weight is within the error bound of
    the original, in every compute dtype that can hold it (`SZTensor.bound_holds`); a compute
    dtype that cannot raises at forward rather than break the bound.

    error_bound / mode: the bound the layer was built for (checked against a checkpoint); None
    (the default) takes whatever the loaded checkpoint holds. chunk_size: the most symbols per
    lane (sz_compress).

    Buffers (the stream, version 2): payload (int32 words), lane_index (uint8), lengths (uint8 code
    lengths), outlier_idx, outlier_val, step, meta (int64: stream version, chunk_size, lanes,
    max_len, radius, dtype code, mode code, dtype mask, payload bits, index rate, index width),
    bounds (f64: error_bound, bound); rebuilt on load, not saved: the decode table and lane_start
    (every lane's bit offset). Checkpoints of stream version 1 (buffer `offsets`) are re-packed
    as version 2 when they load.

    Importance-scaled columns (from_linear's input_moments, docs/sz.md): buffer col_exp (int8 [in_features],
    e[k]) when the stream holds W * 2**e; the layer then decodes W^ = decode * 2**-e, computes
    y = (x * 2**-e) @ decode^T, and every element keeps |W^[n, k] - W[n, k]| <= bound * 2**-e[k]
    (`column_bounds()`), checked element by element when the layer is built. Without scaling col_exp is None
    and the state dict is exactly what it was before (a checkpoint without col_exp loads unscaled).
    """

    FAMILY = "sz"
    QUANT_TYPES = ("sz",)
    OPTIONS = frozenset({"error_bound", "mode", "chunk_size", "importance_alpha", "importance_ref"})
    MUST_MATCH = QuantLinear.MUST_MATCH + ("error_bound", "mode")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: Optional[torch.dtype] = None, error_bound: Optional[float] = None, mode: str = "abs",
                 chunk_size: int = 4096, importance_alpha: float = sz_fmt.DEFAULT_ALPHA,
                 importance_ref: str = "layer") -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        # importance_alpha / importance_ref only steer from_linear (checked here so that empty_layer and
        # load_quantized take replace_linear's options); whether a layer is scaled is in its buffers (col_exp)
        sz_fmt.check_alpha(importance_alpha)
        check_choice("importance_ref", importance_ref, sz_fmt.IMPORTANCE_REFS)
        self.error_bound = None if error_bound is None else sz_fmt.check_error_bound(error_bound, mode)
        check_choice("mode", mode, sz_fmt.MODES)
        self.mode = mode
        self.chunk_size = sz_fmt.check_chunk_size(chunk_size)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        z = dict(device=check_device("device", device))
        self.register_buffer("payload", torch.zeros(0, dtype=torch.int32, **z))
        self.register_buffer("lane_index", torch.zeros(0, dtype=torch.uint8, **z))
        self.register_buffer("lengths", torch.ones(1, dtype=torch.uint8, **z))
        self.register_buffer("outlier_idx", torch.zeros(0, dtype=torch.int64, **z))
        self.register_buffer("outlier_val", torch.zeros(0, dtype=torch.float32, **z))
        self.register_buffer("step", torch.ones(1, dtype=torch.float32, **z))
        self.register_buffer("meta", torch.tensor([sz_fmt.VERSION, 1, 1, sz_fmt.MAX_LEN, 0, 0, sz_fmt.MODES.index(mode),
                                                   0, 0, 0, 0], dtype=torch.int64, **z))
        self.register_buffer("bounds", torch.tensor([error_bound or 0.0, 0.0], dtype=torch.float64, **z))
        self.register_buffer("table", torch.zeros(1 << sz_fmt.MAX_LEN, dtype=torch.int16, **z), persistent=False)
        self.register_buffer("lane_start", torch.zeros(1, dtype=torch.int32, **z), persistent=False)
        # importance-scaled columns: e[k] (int8, saved) and 2**-e[k] (fp32, derived); None when unscaled
        self.register_buffer("col_exp", None)
        self.register_buffer("inv_scale", None, persistent=False)
        self._sync_meta()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, error_bound: float, mode: str = "abs", chunk_size: int = 4096,
                    input_moments: Optional[Tensor] = None, importance_alpha: float = sz_fmt.DEFAULT_ALPHA,
                    importance_ref: str = "layer") -> "SZLinear":
        """Compress linear.weight within `error_bound` (sz_compress). input_moments: h[k] = mean x_k^2 per input
        channel on calibration text (lowbit.calibration.input_second_moments); with it the columns are scaled
        by 2**e[k], e[k] = round(importance_alpha * log2(h[k] / ref)) clamped to +-12 (alpha 0.35 by
        default; ref: the layer's geometric mean, importance_ref="layer", or 1, "none"), and column k's
        elements keep the bound bound * 2**-e[k] (column_bounds()), verified element by element here in
        every dtype the layer claims. ValueError for h that is not finite, negative, all zero or of the
        wrong length."""
        cls._check_linear(linear)
        w = linear.weight.detach()
        e = None
        alpha = sz_fmt.check_alpha(importance_alpha)
        check_choice("importance_ref", importance_ref, sz_fmt.IMPORTANCE_REFS)
        if input_moments is not None:
            h = sz_fmt.check_input_moments(input_moments, linear.in_features)
            e = sz_fmt.column_exponents(h, alpha, importance_ref)
        c = sz_fmt.sz_compress(w if e is None else sz_fmt.scale_columns(w, e), error_bound, mode, chunk_size)
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, error_bound=error_bound, mode=mode, chunk_size=chunk_size)
        m.load_sz(c, verify=False, col_exp=e)  # just encoded
        if e is not None:
            m.weight_dtype = w.dtype
            m._check_columns(w)
        m._copy_bias(linear)
        m.bias is not None and m.bias.requires_grad_(False)
        return m

    def _check_columns(self, w: Tensor) -> None:
        """The per-element bound of a scaled layer, element by element in float64, on the layer's own decode of
        every dtype: where the stream claims |out - W'| <= bound but the scaled weight misses
        bound * 2**-e (fp16/bf16 subnormals or overflow of W^, not of W'), the dtype's claim is withdrawn (the
        mask bit in meta is cleared: that dtype then refuses, as for any unscaled stream it does not hold in).
        Beyond that, the relaxed bound max(bound * 2**-e, |d(W) - W|) must hold (else RuntimeError: a bug)."""
        bounds = self.column_bounds()
        mask = self._mask
        w32 = self.dequantized_weight(torch.float32, allow_unbounded=True)  # decode * 2**-e, exact
        for d in (torch.float32, torch.float16, torch.bfloat16):
            out = w32.to(d)  # what dequantized_weight(d) returns: the same decode, rounded once to d
            strict, relaxed = sz_fmt.check_columns(w.to(out.device), out, bounds)
            if not relaxed:
                raise RuntimeError(f"SZLinear: the decoded {d} weight misses its per-column bound (a lowbit bug)")
            if not strict:
                mask &= ~sz_fmt.DTYPE_BIT[d]
        if mask != self._mask:
            self.meta[7] = mask
            self._sync_meta()

    def column_bounds(self) -> Tensor:
        """float64 [in_features] (CPU): every element of column k of dequantized_weight() is within this of the
        original weight (in each dtype the layer holds the bound in; bounds[1] everywhere when unscaled)."""
        return sz_fmt.column_bounds(float(self.bounds[1]), self.col_exp, self.in_features)

    def _set_col_exp(self, e: Optional[Tensor]) -> None:
        dev = self.step.device
        if e is None:
            self.col_exp, self.inv_scale = None, None
            return
        e = sz_fmt.check_exponents(e, self.in_features).to(dev)
        self.col_exp = e
        self.inv_scale = None if dev.type == "meta" else sz_fmt.pow2(-e.to(torch.int32), torch.float32)

    def load_sz(self, c: sz_fmt.SZTensor, *, verify: bool = True, col_exp: Optional[Tensor] = None) -> None:
        """Take the stream `c` (an SZTensor of this layer's shape). verify: decode it once, checking
        every lane's length (ValueError for a tampered stream), so that forward need not. col_exp: int8
        [in_features], when `c` holds W * 2**col_exp (importance-scaled columns); None: c holds W."""
        if not isinstance(c, sz_fmt.SZTensor):
            raise TypeError(f"c must be a lowbit.SZTensor, got {type(c).__name__}")
        if c.shape != (self.out_features, self.in_features):
            raise ValueError(f"compressed weight shape {c.shape} != ({self.out_features}, {self.in_features})")
        if col_exp is not None:
            sz_fmt.check_exponents(col_exp, self.in_features)
        self._set_col_exp(col_exp)
        dev = self.step.device
        self.payload, self.lane_start, self.table, self.step, self.outlier_idx, self.outlier_val = c.decoder_args(dev)
        rate, width, index = sz_fmt.lane_index(c)
        self.lane_index = torch.from_numpy(index).to(dev)
        self.lengths = torch.from_numpy(c.lengths.copy()).to(dev)
        self.meta = torch.tensor([sz_fmt.VERSION, c.chunk_size, c.lanes, c.max_len, c.radius, sz_fmt.DTYPE_CODES[c.dtype],
                                  sz_fmt.MODES.index(c.mode), c.dtype_mask, c.payload_bits, rate, width],
                                 dtype=torch.int64, device=dev)
        self.bounds = torch.tensor([c.error_bound, c.bound], dtype=torch.float64, device=dev)
        self.error_bound, self.mode, self.weight_dtype = c.error_bound, c.mode, c.dtype
        self._sync_meta()
        if verify:
            self._verify()

    def _verify(self) -> None:
        sz_decode(self.payload, self.lane_start, self.table, self.step, self.outlier_idx, self.outlier_val,
                  self.out_features * self.in_features, self._chunk, self._max_len, self._radius, torch.float32, True)

    def to_sz(self) -> sz_fmt.SZTensor:
        return sz_fmt.from_buffers((self.out_features, self.in_features), *(getattr(self, n) for n in _SZ_BUFFERS),
                                   self.lane_start)

    def format_fields(self) -> dict:
        f = {"error_bound": self.error_bound, "mode": self.mode, "chunk_size": self.chunk_size}
        if self.col_exp is not None:  # only then: an unscaled layer's metadata is what it always was
            f["column_scaled"] = True
        return f

    def _adopt(self, meta: dict, sd: dict, prefix: str) -> None:
        super()._adopt(meta, sd, prefix)
        self._take_col_exp(sd, prefix)

    def _take_col_exp(self, sd: dict, prefix: str) -> None:
        """Scaled or not as the checkpoint is: allocate col_exp for one that holds it, drop it for one that does
        not (every checkpoint written before importance scaling), before torch copies the buffers."""
        t = sd.get(prefix + "col_exp", False)
        if t is False:
            self.col_exp, self.inv_scale = None, None
        elif self.col_exp is None or (isinstance(t, Tensor) and t.shape != self.col_exp.shape):
            shape = t.shape if isinstance(t, Tensor) else (self.in_features,)
            self._buffers["col_exp"] = torch.zeros(shape, dtype=torch.int8, device=self.step.device)

    def _check_meta(self, meta: dict, key: str) -> None:
        if self.error_bound is None:  # built without a bound: take the checkpoint's
            self.error_bound, self.mode = meta.get("error_bound"), meta.get("mode", self.mode)
        super()._check_meta(meta, key)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The stream buffers are re-sized before the metadata check runs: a refused or damaged
        # checkpoint must leave the layer exactly as it was, not holding uninitialised memory.
        saved = (dict(self._buffers), self.error_bound, self.mode, self.chunk_size, self.weight_dtype)
        try:
            self._load_sz_state(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        except BaseException:
            self._buffers.clear()
            self._buffers.update(saved[0])
            self.error_bound, self.mode, self.chunk_size, self.weight_dtype = saved[1:]
            self._sync_meta()
            raise

    def _load_sz_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + "offsets" in state_dict and prefix + "lane_index" not in state_dict:
            # A stream-version-1 checkpoint: re-pack its buffers as version 2 (the same codes).
            names = ("payload", "offsets") + _SZ_BUFFERS[2:]
            v1 = [state_dict.pop(prefix + n) for n in names if prefix + n in state_dict]
            if len(v1) != len(names):
                raise ValueError(f"{prefix}: an SZ stream-version-1 checkpoint without all of {names}; re-encode it")
            c = sz_fmt.from_v1_buffers((self.out_features, self.in_features), *v1)
            tmp = SZLinear(self.in_features, self.out_features, bias=False)
            tmp.load_sz(c, verify=False)  # verified in _rebuild below
            state_dict.update({prefix + n: getattr(tmp, n) for n in _SZ_BUFFERS})
        self._take_col_exp(state_dict, prefix)
        # The compressed sizes depend on the data: take the incoming buffers' shapes and dtypes.
        for name in _SZ_BUFFERS:
            t = state_dict.get(prefix + name)
            if isinstance(t, Tensor) and (t.shape != self._buffers[name].shape or t.dtype != self._buffers[name].dtype):
                self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if all(prefix + n in state_dict for n in _SZ_BUFFERS) and self.meta.device.type != "meta":
            self._rebuild()

    def _rebuild(self) -> None:
        """The decode table and lane offsets from the loaded buffers (then validate the stream)."""
        dev = self.step.device
        start, table = sz_fmt.lane_start_and_table(self.out_features * self.in_features, self.lane_index, self.lengths,
                                                   self.meta)
        self.lane_start, self.table = start.to(dev), table.to(dev)
        self._set_col_exp(self.col_exp)
        c = self.to_sz()
        self.error_bound, self.mode, self.weight_dtype = c.error_bound, c.mode, c.dtype
        self._sync_meta()
        self._verify()

    def _sync_meta(self) -> None:
        # Python copies of the ints the decoder needs, so forward never reads a device tensor.
        if self.meta.device.type == "meta":
            self._chunk, self._max_len, self._radius, self._mask, self._loaded = 1, sz_fmt.MAX_LEN, 0, 0, False
            return
        _, self._chunk, _, self._max_len, self._radius, _, _, self._mask, nbits, _, _ = (int(v) for v in self.meta.cpu())
        self._loaded = nbits > 0

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.meta.device.type != "meta":
            self._sync_meta()
        return self

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None, *, allow_unbounded: bool = False) -> Tensor:
        """The decompressed weight [out_features, in_features] in `dtype` (default: the compute dtype,
        else the compressed one). A dtype that cannot hold the weight within the bound raises
        ValueError unless allow_unbounded=True. A layer not loaded yet holds zeros."""
        dtype = self._default_dtype(dtype)
        if not self._loaded:
            return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.step.device)
        if not allow_unbounded and not self._mask & sz_fmt.DTYPE_BIT[dtype]:
            check_sz_dtype(self.to_sz(), dtype, allow_unbounded)
        scaled = self.inv_scale is not None
        flat = sz_decode(self.payload, self.lane_start, self.table, self.step, self.outlier_idx, self.outlier_val,
                         self.out_features * self.in_features, self._chunk, self._max_len, self._radius,
                         torch.float32 if scaled else dtype)
        w = flat.view(self.out_features, self.in_features)
        return (w * self.inv_scale).to(dtype) if scaled else w  # 2**-e: exact in fp32, then one rounding

    def forward(self, x: Tensor) -> Tensor:
        """y = x W^T + b: on CUDA a fused decode-GEMV for up to 16 rows of x, else W decoded in the
        compute dtype, then F.linear (lowbit._ops.sz_matmul). When a gradient is wanted (x, or an
        unfrozen bias) W is decoded and F.linear carries the autograd graph."""
        x, in_dtype = self._compute(x)
        # the checks every layer makes (x floating, its last dimension, the device); they used to be
        # missing here: int64 x gave a truncated int64 output, float64 ran in fp32, complex lost its
        # imaginary part, and a wrong width or a layer left on the meta device raised torch's errors
        b = self._decode_bias(x, self.payload)
        dtype = x.dtype
        grad = torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if not self._loaded or grad:
            y = F.linear(x.to(dtype), self.dequantized_weight(dtype), b)
        else:
            if not self._mask & sz_fmt.DTYPE_BIT[dtype]:
                check_sz_dtype(self.to_sz(), dtype, False)
            x2 = x.to(dtype).reshape(-1, self.in_features)
            if self.inv_scale is not None:  # (x * 2**-e) @ decode^T = x @ W^^T: M*K multiplies, not N*K
                x2 = x2 * self.inv_scale.to(dtype)
            y = sz_matmul(x2, self.payload, self.lane_start, self.table, self.step, self.outlier_idx,
                          self.outlier_val, self.out_features, self._chunk, self._max_len, self._radius, b)
            y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    @property
    def bits_per_param(self) -> float:
        """The stream's bits per weight, plus the column exponents' 8 bits per input column when scaled."""
        extra = 0.0 if self.col_exp is None else 8.0 / self.out_features
        return self.to_sz().bits_per_param + extra


# ==============================================================================================
# LoRA and whole-model replacement
# ==============================================================================================


class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r, with only A and B trainable (QLoRA).

    B starts at zero, so wrapping does not change the model's output.
    """

    def __init__(self, base: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0) -> None:
        super().__init__()
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise TypeError(f"base must be a linear layer with in_features/out_features, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.in_features, self.out_features = base.in_features, base.out_features
        dev = next((t.device for t in (*base.buffers(), *base.parameters())), torch.device("cpu"))
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ a.t() @ b.t()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def quant_types() -> tuple[str, ...]:
    """Every quant_type replace_linear accepts (one per registered QuantLinear format)."""
    return tuple(_REGISTRY)


def _registered(quant_type: str, opts) -> type:
    """The layer class of quant_type, after checking that every option is one it takes (ValueError)."""
    if quant_type not in _REGISTRY:
        raise ValueError(f"quant_type must be one of {quant_types()}, got {quant_type!r}")
    cls = _REGISTRY[quant_type]
    bad = set(opts) - cls.OPTIONS
    if bad:
        raise ValueError(f"unknown options {sorted(bad)} for quant_type={quant_type!r}; allowed: {sorted(cls.OPTIONS)}")
    return cls


def layer_factory(quant_type: str, opts: dict):
    """quant_type -> a function (nn.Linear, **extra) -> lowbit layer, from the registry (extra: from_linear
    arguments that differ per layer, i.e. input_moments)."""
    cls = _registered(quant_type, opts)
    if cls is Linear4bit:
        return lambda lin, **kw: Linear4bit.from_linear(lin, quant_type=quant_type, **opts, **kw)
    if cls is IntLinear:
        return lambda lin, **kw: IntLinear.from_linear(lin, bits=int(quant_type[3:]), **opts, **kw)
    if cls is SZLinear and "error_bound" not in opts:
        raise ValueError("quant_type='sz' needs error_bound=... (abs, or relative to the value range with mode='rel')")
    return lambda lin, **kw: cls.from_linear(lin, **opts, **kw)


def takes_calibration(quant_type: str) -> bool:
    """Whether replace_linear(..., calibration=...) applies to quant_type: its layer class's from_linear takes
    `input_moments` (inspected), and, for a class that lists CALIBRATED_TYPES, quant_type is one of them
    (Linear4bit: "optimal" only). ValueError for an unknown quant_type."""
    cls = _registered(quant_type, {})
    if "input_moments" not in inspect.signature(cls.from_linear).parameters:
        return False
    return quant_type in getattr(cls, "CALIBRATED_TYPES", (quant_type,))


def empty_layer(quant_type: str, in_features: int, out_features: int, bias: bool = True, *, device=None,
                **opts) -> QuantLinear:
    """The layer `layer_factory(quant_type, opts)` would build for an nn.Linear of this shape, made by the
    family's constructor: it only allocates (a zero weight) and never quantizes, for a state dict to be
    loaded into (lowbit.io.load_quantized). Takes replace_linear's options; an option that only steers
    quantization (int `method`) is checked and otherwise unused, and sz may omit error_bound (the loaded
    checkpoint's is adopted). ValueError for an unknown quant_type or option."""
    cls = _registered(quant_type, opts)
    opts = dict(opts)
    if cls is Linear4bit:
        return Linear4bit(in_features, out_features, bias, device=device, quant_type=quant_type, **opts)
    if cls is IntLinear:
        check_choice("method", opts.pop("method", "rtn"), intq_fmt.METHODS)  # the same refusal as from_linear's
        return IntLinear(in_features, out_features, bias, device=device, bits=int(quant_type[3:]), **opts)
    return cls(in_features, out_features, bias, device=device, **opts)


_DEFAULT_SKIP = ("lm_head",)


def skip_matches(name: str, skip: Iterable[str]) -> bool:
    """The one `skip` rule of replace_linear, `lowbit quantize --skip` and the demo: a skip entry names a
    module by its full dotted name or by a dotted suffix of it ("lm_head", "pooler", "output.dense"), and a
    Linear stays dense when it or any module containing it is named ("pooler" keeps "bert.pooler.dense")."""
    parts = name.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # the module and its ancestors
    return any(p == s or p.endswith("." + s) for p in paths for s in skip)


def replace_linear(model: nn.Module, quant_type: str = "nf4", skip: Optional[Iterable[str]] = None,
                   progress: Optional[bool] = None, calibration: Optional[dict] = None, **opts) -> nn.Module:
    """Swap every nn.Linear in `model` for a lowbit layer; returns the model (or, for a bare
    nn.Linear, the new layer).

    skip: modules to leave dense, by full name or dotted suffix; a module named keeps every Linear inside
    it dense (`skip_matches`; the rule of `lowbit quantize --skip`); default ("lm_head",). A name given
    explicitly that matches no module warns. All layers are quantized before any is swapped
    in: if one fails, the model is left exactly as it was and the error names the layer's path
    and shape. progress: one line per layer on stderr (default: more than 50 Linear layers).
    calibration: {Linear name: h [in_features]} (lowbit.calibration.input_second_moments of this model),
    passed to each layer's from_linear as input_moments (an activation-aware fit). Only for a quant_type
    that takes it (`takes_calibration`: optimal, sz), else ValueError "... does not take calibration".
    Every Linear to be quantized must have an entry (ValueError naming the first that has none: a
    partial dict is a mistake, not a request to fit some layers plainly); entries for other modules
    (skipped ones, lm_head) are ignored. A bare nn.Linear looks up the name "".
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    explicit = skip is not None
    skip = _DEFAULT_SKIP if skip is None else ((skip,) if isinstance(skip, str) else tuple(skip))
    make = layer_factory(quant_type, opts)
    if calibration is not None:
        if not isinstance(calibration, dict):
            raise TypeError(f"calibration must be a dict {{Linear name: input second moments}}, got "
                            f"{type(calibration).__name__}")
        if not takes_calibration(quant_type):
            raise ValueError(f"quant_type {quant_type!r} does not take calibration; formats that do: "
                             f"{', '.join(q for q in quant_types() if takes_calibration(q))}")
    if type(model) is nn.Linear:
        _check_calibrated(calibration, [("", model)])
        return _make_one(make, "", model, quant_type, calibration)
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    if explicit:
        for s in skip:
            if not any(skip_matches(n, (s,)) for n in names):
                warnings.warn(f"replace_linear: skip name {s!r} matches no module of the model", stacklevel=2)
    # Every name of a shared nn.Linear gets the one quantized layer (named_modules would list it once).
    # A shared Linear stays dense when any of its names is skipped.
    linears = [(name, mod) for name, mod in model.named_modules(remove_duplicate=False) if type(mod) is nn.Linear]
    skipped = {id(mod) for name, mod in linears if skip_matches(name, skip)}
    targets = [(name, mod) for name, mod in linears if id(mod) not in skipped]
    if progress is None:
        progress = len(targets) > 50
    _check_calibrated(calibration, targets)
    built, made = [], {}
    for i, (name, lin) in enumerate(targets):
        if id(lin) not in made:
            made[id(lin)] = _make_one(make, name, lin, quant_type, calibration)
        built.append((name, made[id(lin)]))
        if progress:
            print(f"\rlowbit: quantized {i + 1}/{len(targets)} Linear layers ({quant_type})", end="", file=sys.stderr)
    if progress and targets:
        print(file=sys.stderr)
    for name, layer in built:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return model


def _check_calibrated(calibration: Optional[dict], targets) -> None:
    """ValueError naming the first Linear to be quantized that `calibration` has no statistics for."""
    if calibration is None:
        return
    missing = [name for name, _ in targets if name not in calibration]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"replace_linear: calibration has no statistics for layer {missing[0]!r}{more}; give "
                         "input_second_moments of this model for every Linear that is quantized")


def _make_one(make, name: str, lin: nn.Linear, quant_type: str, calibration: Optional[dict] = None) -> QuantLinear:
    try:
        return make(lin) if calibration is None else make(lin, input_moments=calibration[name])
    except (ValueError, TypeError) as e:
        where = repr(name) if name else "the model (a bare nn.Linear)"
        raise type(e)(f"replace_linear: layer {where} (nn.Linear in_features={lin.in_features}, "
                      f"out_features={lin.out_features}) cannot be quantized as {quant_type!r}: {e}") from e


__all__ = ["IntLinear", "Linear4bit", "LoRALinear", "QuantLinear", "SZLinear", "quant_types", "replace_linear",
           "takes_calibration"]
