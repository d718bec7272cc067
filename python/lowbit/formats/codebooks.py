"""Code tables: the 16 NF4/FP4 values and the 256-value signed dynamic map.

The values are bitsandbytes' exactly (bnb `get_4bit_type` and `create_dynamic_map`), so the
packed codes and scales we write are the bytes bitsandbytes writes.
"""

from __future__ import annotations

import functools

import torch

# Quantiles of N(0, 1) with an exact zero, normalised to [-1, 1] (QLoRA, appendix E).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# 1 sign, 2 exponent, 1 mantissa bit, listed in bit-pattern order (index = code), divided by 12.
_FP4_RAW = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_VALUES = tuple(v / 12.0 for v in _FP4_RAW)


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry fp32 table indexed by the 4-bit code (a fresh CPU tensor)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        # bnb builds the table as float32 then divides by its max in float32.
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    raise ValueError(f"quant_type must be 'nf4' or 'fp4' for a fixed table, got {quant_type!r}")


def quantize_bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision bounds for nearest-value rounding and the sorted-index -> code map.

    A value x gets sorted index `sum(bounds < x)` (torch.bucketize, right=False: a value on a
    midpoint goes down), then code `order[index]`. NF4 is sorted, so order is the identity;
    FP4's table is in bit-pattern order and needs the map.
    """
    order = torch.argsort(code, stable=True)
    srt = code[order]
    bounds = (srt[:-1] + srt[1:]) / 2
    return bounds, order.to(torch.uint8)


@functools.lru_cache(maxsize=1)
def _dynamic_map_values() -> tuple[float, ...]:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return tuple(data)


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted fp32 values) used for double-quantized scales."""
    return torch.tensor(_dynamic_map_values(), dtype=torch.float32)
