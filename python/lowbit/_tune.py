"""`lowbit tune --out FILE`: time every candidate config of the shipped tables on this CUDA card for
a set of shapes and write the winners as the card's table (kernels/_configs/<card>.json), which the
launchers then use without timing anything at run time."""

from __future__ import annotations

import json
import os
import tempfile

from ._tools import UsageError

DEFAULT_SHAPES = ((4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192))
DEFAULT_MS = (1, 2, 4, 8, 16, 64, 4096)


def tune(shapes=DEFAULT_SHAPES, ms=DEFAULT_MS, *, int_bits=(2, 3, 4), log=print) -> dict:
    """Run the launchers with the first-call tuner forced on (and no table) for every (N, K) in
    `shapes` and M in `ms`, bf16, nf4 + double quant and int rows; returns the table as JSON data."""
    import torch

    import lowbit
    from lowbit.kernels import _common

    if not torch.cuda.is_available():
        raise UsageError("lowbit tune needs a CUDA device (it times kernels on the card it writes a table for)")
    old = {k: os.environ.get(k) for k in ("LOWBIT_AUTOTUNE", "LOWBIT_CONFIG_DIR")}
    with tempfile.TemporaryDirectory() as empty:
        os.environ.update(LOWBIT_AUTOTUNE="1", LOWBIT_CONFIG_DIR=empty)  # time everything, read no table
        _common._tuned.clear()
        _common._tables.clear()
        try:
            for n, k in shapes:
                w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                q4 = lowbit.quantize_4bit(w)
                qi = {b: lowbit.quantize_int(w, b) for b in int_bits}
                for m in ms:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    y = lowbit.matmul_4bit(x, q4)
                    y.backward(torch.randn_like(y))
                    for q in qi.values():
                        lowbit.matmul_int(x, q).sum().backward()
                    log(f"tuned N={n} K={k} M={m}")
                del w, q4, qi
        finally:
            for key, v in old.items():
                os.environ.pop(key) if v is None else os.environ.__setitem__(key, v)
            _common._tables.clear()
    return {
        "version": _common.TABLE_VERSION,
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "entries": [{"key": _common.key_to_json(key), "config": _common.config_to_json(cfg)}
                    for key, cfg in sorted(_common._tuned.items(), key=lambda kv: str(kv[0]))],
    }


def _tune(a) -> int:
    if os.path.exists(a.out) and not a.force:
        raise UsageError(f"--out {a.out!r} exists; pass --force to overwrite it")
    shapes = DEFAULT_SHAPES
    if a.shapes:
        try:
            shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(","))
            assert all(len(s) == 2 and min(s) > 0 for s in shapes)
        except (ValueError, AssertionError):
            raise UsageError(f"--shapes must look like 4096x4096,8192x28672 (N x K), got {a.shapes!r}") from None
    table = tune(shapes, (1, 4, 16) if a.quick else DEFAULT_MS)
    with open(a.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}: {len(table['entries'])} entries for {table['card']}")
    return 0
