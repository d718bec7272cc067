"""`python -m lowbit._aot [--arch 80 90] [--filter NAME]`: compile every kernel spec for sm_80/sm_90
without a GPU, exactly as the JIT would specialize it (the machinery is lowbit.kernels._compile;
the compile tier of the tests, tests/test_compile_tier.py, runs this in a subprocess because
TRITON_INTERPRET, set for the interpreter tier, replaces @triton.jit at decoration time)."""

import os
import sys

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before anything imports the kernels
    from lowbit.kernels._compile import main

    sys.exit(main())
