"""lowbit: low-bit quantization kernels for PyTorch.

Four format families, one vocabulary (docs/api.md):
  4-bit LUT   quantize_4bit / dequantize_4bit / Quant4bit / matmul_4bit / Linear4bit
              (nf4, fp4: bitsandbytes' bytes; "optimal": a fitted table)
  int rows    quantize_int / dequantize_int / QuantInt / matmul_int / IntLinear   (int2/3/4, PEQA)
  SZ          sz_compress / sz_decompress / SZTensor / SZLinear   (error-bounded)
  block FP4   quantize_blockfp / dequantize_blockfp / QuantBlockFP / BlockFPLinear   (mxfp4, nvfp4)
Importing lowbit imports torch and defines things; it compiles no kernel, queries no device and
does not import Triton.
"""

from ._version import __version__
from .autograd import matmul_4bit, matmul_int
from .formats.blockfp import QuantBlockFP, dequantize_blockfp, quantize_blockfp
from .formats.intq import QuantInt
from .formats.nf4 import Quant4bit
from .formats.sz import SZTensor
from .functional import dequantize_4bit, dequantize_int, quantize_4bit, quantize_int, sz_compress, sz_decompress
from .io import CheckpointError, load_quantized, load_state_dict, save_state_dict, to_bnb_state_dict
from .nn.blockfp import BlockFPLinear
from .nn import IntLinear, Linear4bit, LoRALinear, QuantLinear, SZLinear, replace_linear


def __getattr__(name: str):
    # lowbit.LowbitConfig without importing transformers at `import lowbit`: transformers is an
    # optional extra (lowbit[transformers]); the first access imports lowbit.integrations.transformers,
    # which registers quant_method "lowbit" with transformers. Not in __all__, so `import *` stays light.
    if name == "LowbitConfig":
        from .integrations.transformers import LowbitConfig

        return LowbitConfig
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")

__all__ = [
    "BlockFPLinear",
    "CheckpointError",
    "IntLinear",
    "Linear4bit",
    "LoRALinear",
    "Quant4bit",
    "QuantBlockFP",
    "QuantInt",
    "QuantLinear",
    "SZLinear",
    "SZTensor",
    "__version__",
    "dequantize_4bit",
    "dequantize_blockfp",
    "dequantize_int",
    "load_quantized",
    "load_state_dict",
    "matmul_4bit",
    "matmul_int",
    "quantize_4bit",
    "quantize_blockfp",
    "quantize_int",
    "replace_linear",
    "save_state_dict",
    "sz_compress",
    "sz_decompress",
    "to_bnb_state_dict",
]
