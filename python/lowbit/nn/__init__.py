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

The package, one file per job:
  _base.py       QuantLinear (the contract above) and the metadata codec (encode_meta / decode_meta)
  family.py      the format-family registry: Family, Option, register_family, family_of, quant_types
  linear4bit.py  Linear4bit (nf4 / fp4 / optimal)        + its Family record
  intlinear.py   IntLinear (int2 / int3 / int4)          + its Family record
  szlinear.py    SZLinear (sz)                           + its Family record
  lora.py        LoRALinear
  replace.py     replace_linear, layer_factory, empty_layer, takes_calibration, skip_matches

A new family writes its layer module (a QuantLinear subclass and a `register_family(Family(...))` call at
its end; docs/adding-a-family.md) and adds its module's name to FAMILY_MODULES below: nothing else here
changes.
"""

from __future__ import annotations

import importlib

from ._base import EXTRA_STATE, FORMAT_VERSION, META_BYTES, QuantLinear, decode_meta, encode_meta
from .family import FAMILIES, REQUIRED, Family, Option, all_options, family_named, family_of, quant_types, \
    register_family
from .lora import LoRALinear
from .replace import check_options, empty_layer, layer_factory, replace_linear, skip_matches, takes_calibration

# The format families, registered in this order (each module ends with its register_family call).
# Adding a family = adding its module here.
FAMILY_MODULES = ("linear4bit", "intlinear", "szlinear", "blockfp")
for _name in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_name}")

from .intlinear import IntLinear  # noqa: E402
from .linear4bit import Linear4bit  # noqa: E402
from .szlinear import SZLinear  # noqa: E402

__all__ = ["FAMILIES", "Family", "IntLinear", "Linear4bit", "LoRALinear", "Option", "QuantLinear", "SZLinear",
           "family_of", "quant_types", "register_family", "replace_linear", "takes_calibration"]
