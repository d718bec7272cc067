"""Triton kernels (installed as lowbit.kernels). Importing this package imports Triton."""

from . import matmul4bit, matmul_int, quant4bit, sz_decode

__all__ = ["matmul4bit", "matmul_int", "quant4bit", "sz_decode"]
