"""Python cost of Linear4bit.forward above the kernel launcher, on CPU with the launch stubbed
(issue: the eager path must cost <= 10 us per decode call). Run: python benchmarks/python_overhead.py"""
import os, time, torch
os.environ.pop("TRITON_INTERPRET", None)
import lowbit, lowbit._ops as ops, lowbit._backend as be
torch.set_num_threads(1)
layer = lowbit.Linear4bit.from_linear(torch.nn.Linear(4096, 4096)).to(torch.bfloat16)
x = torch.randn(1, 4096, dtype=torch.bfloat16)
out = torch.empty(1, 4096, dtype=torch.bfloat16)
class StubK:
    class nf4:
        @staticmethod
        def matmul_4bit(*a, **k): return out
ops.use_triton = lambda t: True
ops.kernels = lambda: StubK
with torch.no_grad():
    for _ in range(200): layer(x)
    t = time.perf_counter(); n = 5000
    for _ in range(n): layer(x)
    dt = (time.perf_counter() - t) / n
print(f"Linear4bit.forward python path above the launcher (no_grad, launch stubbed): {dt*1e6:.1f} us/call")
for _ in range(200): layer(x)
t = time.perf_counter(); n = 5000
for _ in range(n): layer(x)
print(f"same with autograd on: {(time.perf_counter() - t) / n * 1e6:.1f} us/call")
