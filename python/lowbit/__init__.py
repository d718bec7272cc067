"""lowbit: low-bit quantization kernels for PyTorch.

Formats: NF4/FP4 (bitsandbytes-compatible bytes, optional double-quantized scales) and a fitted
"optimal" 16-level table. Fused Triton dequant-matmul kernels on CUDA, pure-torch references
everywhere else. Importing lowbit imports torch and defines things; it compiles no kernel,
queries no device and does not import Triton.
"""

from ._version import __version__
from .autograd import matmul_4bit
from .checkpoint import load_quantized
from .nn import Linear4bit, LoRALinear, replace_linear
from .nn_int import IntLinear
from .quant4bit import Quant4bit, dequantize_4bit, quantize_4bit
from .quantint import QuantInt, dequantize_int, matmul_int, quantize_int
from .serialization import load_state_dict, save_state_dict, to_bnb_state_dict

__all__ = [
    "IntLinear",
    "Linear4bit",
    "LoRALinear",
    "Quant4bit",
    "QuantInt",
    "__version__",
    "dequantize_4bit",
    "dequantize_int",
    "load_quantized",
    "load_state_dict",
    "matmul_4bit",
    "matmul_int",
    "quantize_4bit",
    "quantize_int",
    "replace_linear",
    "save_state_dict",
    "to_bnb_state_dict",
]
