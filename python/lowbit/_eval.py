"""`lowbit eval`: perplexity of a causal LM in full precision and with each lowbit format (and bitsandbytes'
own nf4 as a cross-check), on the same non-overlapping token windows of a text.

Per row: perplexity, the paired per-token NLL difference vs the fp32 row with its standard error (over the
per-window mean differences), windows better / worse than fp32, bits/param of the quantized projections and
of the whole model, quantize time, forward tokens/s and the row's wall time; optionally a greedy sample.

Method: the text is tokenized once (no special tokens added); window w is tokens [w*ctx, (w+1)*ctx); each
window is one forward of its own (batch 1, no cache, no context carried over), its ctx-1 next-token NLLs
computed from the fp32 logits in float64 (logsumexp - logit of the label). Every quantized row starts from a
fresh deep copy of the full-precision model, with replace_linear(skip=("lm_head",)): embeddings and lm_head
stay fp32 (with tied embeddings lm_head is the embedding matrix).

MODEL_DIR may also be a folder written by `lowbit quantize` (it holds lowbit.json): that model is evaluated
as saved (no re-quantization; `_load_quantized_folder`), against the full-precision folder its manifest names
as `source` when that still exists.

Over 500 lines: the command's argument checks, scoring, bits accounting, the bitsandbytes cross-check row and
the report read as one pipeline; _demo.py, _finetune.py and _tune_scales.py import its pieces (labels,
loaders, scoring).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import sys
import time

from ._quantize import (FORMATS, _positive_float, _positive_int, add_calibration_arguments, calibration_moments,
                        check_calibration_arguments, max_positions)
from ._tools import UsageError, _threads, read_config
from .nn import family_of

DEFAULT_FORMATS = ("nf4", "fp4", "optimal", "int4", "int3", "sz")
DEFAULT_CTX = 512
DEFAULT_WINDOWS = 32
DEFAULT_MAX_NEW_TOKENS = 32
SKIP = ("lm_head",)
BLOCKSIZE = 64  # nf4 / fp4 / optimal, and the bitsandbytes row
# SZ's absolute error bound: 0.03 lands at ~3.7 bits/param on SmolLM2-135M's projections (weights' std ~0.19)
SZ_EVAL_BOUND = 0.03
INT_METHOD = "mse"
# int2/3/4 group size: 128, the common choice (GPTQ/AWQ); a group need not divide K (a row's last group is
# ragged, docs/int.md), only K must be a multiple of 32 - else one scale per row
INT_GROUP = 128

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model")
MANIFEST = "lowbit.json"

# the keys of each row of --json (documented in the command's help and tested)
ROW_KEYS = ("label", "format", "options", "perplexity", "mean_nll", "delta_nll", "delta_nll_se", "windows_better",
            "windows_worse", "window_nll", "bits_per_param", "model_bits_per_param", "quantized_params",
            "quantize_s", "load_s", "forward_s", "tokens_per_s", "wall_s", "sample")


# ------------------------------------------------------------------------------------------ arguments


def add_arguments(p) -> None:
    """The `lowbit eval` arguments (cli.py registers the sub-command)."""
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a full-precision Hugging Face causal-LM folder, a folder "
                   "written by `lowbit quantize` (evaluated as saved), or `smollm2` (lowbit.smollm2.model_dir())")
    p.add_argument("--format", dest="formats", action="extend", nargs="+", default=None, metavar="F",
                   help=f"formats to compare with fp32, space- or comma-separated, from {', '.join(FORMATS)} "
                        f"(default: {' '.join(DEFAULT_FORMATS)})")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="a UTF-8 text file (default: lowbit.smollm2.evaluation_text(), ~38k SmolLM2 tokens)")
    p.add_argument("--ctx", type=_positive_int, default=DEFAULT_CTX, metavar="N",
                   help=f"tokens per window (default {DEFAULT_CTX})")
    p.add_argument("--windows", type=_positive_int, default=DEFAULT_WINDOWS, metavar="N",
                   help=f"non-overlapping windows scored, from the start of the text (default {DEFAULT_WINDOWS})")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (keys: model, text, ctx, "
                   f"windows, scored_tokens, machine, rows; each row: {', '.join(ROW_KEYS)})")
    p.add_argument("--generate", default=None, metavar="PROMPT",
                   help="also print each row's greedy continuation of PROMPT (chat template applied when the "
                        "tokenizer has one)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N",
                   help=f"tokens --generate writes (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--no-bnb", action="store_true", help="no bitsandbytes nf4 row even when bitsandbytes imports")
    p.add_argument("--group-size", type=_positive_int, default=None, metavar="N",
                   help="int2/3/4: weights per scale, a multiple of 32 (default: 64 when it divides every "
                        "projection's in_features, else the next of 128, 96, 32 that does, else one per row)")
    p.add_argument("--error-bound", type=_positive_float, default=None, metavar="X",
                   help=f"sz: absolute error bound (default {SZ_EVAL_BOUND:g}: ~3.7 bits/param on SmolLM2-135M)")
    add_calibration_arguments(p)  # a format that takes calibration then gets a second row, fitted on it


def parse_formats(values) -> list[str]:
    """--format values ("nf4 int4", "nf4,int4", repeated) -> the formats in order, without repeats."""
    if values is None:
        return list(DEFAULT_FORMATS)
    out: list[str] = []
    for v in values:
        for f in v.split(","):
            f = f.strip()
            if not f:
                continue
            if f not in FORMATS:
                raise UsageError(f"unsupported format {f!r}; choose from {', '.join(FORMATS)}")
            if f not in out:
                out.append(f)
    if not out:
        raise UsageError(f"--format names no format; choose from {', '.join(FORMATS)}")
    return out


def format_options(fmt: str, *, group_size=None, error_bound=None) -> dict:
    """replace_linear options of a row (group_size: the int formats' resolved group size). The three
    original families get the settings the report compares them at; any other registered family its
    options' defaults (lowbit.nn.family)."""
    if fmt in ("nf4", "fp4", "optimal"):
        return {"blocksize": BLOCKSIZE, "double_quant": True}
    if fmt in ("int2", "int3", "int4"):
        return {"group_size": group_size, "method": INT_METHOD}
    if fmt == "sz":
        return {"error_bound": SZ_EVAL_BOUND if error_bound is None else error_bound, "mode": "abs"}
    return family_of(fmt).defaults(fmt)


def format_label(fmt: str, opts: dict, calibrated: bool = False) -> str:
    """The row's label; a row fitted on --calibration ends in " cal"."""
    label = _plain_label(fmt, opts)
    return f"{label} cal" if calibrated else label


def _plain_label(fmt: str, opts: dict) -> str:
    return family_of(fmt).describe(fmt, opts)


def _fit_options(opts: dict) -> dict:
    """A row's replace_linear options: its options less the "calibration" record of a calibrated row."""
    return {k: v for k, v in opts.items() if k != "calibration"}


def int_group_size(in_features) -> int | None:
    """The default int group size for projections with these in_features (None: one scale per row)."""
    return INT_GROUP if all(k % 32 == 0 for k in in_features) else None


# ------------------------------------------------------------------------------------------ inputs


def _resolve_model_dir(arg: str) -> str:
    if arg == "smollm2" and not os.path.exists(arg):
        try:
            from . import smollm2

            return smollm2.model_dir()
        except ImportError as e:
            raise UsageError(f"MODEL_DIR smollm2: {e}") from None
    return os.fspath(arg)


def check_folder(path: str) -> dict:
    """UsageError unless `path` is a model folder eval can read; returns its parsed config.json."""
    if not os.path.exists(path):
        raise UsageError(f"MODEL_DIR {path!r} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"MODEL_DIR {path!r} is not a directory")
    config = read_config(path)
    if not any(os.path.isfile(os.path.join(path, w)) for w in _weight_files(path)):
        raise UsageError(f"MODEL_DIR {path!r} holds no weights (none of {', '.join(_weight_files(path))})")
    if not any(os.path.isfile(os.path.join(path, t)) for t in _TOKENIZER_FILES):
        raise UsageError(f"MODEL_DIR {path!r} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    return config


def _weight_files(path: str) -> tuple[str, ...]:
    return ("model.safetensors",) if os.path.isfile(os.path.join(path, MANIFEST)) else _WEIGHT_FILES


def read_text(path: str | None) -> tuple[str, str]:
    """(the text, where it came from)."""
    if path is None:
        try:
            from . import smollm2

            return smollm2.evaluation_text(), "lowbit.smollm2.evaluation_text() (Lee corpus, articles 150-299)"
        except ImportError as e:
            raise UsageError(f"the default text needs gensim's Lee corpus ({e}); pass --text FILE") from None
    if not os.path.isfile(path):
        raise UsageError(f"--text {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), os.path.abspath(path)
    except UnicodeDecodeError as e:
        raise UsageError(f"--text {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read --text {path!r}: {e.strerror or e}") from None


def make_windows(ids, ctx: int, windows: int):
    """The first `windows` non-overlapping windows of `ctx` tokens of the 1-D tensor `ids`, as [W, ctx]
    (fewer when the text holds fewer; UsageError when it holds not even one)."""
    n = int(ids.numel())
    have = n // ctx
    if have == 0:
        raise UsageError(f"the text has {n} tokens, fewer than one window of --ctx {ctx}")
    w = min(windows, have)
    return ids[: w * ctx].reshape(w, ctx)


# ------------------------------------------------------------------------------------------ scoring


def window_nll(model, window, chunk: int = 256):
    """The ctx-1 next-token NLLs (float64) of one window [ctx] under `model`, and the forward's seconds."""
    import torch

    x = window.reshape(1, -1)
    t0 = time.perf_counter()
    logits = model(input_ids=x, use_cache=False).logits[0, :-1]
    dt = time.perf_counter() - t0
    labels = x[0, 1:]
    out = torch.empty(labels.numel(), dtype=torch.float64)
    for s in range(0, labels.numel(), chunk):  # float64 logits in pieces: a whole window's would be ~200 MB
        lp = logits[s: s + chunk].double()
        out[s: s + chunk] = torch.logsumexp(lp, -1) - lp.gather(-1, labels[s: s + chunk, None]).squeeze(-1)
    return out, dt


def score(model, windows, desc: str):
    """Per-window mean NLL (float64 list), all per-token NLLs summed, forward seconds."""
    import torch

    means, total, fwd = [], 0.0, 0.0
    it = range(windows.shape[0])
    try:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, unit="window", leave=False, file=sys.stderr)
    except Exception:  # noqa: BLE001 - no bar then
        pass
    with torch.inference_mode():
        model(input_ids=windows[:1, : min(16, windows.shape[1])], use_cache=False)  # warm-up, untimed
        for i in it:
            nll, dt = window_nll(model, windows[i])
            fwd += dt
            means.append(float(nll.mean()))
            total += float(nll.sum())
    return means, total, fwd


def paired(means, ref) -> dict:
    """Delta of the per-token mean NLL vs the reference, its standard error from the per-window mean
    differences (std / sqrt(W); windows have equal token counts so the token mean is the window mean), and
    the windows better / worse."""
    d = [a - b for a, b in zip(means, ref)]
    w = len(d)
    mean = sum(d) / w
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (w - 1) / w) if w > 1 else None
    return {"delta_nll": mean, "delta_nll_se": se, "windows_better": sum(x < 0 for x in d),
            "windows_worse": sum(x > 0 for x in d)}


# ------------------------------------------------------------------------------------------ storage


def model_bytes(model) -> float:
    """Bytes of the model's weights: every parameter and persistent buffer (a tied or shared tensor once),
    a quantized projection counted as its weight storage (what bits/w counts: codes, scales, tables) plus
    its bias. Non-persistent buffers (rotary frequencies, SZ decode tables) are derived, not stored."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None or t.device.type == "meta":
            return
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for m in model.modules():
        weight = _quantized_weight_bytes(m)
        if weight is not None:
            total += weight
            add(getattr(m, "bias", None))
            continue
        for t in m._parameters.values():
            add(t)
        for name, t in m._buffers.items():
            if name not in m._non_persistent_buffers_set:
                add(t)
    return total


def _quantized_weight_bytes(m) -> float | None:
    """The weight storage of a lowbit or bitsandbytes quantized layer, None for any other module."""
    if _is_bnb_linear4bit(m):
        return _bnb_layer_bytes(m)
    if hasattr(m, "bits_per_param") and hasattr(m, "in_features") and hasattr(m, "dequantized_weight"):
        return m.bits_per_param * m.in_features * m.out_features / 8.0
    return None


def _bnb_layer_bytes(layer) -> int:
    """Storage of a bitsandbytes Linear4bit weight: codes, absmax, code table, nested absmax / code, offset
    (the set lowbit's Quant4bit.nbytes counts)."""
    qs = layer.weight.quant_state
    ts = [layer.weight.data, qs.absmax, qs.code, qs.offset]
    if qs.nested:
        ts += [qs.state2.absmax, qs.state2.code]
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def quantized_bits(model) -> tuple[float, int]:
    """(bits/param over the quantized projections, their parameter count) of a lowbit or bitsandbytes model."""
    bits, params = 0.0, 0
    for m in model.modules():
        nbytes = _quantized_weight_bytes(m)
        if nbytes is not None:
            bits += 8.0 * nbytes
            params += m.in_features * m.out_features
    return (bits / params if params else float("nan")), params


def _is_bnb_linear4bit(m) -> bool:
    return type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"


# ------------------------------------------------------------------------------------------ models


@contextlib.contextmanager
def _quiet():
    """transformers' bars and warnings off, and anything printed to stdout sent to stderr (stdout carries
    only the table or the JSON)."""
    from ._quantize import _quiet_transformers

    with contextlib.redirect_stdout(sys.stderr), _quiet_transformers():
        yield


def _load_fp_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any failure to load is the folder's
        raise UsageError(f"cannot load a causal LM from {path!r}: {_first_line(e)}") from None
    return model.eval()


def _load_quantized_folder(path: str):
    """The model of a folder written by `lowbit quantize`, as saved (nothing re-quantized).

    The plug point for the loader of those folders (how they are written and loaded is being reworked):
    for now the architecture comes from config.json and lowbit.load_quantized fills it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import lowbit

    with _quiet():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = lowbit.load_quantized(model, path)
    return model.eval()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _targets(model):
    from ._tools import linear_targets

    return linear_targets(model, SKIP)


def check_formats(model, plan) -> None:
    """Build each row's layer for every projection shape on the meta device (the constructors' checks,
    nothing quantized): a format that cannot take the model fails here, before any forward."""
    from lowbit.nn import empty_layer

    shapes = {(lin.in_features, lin.out_features, lin.bias is not None) for _, lin in _targets(model)}
    for label, fmt, opts in plan:
        for k, n, bias in sorted(shapes):
            try:
                empty_layer(fmt, k, n, bias, device="meta", **opts)
            except (ValueError, TypeError) as e:
                raise UsageError(f"--format {fmt} ({label}) cannot take a {n}x{k} projection of this model: "
                                 f"{_first_line(e)}") from None


def quantize_copy(model, fmt: str, opts: dict, calibration=None):
    """A deep copy of `model` with its projections replaced by lowbit layers (fitted on `calibration`, the
    {name: h} of lowbit.calibration, when given); (model, seconds)."""
    import torch

    import lowbit

    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            lowbit.replace_linear(m, fmt, skip=SKIP, progress=sys.stderr.isatty(), calibration=calibration, **opts)
    except (ValueError, TypeError) as e:
        raise UsageError(f"cannot quantize with --format {fmt}: {_first_line(e)}") from None
    return m.eval(), time.perf_counter() - t0


def bnb_available() -> bool:
    """Whether bitsandbytes imports. Its import is silenced: on an AVX512-BF16 CPU it tries to fetch a kernel
    from the Hugging Face Hub (refused offline) and logs the failure, which is no concern of this command."""
    import io
    import logging

    old = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import bitsandbytes  # noqa: F401
            from bitsandbytes.nn import Linear4bit, Params4bit  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as good as none here
        return False
    finally:
        logging.disable(old)
    return True


def bnb_linear(lin, blocksize: int = BLOCKSIZE):
    """bitsandbytes' own Linear4bit (nf4, compress_statistics=True, compute_dtype fp32) for `lin`,
    quantized on the CPU: Params4bit(...).to("cpu") runs bitsandbytes.functional.quantize_4bit.

    On a CPU with AVX512-BF16 bitsandbytes' inference forward would repack the weight and round its absmax to
    bf16 (`_convert_weight_packed_for_cpu`, the gemv_4bit path): that is a different computation from the
    one these bytes define, so it is switched off and the layer dequantizes to fp32 and runs F.linear."""
    import torch
    from bitsandbytes.nn import Linear4bit, Params4bit
    from torch import nn

    layer = Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                       compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = Params4bit(lin.weight.detach().to(torch.float32).contiguous().clone(), requires_grad=False,
                              blocksize=blocksize, compress_statistics=True, quant_type="nf4",
                              module=layer).to("cpu")
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False
    return layer.eval()


def bnb_matches_lowbit(layer, lin) -> bool:
    """Whether the bnb layer's bytes (codes, uint8 absmax, nested absmax, offset) equal lowbit's nf4 of `lin`."""
    import torch

    import lowbit

    q = lowbit.quantize_4bit(lin.weight.detach().float(), BLOCKSIZE, "nf4", True)
    qs = layer.weight.quant_state
    return (torch.equal(q.codes.reshape(-1), layer.weight.data.reshape(-1))
            and torch.equal(q.absmax.reshape(-1), qs.absmax.reshape(-1))
            and torch.equal(q.nested_absmax.reshape(-1), qs.state2.absmax.reshape(-1))
            and torch.equal(q.offset.reshape(()).float(), qs.offset.reshape(()).float()))


def bnb_copy(model):
    """A deep copy of `model` with the same projections as the lowbit rows replaced by bitsandbytes'
    Linear4bit; (model, seconds, whether the first layer's bytes equal lowbit's nf4)."""
    import torch

    m = copy.deepcopy(model)
    targets = _targets(m)
    t0 = time.perf_counter()
    with torch.no_grad():
        built = [(name, bnb_linear(lin)) for name, lin in targets]
    dt = time.perf_counter() - t0
    same = bnb_matches_lowbit(built[0][1], targets[0][1]) if built else True
    for name, layer in built:
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, child, layer)
    return m.eval(), dt, same


def generate(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (as a user turn of the chat template when the tokenizer has one)."""
    import torch
    from transformers import GenerationConfig

    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(prompt, return_tensors="pt")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    gc_ = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    with torch.inference_mode(), _quiet():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"),
                             generation_config=gc_)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ output


def machine_info() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {"cpu_count": os.cpu_count(), "cpus_usable": affinity, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def machine_line(m: dict) -> str:
    usable = "" if m["cpus_usable"] in (None, m["cpu_count"]) else f" ({m['cpus_usable']} usable)"
    return (f"machine: {m['cpu_count']} CPUs{usable}, torch {m['torch']} with {m['torch_threads']} threads, "
            f"{m['machine']}, Python {m['python']}, {m['date']}")


TABLE_COLUMNS = ("format", "bits/w", "bits/model", "ppl", "dNLL", "+-se", "better/worse", "quant(s)", "tok/s",
                 "wall(s)")


def _cells(r: dict) -> list[str]:
    def num(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    ref = r.get("delta_nll") is None
    return [r["label"], num(r["bits_per_param"], ".3f"), num(r["model_bits_per_param"], ".3f"),
            num(r["perplexity"], ".4f"), "-" if ref else f"{r['delta_nll']:+.5f}",
            "-" if ref else num(r["delta_nll_se"], ".5f"),
            "-" if ref else f"{r['windows_better']}/{r['windows_worse']}", num(r["quantize_s"], ".1f"),
            num(r["tokens_per_s"], ".0f"), num(r["wall_s"], ".1f")]


def format_table(rows: list[dict]) -> str:
    """A plain table, columns aligned (the label left, numbers right)."""
    cells = [list(TABLE_COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for j, c in enumerate(cells):
        parts = [c[0].ljust(widths[0])] + [c[i].rjust(widths[i]) for i in range(1, len(c))]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command


def _row(label: str, fmt: str, opts: dict | None, means, total, n_tokens, fwd, ref, bits, model_bits, qparams,
         quant_s) -> dict:
    r = {"label": label, "format": fmt, "options": opts, "perplexity": math.exp(total / n_tokens),
         "mean_nll": total / n_tokens, "window_nll": means, "bits_per_param": bits,
         "model_bits_per_param": model_bits, "quantized_params": qparams, "quantize_s": quant_s, "load_s": None,
         "forward_s": fwd, "tokens_per_s": n_tokens / fwd if fwd > 0 else None, "wall_s": None, "sample": None}
    if ref is None:
        r.update(delta_nll=None, delta_nll_se=None, windows_better=None, windows_worse=None)
    else:
        r.update(paired(means, ref))
    return {k: r[k] for k in ROW_KEYS}


def _note(msg: str) -> None:
    print(f"lowbit: {msg}", file=sys.stderr, flush=True)


def _check_arguments(a) -> dict:
    """Every check that needs no model: UsageError for the first bad argument; returns what they resolved."""
    explicit_formats = a.formats is not None
    formats = parse_formats(a.formats)
    if a.max_new_tokens is not None and a.generate is None:
        raise UsageError("--max-new-tokens applies to --generate PROMPT")
    if a.generate is not None and not a.generate.strip():
        raise UsageError("--generate needs a non-empty PROMPT")
    if a.error_bound is not None and "sz" not in formats:
        raise UsageError("--error-bound applies to --format sz")
    if a.group_size is not None:
        if not any(f.startswith("int") for f in formats):
            raise UsageError("--group-size applies to --format int2/int3/int4")
        if a.group_size % 32:
            raise UsageError(f"--group-size must be a positive multiple of 32, got {a.group_size}")
    cal_text = check_calibration_arguments(a, formats)
    text, text_src = read_text(a.text) if a.text is not None else (None, None)  # a bad file before any build
    path = _resolve_model_dir(a.model_dir)
    config = check_folder(path)
    limit = max_positions(config)
    if limit is not None and a.ctx > limit:
        raise UsageError(f"--ctx {a.ctx} exceeds the model's context of {limit} tokens (max_position_embeddings)")
    folder = None
    if os.path.isfile(os.path.join(path, MANIFEST)):
        if explicit_formats:
            raise UsageError(f"MODEL_DIR {path!r} is a lowbit-quantized folder ({MANIFEST}): it is evaluated as saved; "
                             "--format applies to a full-precision folder")
        if a.error_bound is not None or a.group_size is not None or cal_text is not None:
            raise UsageError(f"--error-bound / --group-size / --calibration apply to a full-precision MODEL_DIR; "
                             f"{path!r} is lowbit-quantized")
        mpath = os.path.join(path, MANIFEST)
        try:
            with open(mpath, encoding="utf-8") as f:
                manifest = json.load(f)
            folder = {"format": str(manifest["format"]), "options": manifest.get("options")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"cannot read {mpath!r}: {_first_line(e)}") from None
        src = manifest.get("source")
        if (isinstance(src, str) and os.path.isfile(os.path.join(src, "config.json"))
                and not os.path.isfile(os.path.join(src, MANIFEST))):
            folder["source"] = src
    if text is None:
        text, text_src = read_text(None)
    return {"formats": formats, "text": text, "text_src": text_src, "path": path, "folder": folder,
            "calibration": cal_text, "max_positions": limit}


def _eval(a) -> int:
    c = _check_arguments(a)
    path, folder, text, text_src = c["path"], c["folder"], c["text"], c["text_src"]

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("lowbit eval needs transformers (pip install transformers)") from None

    with _threads(a.threads):
        # ---- the tokenizer, the windows and the models: their errors are still one line, nothing printed yet
        try:
            with _quiet():
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot load the tokenizer of {path!r}: {_first_line(e)}") from None
        with _quiet():
            ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        windows = make_windows(ids, a.ctx, a.windows)
        n_win = windows.shape[0]
        n_tokens = n_win * (a.ctx - 1)
        t_load = time.perf_counter()
        fp_path = folder.get("source") if folder else path
        fp = _load_fp_model(fp_path) if fp_path is not None else None
        load_s = time.perf_counter() - t_load
        plan, qm = [], None
        if folder:
            t_load = time.perf_counter()
            try:
                qm = _load_quantized_folder(path)
            except Exception as e:  # noqa: BLE001
                raise UsageError(f"cannot load the lowbit folder {path!r}: {_first_line(e)}") from None
            qload_s = time.perf_counter() - t_load
        else:
            in_features = [lin.in_features for _, lin in _targets(fp)]
            gsize = a.group_size if a.group_size is not None else int_group_size(in_features)
            calibration = None
            if c["calibration"] is not None:  # one pass, before any row: its errors are still one line
                from lowbit.nn import takes_calibration

                calibration, cal_info = calibration_moments(fp, tok, c["calibration"], a, SKIP, c["max_positions"])
                _note(f"calibration: {cal_info['windows']} x {cal_info['ctx']} tokens of {a.calibration} in "
                      f"{cal_info['seconds']:.1f} s (input second moments of {len(calibration)} projections)")
            for f in c["formats"]:
                opts = format_options(f, group_size=gsize, error_bound=a.error_bound)
                plan.append((format_label(f, opts), f, opts))
                if calibration is not None and takes_calibration(f):
                    plan.append((format_label(f, opts, calibrated=True), f, {**opts, "calibration": cal_info}))
            check_formats(fp, [(label, f, _fit_options(o)) for label, f, o in plan])
            if not a.no_bnb:
                plan.append((f"bnb nf4 b{BLOCKSIZE} dq", "bnb-nf4", None))
        n_params = sum(p.numel() for p in fp.parameters()) if fp is not None else None
        max_new = a.max_new_tokens or DEFAULT_MAX_NEW_TOKENS

        # ---- the rows
        machine = machine_info()
        _note(machine_line(machine))
        _note(f"text: {text_src}: {ids.numel()} tokens; scoring {n_win} window(s) x {a.ctx} tokens "
              f"({n_tokens} next-token predictions)")
        if n_win < a.windows:
            _note(f"note: the text holds {ids.numel()} tokens: {n_win} window(s) of {a.ctx}, not {a.windows}")
        rows: list[dict] = []

        def finish(row, model, t_row):
            if a.generate is not None:
                row["sample"] = generate(model, tok, a.generate, max_new)
            row["wall_s"] = time.perf_counter() - t_row
            rows.append(row)
            d = "" if row["delta_nll"] is None else f", dNLL {row['delta_nll']:+.5f}"
            _note(f"{row['label']}: ppl {row['perplexity']:.4f}{d}, {row['wall_s']:.1f} s")

        ref = None
        if fp is not None:
            t_row = time.perf_counter()
            means, total, fwd = score(fp, windows, "fp32")
            ref = means
            row = _row("fp32", "fp32", None, means, total, n_tokens, fwd, None, 32.0,
                       8.0 * model_bytes(fp) / n_params, sum(lin.weight.numel() for _, lin in _targets(fp)), None)
            row["load_s"] = load_s
            finish(row, fp, t_row)
        else:
            _note(f"note: {path!r} names no full-precision source folder that exists: no fp32 row, no deltas")

        if folder:
            t_row = time.perf_counter()
            means, total, fwd = score(qm, windows, folder["format"])
            bits, qparams = quantized_bits(qm)
            model_bits = 8.0 * model_bytes(qm) / n_params if n_params else None
            row = _row(f"{folder['format']} (folder)", folder["format"], folder["options"], means, total, n_tokens,
                       fwd, ref, bits, model_bits, qparams, None)
            row["load_s"] = qload_s
            finish(row, qm, t_row)
        for label, f, opts in plan:
            t_row = time.perf_counter()
            if f == "bnb-nf4":
                if not bnb_available():
                    _note("note: bitsandbytes does not import: no bnb row (--no-bnb silences this)")
                    continue
                _note(f"{label}: quantizing {len(in_features)} projections with bitsandbytes")
                qm, qs, same = bnb_copy(fp)
                if not same:
                    _note("warning: bitsandbytes' nf4 bytes differ from lowbit's for the first projection")
                opts = {"blocksize": BLOCKSIZE, "double_quant": True, "bytes_equal_lowbit_nf4": same}
            else:
                _note(f"{label}: quantizing {len(in_features)} projections")
                qm, qs = quantize_copy(fp, f, _fit_options(opts), calibration if "calibration" in opts else None)
            means, total, fwd = score(qm, windows, label)
            bits, qparams = quantized_bits(qm)
            finish(_row(label, f, opts, means, total, n_tokens, fwd, ref, bits, 8.0 * model_bytes(qm) / n_params,
                        qparams, qs), qm, t_row)
            del qm
            gc.collect()
        machine["torch_threads"] = torch.get_num_threads()

    if a.json:
        out = {"model": os.path.abspath(path), "text": text_src, "ctx": a.ctx, "windows": n_win,
               "scored_tokens": n_tokens, "machine": machine, "rows": rows}
        print(json.dumps(out, indent=2))
    else:
        print(machine_line(machine))
        print(f"model: {os.path.abspath(path)}; text: {text_src}; {n_win} window(s) x {a.ctx} tokens, "
              f"{n_tokens} scored tokens")
        print(format_table(rows))
        print("bits/w: quantized projections; bits/model: all weights and persistent buffers / parameters (a tied "
              "embedding once); dNLL: mean per-token NLL minus fp32's (nats), +-se over windows; better/worse: "
              "windows vs fp32; wall(s): quantize + forwards (+ generate) of the row")
        if a.generate is not None:
            print(f"\ngreedy samples ({max_new} new tokens) for {a.generate!r}:")
            for r in rows:
                print(f"[{r['label']}] {r['sample']!r}")
    return 0
