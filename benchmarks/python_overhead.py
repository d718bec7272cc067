"""Python cost of Linear4bit.forward and IntLinear.forward above the kernel launcher, on CPU with the
launch stubbed (issue: the eager path must cost <= 10 us per decode call): lowbit's routing sends the
CPU tensors to a stub "kernels" module whose launchers return a preallocated output, so what is timed
is exactly the Python between `layer(x)` and the launcher. Run: python benchmarks/python_overhead.py"""
import os
import time

import torch

os.environ.pop("TRITON_INTERPRET", None)
import lowbit  # noqa: E402
import lowbit._ops as ops  # noqa: E402

torch.set_num_threads(1)
out = torch.empty(1, 4096, dtype=torch.bfloat16)


class StubK:
    class nf4:
        @staticmethod
        def matmul_4bit(*a, **k):
            return out

    class intq:
        @staticmethod
        def matmul_int(*a, **k):
            return out


def per_call(layer, x, n=5000) -> float:
    for _ in range(200):
        layer(x)
    t = time.perf_counter()
    for _ in range(n):
        layer(x)
    return (time.perf_counter() - t) / n * 1e6


x = torch.randn(1, 4096, dtype=torch.bfloat16)
layers = {"Linear4bit (nf4+dq)": lowbit.Linear4bit.from_linear(torch.nn.Linear(4096, 4096)).to(torch.bfloat16),
          "IntLinear (int3 g128)": lowbit.IntLinear.from_linear(torch.nn.Linear(4096, 4096), bits=3,
                                                                group_size=128).to(torch.bfloat16)}
ops.use_triton = lambda t: True  # from here on, CPU tensors "launch" the stubs
ops.kernels = lambda: StubK
for name, layer in layers.items():
    with torch.no_grad():
        us = per_call(layer, x)
    print(f"{name}.forward python path above the launcher (no_grad, launch stubbed): {us:.1f} us/call")
    print(f"{name} same with autograd on: {per_call(layer, x):.1f} us/call")
