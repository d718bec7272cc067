"""Linear4bit: the 4-bit LUT family (nf4 / fp4 / optimal; bitsandbytes-compatible bytes) as a layer."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._validate import check_choice, check_device, check_power_of_two
from ..autograd import matmul_4bit_unchecked
from ..formats import codebooks
from ..formats import nf4 as nf4_fmt
from ..formats import nf4_aware
from ..functional import dequantize_4bit, quantize_4bit
from ._base import EXTRA_STATE, QuantLinear, encode_meta, _DTYPE_NAMES
from .family import Family, Option, register_family

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
    STORES_WEIGHT = True
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

    @classmethod
    def cat_rows(cls, layers: list) -> Optional["Linear4bit"]:
        # Row-layout blocks without double quantization (its 256-scale blocks span rows and its offset is per
        # tensor) and one code table: rows and their scales concatenate.
        first = layers[0]
        if not all(type(m) is Linear4bit and not m.double_quant and m._row_layout()
                   and m.in_features == first.in_features
                   and (m.quant_type, m.blocksize, m.weight_dtype) == (first.quant_type, first.blocksize,
                                                                       first.weight_dtype)
                   and torch.equal(m.weight_code, first.weight_code) for m in layers):
            return None
        out = sum(m.out_features for m in layers)
        m = Linear4bit(first.in_features, out, bias=False, device="meta", quant_type=first.quant_type,
                       blocksize=first.blocksize, double_quant=False)
        m.weight = torch.cat([b.weight for b in layers])
        m.weight_absmax = torch.cat([b.weight_absmax for b in layers])
        m.weight_code = first.weight_code
        m.weight_dtype = first.weight_dtype
        return m

    def requantize_(self, target: Tensor) -> str:
        orig_dtype = self.weight_dtype
        self.load_quantized(quantize_4bit(target, self.blocksize, self.quant_type, self.double_quant))
        self.weight_dtype = orig_dtype
        return f"{self.quant_type} (blocksize {self.blocksize})"

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


# ----------------------------------------------------------------------------------------------
# The family record (lowbit.nn.family)
# ----------------------------------------------------------------------------------------------


def _build(quant_type: str, linear: nn.Linear, *, blocksize: int, double_quant: bool, compute_dtype,
           input_moments: Optional[Tensor] = None) -> Linear4bit:
    return Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                  compute_dtype=compute_dtype, input_moments=input_moments)


def _empty(quant_type: str, in_features: int, out_features: int, bias: bool, device, *, blocksize: int,
           double_quant: bool, compute_dtype) -> Linear4bit:
    return Linear4bit(in_features, out_features, bias, device=device, quant_type=quant_type, blocksize=blocksize,
                      double_quant=double_quant, compute_dtype=compute_dtype)


NF4_FAMILY = register_family(Family(
    name="nf4", layer=Linear4bit, quant_types=nf4_fmt.QUANT_TYPES,
    options=(Option("blocksize", 64, "weights per scale, a power of two in [32, 4096]", flag="--blocksize",
                    cli_type=int),
             Option("double_quant", True, "8-bit block scales (QLoRA's double quantization)",
                    flag="--no-double-quant", cli_action="store_false"),
             Option("compute_dtype", None, "the matmul's dtype (None: the input's)", dtype=True)),
    build=_build, empty=_empty, calibrated=Linear4bit.CALIBRATED_TYPES,
    label=lambda qt, o: f"{qt} b{o['blocksize']}{' dq' if o['double_quant'] else ''}", doc="docs/formats.md"))
