"""Triton kernels (installed as lowbit.kernels). Importing this package imports Triton."""

from . import matmul4bit, quant4bit

__all__ = ["matmul4bit", "quant4bit"]
