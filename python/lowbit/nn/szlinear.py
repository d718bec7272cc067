"""SZLinear: the SZ-style error-bounded family as a layer."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_choice, check_device
from ..formats import sz as sz_fmt
from ..functional import check_sz_dtype
from .._ops import sz_decode, sz_matmul
from ._base import QuantLinear
from .family import REQUIRED, Family, Option, register_family

# ==============================================================================================
# SZ family
# ==============================================================================================

_MERGE_REFUSAL = (
    "lowbit: merging a LoRA adapter into an SZLinear is refused: SZ guarantees every decoded weight within "
    "error_bound={eb} of the weight it was compressed from, and re-compressing (decoded W + B@A*scaling) would "
    "keep that bound only against the already-rounded sum - up to 2x the bound from the exact merged weight - "
    "while the layer still reported error_bound={eb}. Keep the adapter unmerged (PeftModel), or dequantize the "
    "base (lowbit's transformers integration: model.dequantize()) and merge into the dense weights."
)

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
    DATA_DEPENDENT_SHAPES = True
    FROZEN_BIAS = True
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

    def check_compute_dtype(self, dtype: torch.dtype) -> None:
        if not self._mask & sz_fmt.DTYPE_BIT.get(dtype, 0):
            check_sz_dtype(self.to_sz(), dtype, False)

    def requantize_(self, target: Tensor) -> str:
        raise ValueError(_MERGE_REFUSAL.format(eb=self.error_bound))

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


# ----------------------------------------------------------------------------------------------
# The family record (lowbit.nn.family)
# ----------------------------------------------------------------------------------------------


def _build(quant_type: str, linear: nn.Linear, *, error_bound: float, mode: str, chunk_size: int,
           importance_alpha: float, importance_ref: str, input_moments: Optional[Tensor] = None) -> SZLinear:
    return SZLinear.from_linear(linear, error_bound=error_bound, mode=mode, chunk_size=chunk_size,
                                input_moments=input_moments, importance_alpha=importance_alpha,
                                importance_ref=importance_ref)


def _empty(quant_type: str, in_features: int, out_features: int, bias: bool, device, **opts) -> SZLinear:
    return SZLinear(in_features, out_features, bias, device=device, **opts)  # error_bound: the checkpoint's


SZ_FAMILY = register_family(Family(
    name="sz", layer=SZLinear, quant_types=SZLinear.QUANT_TYPES,
    options=(Option("error_bound", REQUIRED, "abs, or relative to the value range with mode='rel'",
                    flag="--error-bound", cli_type=float),
             Option("mode", "abs", "the bound is absolute (abs) or relative to the weight's range (rel)",
                    flag="--mode", choices=tuple(sz_fmt.MODES)),
             Option("chunk_size", 4096, "elements per independently decodable chunk"),
             Option("importance_alpha", sz_fmt.DEFAULT_ALPHA, "with calibration: how strongly column bounds "
                    "follow the input's second moments"),
             Option("importance_ref", "layer", "with calibration: what the column scaling is relative to")),
    build=_build, empty=_empty, calibrated=("sz",),
    label=lambda qt, o: f"sz {o.get('mode', 'abs')} {o['error_bound']:g}", doc="docs/sz.md"))
