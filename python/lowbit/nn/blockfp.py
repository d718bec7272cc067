"""BlockFPLinear: the block-floating-point FP4 family (MXFP4 / NVFP4; lowbit.formats.blockfp) as a layer.

The fourth family, added by its own files only (formats/blockfp.py, this module, its tests and doc page)
plus its name in lowbit.nn.FAMILY_MODULES. Its byte layout is the one checkpoints in the wild use, under
compressed-tensors' tensor names, so a compressed-tensors NVFP4 layer's tensors load as they are (the E4M3
scales as their raw bytes) and a gpt-oss MXFP4 tensor pair converts without re-quantizing:

  weight_packed        uint8 [out, in/2]       E2M1 codes, element 2j in the low nibble
  weight_scale         uint8 [out, in/block]   E8M0 bytes (mxfp4, block 32) or E4M3 bytes (nvfp4, block 16)
  weight_global_scale  fp32 []                 nvfp4 only: the per-tensor divisor of every block scale

Compute: the family's ops (lowbit._blockfp: Triton kernels on CUDA, C kernels on CPU, the reference
elsewhere), with the scale bytes decoded through one 256-entry fp32 table (formats.blockfp.scale_table_of).
Gradients reach the input and the bias (LoRA / QLoRA on top train); the codes and scales are frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _blockfp as ops
from .._validate import check_choice, check_device
from ..formats import blockfp as bfp
from ._base import QuantLinear
from .family import Family, Option, register_family


class BlockFPLinear(QuantLinear):
    """nn.Linear whose weight is stored as MXFP4 or NVFP4 (E2M1 codes with per-block scales)."""

    FAMILY = "blockfp"
    QUANT_TYPES = bfp.QUANT_TYPES
    SHARDED_STORAGE = ("weight_packed", "weight_scale")
    MUST_MATCH = QuantLinear.MUST_MATCH + ("quant_type",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: Optional[torch.dtype] = None, quant_type: str = "nvfp4", scale_search: bool = False) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_choice("quant_type", quant_type, bfp.QUANT_TYPES)
        if not isinstance(scale_search, bool):
            raise TypeError(f"scale_search must be a bool, got {type(scale_search).__name__}")
        # how from_linear and requantize_ (PEFT merges) pick scale bytes; the bytes' format is the same either way,
        # so it is not format metadata (a checkpoint loads into a layer built with either)
        self.scale_search = scale_search
        block = bfp.BLOCK[quant_type]
        if in_features % block:
            raise ValueError(f"in_features={in_features} is not a multiple of {quant_type}'s block of {block} "
                             "(one scale per block of a row)")
        self.quant_type = quant_type
        dev = check_device("device", device)
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                          device=dev))
        # a zero weight until loaded: E8M0 byte 127 is 1.0, E4M3 byte 0x38 is 1.0
        self.register_buffer("weight_scale", torch.full((out_features, in_features // block),
                                                        127 if quant_type == "mxfp4" else 0x38,
                                                        dtype=torch.uint8, device=dev))
        if quant_type == "nvfp4":
            self.register_buffer("weight_global_scale", torch.ones((), dtype=torch.float32, device=dev))

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant_type: str = "nvfp4", scale_search: bool = False) -> "BlockFPLinear":
        """Quantize linear.weight with the spec's rounding (formats.blockfp.quantize_blockfp; scale_search: each
        block's scale byte chosen by least squared error among the standard one and its neighbours)."""
        cls._check_linear(linear)
        w = linear.weight.detach()
        self = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                   quant_type=quant_type, scale_search=scale_search)
        self.load_quantized(bfp.quantize_blockfp(w, quant_type, scale_search=scale_search))
        self.weight_dtype = w.dtype
        self._copy_bias(linear)
        return self

    @classmethod
    def from_compressed_tensors(cls, tensors: dict, *, bias: Optional[Tensor] = None,
                                name: str = "layer") -> "BlockFPLinear":
        """An NVFP4 layer from compressed-tensors' tensors of one Linear ({"weight_packed", "weight_scale",
        "weight_global_scale"}), bytes kept (never re-quantized). ValueError naming the tensor otherwise."""
        q = bfp.from_compressed_tensors(tensors["weight_packed"], tensors["weight_scale"],
                                        tensors["weight_global_scale"], name=name)
        return cls._from_quant(q, bias)

    @classmethod
    def from_gpt_oss(cls, blocks: Tensor, scales: Tensor, *, bias: Optional[Tensor] = None,
                     name: str = "layer") -> "BlockFPLinear":
        """An MXFP4 layer from a gpt-oss `<param>_blocks` / `<param>_scales` pair of one matrix, bytes kept."""
        return cls._from_quant(bfp.from_gpt_oss(blocks, scales, name=name), bias)

    @classmethod
    def _from_quant(cls, q: bfp.QuantBlockFP, bias: Optional[Tensor]) -> "BlockFPLinear":
        out, inn = q.shape
        self = cls(inn, out, bias=bias is not None, device=q.device, quant_type=q.quant_type)
        self.load_quantized(q)
        if bias is not None:
            self.bias.data = bias.detach().to(torch.float32).clone()
        return self

    def load_quantized(self, q: bfp.QuantBlockFP) -> None:
        """Take the bytes of `q` (a QuantBlockFP of this layer's shape and quant_type; validated)."""
        if not isinstance(q, bfp.QuantBlockFP):
            raise TypeError(f"q must be a lowbit.formats.blockfp.QuantBlockFP, got {type(q).__name__}")
        if tuple(q.shape) != (self.out_features, self.in_features) or q.quant_type != self.quant_type:
            raise ValueError(f"q is {q.quant_type} {tuple(q.shape)}, the layer {self.quant_type} "
                             f"{(self.out_features, self.in_features)}")
        bfp.validate(q, "q")
        self.weight_packed, self.weight_scale = q.packed.contiguous(), q.scales.contiguous()
        if q.quant_type == "nvfp4":
            self.weight_global_scale = q.global_scale.reshape(()).to(torch.float32)

    @property
    def quantized_weight(self) -> bfp.QuantBlockFP:
        g = self._buffers.get("weight_global_scale")
        return bfp.QuantBlockFP(self.quant_type, (self.out_features, self.in_features), self.weight_packed,
                                self.weight_scale, g)

    # -- compute -----------------------------------------------------------------------------------
    def _scale_table(self) -> Tensor:
        return bfp.scale_table_of(self.quant_type, self._buffers.get("weight_global_scale"), self.weight_scale.device)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return ops.dequantize_blockfp(self.weight_packed, self.weight_scale, self._scale_table(),
                                      bfp.BLOCK[self.quant_type], self.out_features, self.in_features,
                                      self._default_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        x, in_dtype = self._compute(x)
        bias = self._decode_bias(x, self.weight_packed)
        y = ops.matmul_blockfp_unchecked(x, self.weight_packed, self.weight_scale, self._scale_table(),
                                         bfp.BLOCK[self.quant_type], self.out_features, bias)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    @property
    def bits_per_param(self) -> float:
        return self.quantized_weight.bits_per_param()

    def format_fields(self) -> dict:
        return {"quant_type": self.quant_type}

    def _convert_foreign(self, state_dict: dict, prefix: str) -> None:
        # compressed-tensors stores NVFP4 block scales as float8_e4m3fn: the same bytes, viewed as uint8
        key = prefix + "weight_scale"
        t = state_dict.get(key)
        if isinstance(t, Tensor) and t.dtype == torch.float8_e4m3fn:
            state_dict[key] = t.view(torch.uint8)
        key = prefix + "weight_global_scale"
        t = state_dict.get(key)
        if isinstance(t, Tensor) and t.shape == (1,):
            state_dict[key] = t.reshape(())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The bytes are checked before anything is copied: refused values (E8M0's NaN byte 0xFF, a global
        # scale of 0 / inf / NaN, a block that decodes to inf) name the tensor, and the layer keeps its own.
        self._convert_foreign(state_dict, prefix)
        packed, scale = state_dict.get(prefix + "weight_packed"), state_dict.get(prefix + "weight_scale")
        g = state_dict.get(prefix + "weight_global_scale")
        if (isinstance(packed, Tensor) and isinstance(scale, Tensor) and packed.device.type != "meta"
                and tuple(packed.shape) == tuple(self.weight_packed.shape)
                and tuple(scale.shape) == tuple(self.weight_scale.shape)):
            if hasattr(packed, "to_local") and hasattr(scale, "to_local"):
                # FSDP2 (a sharded checkpoint loading into a sharded model): each rank checks its own rows
                packed, scale = packed.to_local(), scale.to_local()
            q = bfp.QuantBlockFP(self.quant_type, (packed.shape[0], self.in_features), packed, scale,
                                 g.reshape(()) if isinstance(g, Tensor) and self.quant_type == "nvfp4" else None)
            try:
                bfp.validate(q, prefix.rstrip(".") or "layer")
            except (TypeError, ValueError) as e:
                error_msgs.append(f"{type(self).__name__} {prefix.rstrip('.') or '(root)'}: {e}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- merging, tensor parallelism ---------------------------------------------------------------
    def requantize_(self, target: Tensor) -> str:
        self.load_quantized(bfp.quantize_blockfp(target, self.quant_type, scale_search=self.scale_search))
        return self.quant_type

    def _narrow(self, dim: int, start: int, stop: int) -> "BlockFPLinear":
        block = bfp.BLOCK[self.quant_type]
        if dim == 1 and (start % block or stop % block):
            raise ValueError(f"columns {start}:{stop} of a {self.quant_type} layer would split a block; the cut "
                             f"must be at a multiple of {block}")
        packed, scale = self.weight_packed, self.weight_scale
        if dim == 0:
            packed, scale, out, inn = packed[start:stop], scale[start:stop], stop - start, self.in_features
        else:
            packed, scale = packed[:, start // 2:stop // 2], scale[:, start // block:stop // block]
            out, inn = self.out_features, stop - start
        m = BlockFPLinear(inn, out, bias=False, device=packed.device, quant_type=self.quant_type,
                          scale_search=self.scale_search)
        m.weight_packed, m.weight_scale = packed.contiguous().clone(), scale.contiguous().clone()
        if self.quant_type == "nvfp4":
            m.weight_global_scale = self.weight_global_scale.clone()
        return m

    @classmethod
    def cat_rows(cls, layers: list) -> Optional["BlockFPLinear"]:
        # rows and their block scales concatenate; nvfp4 only when the per-tensor divisors are equal
        first = layers[0]
        if not all(type(m) is BlockFPLinear and m.quant_type == first.quant_type
                   and m.in_features == first.in_features and m.weight_dtype == first.weight_dtype for m in layers):
            return None
        if first.quant_type == "nvfp4" and not all(torch.equal(m.weight_global_scale, first.weight_global_scale)
                                                   for m in layers):
            return None
        m = BlockFPLinear(first.in_features, sum(x.out_features for x in layers), bias=False, device="meta",
                          quant_type=first.quant_type, scale_search=first.scale_search)
        m.weight_packed = torch.cat([x.weight_packed for x in layers])
        m.weight_scale = torch.cat([x.weight_scale for x in layers])
        if first.quant_type == "nvfp4":
            m.weight_global_scale = first.weight_global_scale
        m.weight_dtype = first.weight_dtype
        return m


# ----------------------------------------------------------------------------------------------
# The family record (lowbit.nn.family)
# ----------------------------------------------------------------------------------------------


def _build(quant_type: str, linear: nn.Linear, *, scale_search: bool) -> BlockFPLinear:
    return BlockFPLinear.from_linear(linear, quant_type=quant_type, scale_search=scale_search)


def _empty(quant_type: str, in_features: int, out_features: int, bias: bool, device, *,
           scale_search: bool) -> BlockFPLinear:
    return BlockFPLinear(in_features, out_features, bias, device=device, quant_type=quant_type,
                         scale_search=scale_search)


BLOCKFP_FAMILY = register_family(Family(
    name="blockfp", layer=BlockFPLinear, quant_types=bfp.QUANT_TYPES,
    options=(Option("scale_search", False, "pick each block's scale byte by least squared error among the standard "
                    "rule's and its neighbours (the same format; default: OCP's / compressed-tensors' rule)",
                    flag="--scale-search", cli_action="store_true"),),
    build=_build, empty=_empty,
    label=lambda qt, o: f"{qt} (block {bfp.BLOCK[qt]}{', scale search' if o.get('scale_search') else ''})",
    doc="docs/blockfp.md"))

__all__ = ["BLOCKFP_FAMILY", "BlockFPLinear"]
