"""Triton kernels (installed as lowbit.kernels), one file per format family. Importing this
package imports Triton; nothing here imports lowbit."""

from . import intq, nf4, sz

__all__ = ["intq", "nf4", "sz"]
