"""IntLinear: the integer-rows family (int2 / int3 / int4, trainable scales: PEQA) as a layer."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .._validate import check_choice, check_device
from ..autograd import matmul_int_unchecked
from ..formats import intq as intq_fmt
from ..functional import dequantize_int
from ._base import EXTRA_STATE, QuantLinear
from .family import Family, Option, register_family

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
    FROZEN_BIAS = True
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

    @classmethod
    def cat_rows(cls, layers: list) -> Optional["IntLinear"]:
        # codes, zero points and scales are all per output row
        first = layers[0]
        if not all(type(m) is IntLinear and m.in_features == first.in_features
                   and (m.bits, m.group_size, m.weight_dtype) == (first.bits, first.group_size, first.weight_dtype)
                   for m in layers):
            return None
        out = sum(m.out_features for m in layers)
        m = IntLinear(first.in_features, out, bias=False, device="meta", bits=first.bits, group_size=first.group_size)
        m.codes = torch.cat([b.codes for b in layers])
        m.zeros = torch.cat([b.zeros for b in layers])
        m.scale = nn.Parameter(torch.cat([b.scale.detach() for b in layers]), requires_grad=False)
        m.weight_dtype = first.weight_dtype
        return m

    def requantize_(self, target: Tensor) -> str:
        q = intq_fmt.quantize_int(target, self.bits, self.group_size, "rtn")
        self.codes, self.zeros = q.codes, q.zeros
        self.scale.data = q.scale.to(self.scale.device, self.scale.dtype)
        return f"int{self.bits} (group_size {self.group_size})"

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


# ----------------------------------------------------------------------------------------------
# The family record (lowbit.nn.family)
# ----------------------------------------------------------------------------------------------


def _build(quant_type: str, linear: nn.Linear, *, group_size: Optional[int], method: str) -> IntLinear:
    return IntLinear.from_linear(linear, bits=int(quant_type[3:]), group_size=group_size, method=method)


def _empty(quant_type: str, in_features: int, out_features: int, bias: bool, device, *, group_size: Optional[int],
           method: str) -> IntLinear:
    check_choice("method", method, intq_fmt.METHODS)  # only steers quantization: checked like from_linear's
    return IntLinear(in_features, out_features, bias, device=device, bits=int(quant_type[3:]), group_size=group_size)


def _label(quant_type: str, o: dict) -> str:
    g = o.get("group_size")
    return f"{quant_type} {'rows' if g is None else f'g{g}'} {o.get('method', 'rtn')}"


INTQ_FAMILY = register_family(Family(
    name="intq", layer=IntLinear, quant_types=IntLinear.QUANT_TYPES,
    options=(Option("group_size", None, "weights per scale, a multiple of 32 (None: one scale per row)",
                    flag="--group-size", cli_type=int),
             Option("method", "rtn", f"how scales are fitted: {' | '.join(intq_fmt.METHODS)}")),
    build=_build, empty=_empty, label=_label, doc="docs/int.md"))
