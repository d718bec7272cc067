"""`lowbit finetune`: QLoRA end to end on a causal-LM folder.

Every Linear except lm_head becomes nf4 (double quantized) + LoRA; the run uses gradient
checkpointing and lowbit.optim.OffloadedAdamW, shows a progress bar with the loss, saves the
adapter (lowbit's format: adapter.safetensors with the LoRA tensors by module path, adapter.json;
`load_adapter` rebuilds the fine-tuned model from it, PEFT cannot read it) and, with compare=True,
runs the same steps as dense LoRA (bf16 on CUDA) to report both memories.

Memory: on CUDA the peak allocated memory of the run; on the CPU the bytes of the weights and
optimizer states held after the run (activations and gradients are not counted).
A folder without a tokenizer (a model built from a config) is fed UTF-8 bytes.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ._tools import UsageError, read_config
from .nn import LoRALinear, QuantLinear, replace_linear
from .optim import OffloadedAdamW

SAMPLE_TEXT = Path(__file__).with_name("_finetune_sample.txt")
DEFAULT_OUT = "lowbit-finetune"  # `lowbit finetune` without --out: never train only to throw the adapter away
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"


class TextTooShort(ValueError):
    """The text has no more tokens than one training window (a usage error on the command line)."""


def causal_lm_problem(config: dict) -> Optional[str]:
    """Why a config.json does not describe a causal LM, or None when it does.

    Checked before loading: AutoModelForCausalLM.from_pretrained accepts an encoder such as BERT
    (it builds BertLMHeadModel with a freshly initialised head), so a wrong folder would train for
    minutes on a model that is not the one the user has. The folder's `architectures` decide when
    present (a *ForCausalLM class, or another class transformers maps a model type to for causal
    LM, e.g. GPT2LMHeadModel); without them, the model type must have a causal-LM class."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal
    except ImportError:
        causal = {}
    archs = [str(x) for x in config.get("architectures") or ()]
    if archs:
        if any(x.endswith("ForCausalLM") or x in causal.values() for x in archs):
            return None
        return f"its architectures {archs} hold no causal LM (a class ending in ForCausalLM)"
    model_type = config.get("model_type")
    if model_type in causal:
        return None
    return f"its model_type {model_type!r} has no causal-LM class in transformers (and config.json names no architectures)"


def tokens(model_dir: str, text: str, vocab_size: int) -> torch.Tensor:
    """The text's token ids: the folder's tokenizer, else UTF-8 bytes (mod vocab_size)."""
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    except (OSError, ValueError, TypeError):
        ids = [b % vocab_size for b in text.encode("utf-8")]
    return torch.tensor(ids, dtype=torch.long)


def add_lora(model: nn.Module, r: int, alpha: float) -> list[str]:
    """Freeze `model` and wrap every quantized layer (or, in a dense model, every nn.Linear but
    lm_head) in a LoRALinear; returns the wrapped layers' names."""
    model.requires_grad_(False)
    names = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear) or (type(mod) is nn.Linear and name.split(".")[-1] != "lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, LoRALinear(mod, r=r, alpha=alpha))
            names.append(name)
    return names


def _tensor_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.dtype, t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _windows(ids: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def _bar(steps: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return range(steps)
    return tqdm(range(steps), desc=desc, unit="step", file=sys.stderr)


def _checkpointing(model: nn.Module) -> None:
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def run(model_dir: str, text: str, *, quantized: bool = True, steps: int = 40, seq_len: int = 64, batch: int = 4,
        r: int = 16, alpha: float = 32, lr: float = 3e-3, device: Optional[str] = None,
        dtype: Optional[torch.dtype] = None, seed: int = 0, out: Optional[str] = None,
        progress: bool = True, eval_text: Optional[str] = None, eval_windows: int = 8) -> dict:
    """One fine-tune; returns eval loss before/after (fixed windows), the step losses and memory.

    eval_text: held-out text (e.g. other articles than the training text): the eval loss is then the mean
    next-token loss over its first `eval_windows` non-overlapping windows of seq_len tokens, and the result
    holds the perplexity before/after. Without it, 8 random windows of the training text (seeded) are used."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    with open(os.path.join(model_dir, "config.json")) as f:
        problem = causal_lm_problem(json.load(f))
    if problem:
        raise ValueError(f"{model_dir!r} is not a causal-LM folder: {problem}")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokens(model_dir, text, model.config.vocab_size)
    if len(ids) <= seq_len:
        raise TextTooShort(f"the text has {len(ids)} tokens; it needs more than seq_len={seq_len}")
    if quantized:
        replace_linear(model, "nf4")
    model.to(device=device, dtype=dtype)  # lowbit layers: compute dtype only, storage untouched
    wrapped = add_lora(model, r, alpha)
    model.config.use_cache = False
    _checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = OffloadedAdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    gen = torch.Generator().manual_seed(seed)
    if eval_text is None:
        held_out = _windows(ids, 8, seq_len, torch.Generator().manual_seed(seed + 1)).to(device)
    else:
        eids = tokens(model_dir, eval_text, model.config.vocab_size)
        n_eval = min(eval_windows, len(eids) // seq_len)
        if n_eval < 1:
            raise TextTooShort(f"the evaluation text has {len(eids)} tokens, fewer than one window of "
                               f"seq_len={seq_len}")
        held_out = eids[: n_eval * seq_len].view(n_eval, seq_len).to(device)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(model(input_ids=held_out, labels=held_out).loss)
        model.train()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before, losses = eval_loss(), []
    bar = _bar(steps, "nf4 + LoRA" if quantized else "dense LoRA") if progress else range(steps)
    for _ in bar:
        x = _windows(ids, batch, seq_len, gen).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    after = eval_loss()
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _tensor_bytes(model, opt))
    if out is not None:
        save_adapter(model, out, model_dir=model_dir, r=r, alpha=alpha, quantized=quantized, targets=wrapped)
    return {"eval_loss_before": before, "eval_loss_after": after, "losses": losses, "memory_bytes": memory,
            "memory_kind": "peak allocated (CUDA)" if device.type == "cuda" else "weights + optimizer states",
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "trainable": sum(p.numel() for p in trainable), "eval_windows": int(held_out.shape[0]),
            "ppl_before": math.exp(before), "ppl_after": math.exp(after), "peak_rss_bytes": _peak_rss()}


def _peak_rss() -> Optional[int]:
    """The process's peak resident set size in bytes (Linux/macOS), None elsewhere. Process-wide: compare runs
    made in separate processes."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def save_adapter(model: nn.Module, out: str, **config) -> None:
    """The LoRA tensors by module path (adapter.safetensors) and the run's settings (adapter.json)."""
    from lowbit.io import save_safetensors

    os.makedirs(out, exist_ok=True)
    if "model_dir" in config:  # absolute: load_adapter must find the base model from any directory
        config["model_dir"] = os.path.abspath(config["model_dir"])
    lora = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}
    save_safetensors(lora, os.path.join(out, ADAPTER_WEIGHTS))  # the user's umask, not safetensors' 0600
    with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
        json.dump({"format": "lowbit-lora", **config}, f, indent=1)


def load_adapter(adapter_dir: str, model: Optional[nn.Module] = None) -> nn.Module:
    """The fine-tuned model from a folder `save_adapter` (and so `lowbit finetune`) wrote.

    `model`: the base model to put the adapter on (default: AutoModelForCausalLM from adapter.json's
    model_dir). It is quantized to nf4 as in training (when the run was quantized), the layers named
    in adapter.json are wrapped in LoRALinear(r, alpha), and the saved LoRA tensors are loaded into
    them. Every saved tensor must land and every LoRA tensor must be saved: a mismatch raises
    ValueError instead of leaving part of the adapter at its initial values."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("format") != "lowbit-lora":
        raise ValueError(f"{adapter_dir!r}: {ADAPTER_CONFIG} is not a lowbit LoRA adapter (format {cfg.get('format')!r})")
    if model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"])
    if cfg.get("quantized", True):
        replace_linear(model, "nf4", progress=False)  # run()'s quantization: the base the adapter was trained on
    wrapped = add_lora(model, cfg["r"], cfg["alpha"])
    if sorted(wrapped) != sorted(cfg["targets"]):
        raise ValueError(f"{adapter_dir!r}: the model's layers {sorted(set(wrapped) ^ set(cfg['targets']))[:4]} "
                         "differ from the adapter's targets; is it the model the adapter was trained on?")
    lora = load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    expected = {n for n, _ in model.named_parameters() if "lora_" in n}
    if set(lora) != expected:
        raise ValueError(f"{adapter_dir!r}: {ADAPTER_WEIGHTS} keys differ from the model's LoRA parameters "
                         f"(e.g. {sorted(set(lora) ^ expected)[:2]})")
    model.load_state_dict(lora, strict=False)  # strict=False: the base weights are not in the adapter
    return model.eval()


def _finetune(a) -> int:
    """The CLI body: a = argparse namespace with model_dir, text, steps, out, force, compare, seq_len,
    batch, r. Every check that can fail runs before the model is loaded, so a mistake costs no training."""
    config = read_config(a.model_dir)
    try:
        import transformers  # noqa: F401  (run() loads the model with it; say so before any work)
    except ImportError as e:
        raise UsageError(f"lowbit finetune needs transformers (pip install 'lowbit[transformers]'): {e}") from None
    problem = causal_lm_problem(config)
    if problem:
        raise UsageError(f"MODEL_DIR {a.model_dir!r} is not a causal LM ({problem}); lowbit finetune trains "
                         "causal-LM folders (e.g. Llama, GPT-2, Qwen)")
    if a.text is not None and not os.path.isfile(a.text):
        raise UsageError(f"no text file {a.text!r}")
    eval_path = getattr(a, "eval_text", None)
    if eval_path is not None and not os.path.isfile(eval_path):
        raise UsageError(f"--eval-text: no text file {eval_path!r}")
    try:
        text = Path(a.text or SAMPLE_TEXT).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"TEXT {a.text!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        eval_text = Path(eval_path).read_text(encoding="utf-8") if eval_path else None
    except UnicodeDecodeError as e:
        raise UsageError(f"--eval-text {eval_path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = _output_dir(a.out or DEFAULT_OUT, getattr(a, "force", False))
    kw = dict(steps=a.steps, seq_len=a.seq_len, batch=a.batch, r=a.r, eval_text=eval_text)
    try:
        runs = {"nf4 + LoRA": run(a.model_dir, text, out=out, **kw)}
    except TextTooShort as e:
        raise UsageError(f"TEXT {a.text or str(SAMPLE_TEXT)!r}: {e}; give a longer text or a smaller --seq-len") from None
    if a.compare:
        runs["dense LoRA"] = run(a.model_dir, text, quantized=False, **kw)
    for name, res in runs.items():
        print(f"{name} ({res['device']}, {res['dtype']}): eval loss {res['eval_loss_before']:.3f} -> "
              f"{res['eval_loss_after']:.3f} in {len(res['losses'])} steps; {res['memory_kind']}: "
              f"{res['memory_bytes'] / 2**20:.2f} MiB; {res['trainable']:,} trainable")
        if eval_text is not None:
            print(f"  held-out perplexity ({res['eval_windows']} windows of --eval-text): {res['ppl_before']:.2f} -> "
                  f"{res['ppl_after']:.2f}")
    print(f"saved the adapter to {os.path.join(out, ADAPTER_WEIGHTS)} and {os.path.join(out, ADAPTER_CONFIG)}; "
          f"load it with lowbit._finetune.load_adapter({out!r}) (docs/training.md)")
    first = next(iter(runs.values()))
    return 0 if math.isfinite(first["eval_loss_after"]) else 1


def _output_dir(out: str, force: bool) -> str:
    """The adapter's folder, created now: a folder that holds files needs --force, and a path that
    cannot be written fails here rather than after the training it would throw away."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out!r} exists and is not a folder")
        if os.listdir(out) and not force:
            raise UsageError(f"--out {out!r} exists and is not empty; pass --force to write the adapter into it "
                             "(adapter.safetensors and adapter.json are replaced), or choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out!r}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out!r}: the folder is not writable")
    return out
