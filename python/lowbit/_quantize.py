"""`lowbit quantize`: a Hugging Face model folder to a lowbit checkpoint folder."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import time

from ._tools import UsageError, linear_targets, read_config
from .nn import FAMILIES, REQUIRED, QuantLinear, all_options, check_options, family_of, quant_types

FORMATS = quant_types()  # every registered family's (lowbit.nn.family)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s!r}")
    return v


def add_format_arguments(p) -> None:
    """Every registered family's command-line options (lowbit.nn.family.Option.flag), one flag per option
    name: `lowbit quantize` takes them for any --format, and quantize_options checks which apply."""
    for o in all_options():
        if not o.flag:
            continue
        users = [q for f in FAMILIES.values() for q in f.quant_types if o.name in f.option_names(q)]
        help_ = f"{'/'.join(users)}: {o.help}" + (f" (default {o.default})" if o.default not in (None, REQUIRED)
                                                  and not o.cli_action else "")
        if o.cli_action:
            p.add_argument(o.flag, dest=o.name, action=o.cli_action, default=None, help=help_)
        else:
            typ = {int: _positive_int, float: _positive_float}.get(o.cli_type, o.cli_type)
            p.add_argument(o.flag, dest=o.name, type=typ, default=None, choices=o.choices or None,
                           help=help_ + (" (required)" if o.default is REQUIRED else ""))


def quantize_options(a) -> dict:
    """The replace_linear options for the parsed `lowbit quantize` arguments: every command-line option of
    a.format's family, given or its default (UsageError when an option does not apply to the format, a
    required one is missing, or the family's layer refuses a value)."""
    fmt = a.format
    fam = family_of(fmt)
    mine = {o.name: o for o in fam.options if o.flag and o.name in fam.option_names(fmt)}
    given = {o.name: getattr(a, o.name) for o in all_options() if o.flag and getattr(a, o.name, None) is not None}
    bad = [o.flag for o in all_options() if o.name in given and o.name not in mine]
    if bad:
        flags = sorted(o.flag for o in mine.values())
        raise UsageError(f"{', '.join(bad)} does not apply to --format {fmt} (it takes: {', '.join(flags) or 'none'})")
    missing = [o.flag for o in mine.values() if o.default is REQUIRED and o.name not in given]
    if missing:
        helps = "; ".join(o.help for o in mine.values() if o.flag in missing)
        raise UsageError(f"--format {fmt} needs {' '.join(missing)} X ({helps})")
    opts = {name: given.get(name, o.default) for name, o in mine.items()}
    try:  # the family's own checks of the values
        check_options(fmt, opts)
    except (TypeError, ValueError) as e:
        flag = next((o.flag for o in mine.values() if o.name in str(e).split(" ")[0]), None)
        raise UsageError(f"{flag or '--format ' + fmt}: {e}") from None
    return opts


_MAX_POSITIONS_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def max_positions(config: dict) -> int | None:
    """The model's context limit from config.json (the text config of a multimodal one), None if unstated."""
    for c in (config, config.get("text_config") or {}):
        for k in _MAX_POSITIONS_KEYS:
            v = c.get(k) if isinstance(c, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


DEFAULT_CALIBRATION_WINDOWS = 16
DEFAULT_CALIBRATION_CTX = 512


def add_calibration_arguments(p) -> None:
    """--calibration FILE [--calibration-windows N] [--calibration-ctx N] (lowbit quantize and lowbit eval)."""
    p.add_argument("--calibration", default=None, metavar="TEXTFILE",
                   help="a UTF-8 text: one forward pass over its first windows measures each projection's input "
                        "second moments, and the formats that take calibration (optimal, sz) fit to the layers' "
                        "output error on it (docs/formats.md)")
    p.add_argument("--calibration-windows", type=_positive_int, default=None, metavar="N",
                   help=f"--calibration: windows of the text used (default {DEFAULT_CALIBRATION_WINDOWS})")
    p.add_argument("--calibration-ctx", type=_positive_int, default=None, metavar="N",
                   help=f"--calibration: tokens per window (default {DEFAULT_CALIBRATION_CTX})")


def check_calibration_arguments(a, formats) -> str | None:
    """UsageError for a calibration flag that does not apply; returns the calibration text (None without
    --calibration). `formats`: the formats of the command; at least one must take calibration."""
    from lowbit.nn import quant_types, takes_calibration

    if a.calibration is None:
        if a.calibration_windows is not None or a.calibration_ctx is not None:
            raise UsageError("--calibration-windows / --calibration-ctx apply to --calibration TEXTFILE")
        return None
    takers = [q for q in quant_types() if takes_calibration(q)]
    if not any(f in takers for f in formats):
        fmts = ", ".join(formats)
        raise UsageError(f"--format {fmts} does not take calibration (--calibration applies to --format "
                         f"{', '.join(takers)})")
    path = a.calibration
    if not os.path.isfile(path):
        raise UsageError(f"--calibration {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"--calibration {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read --calibration {path!r}: {e.strerror or e}") from None
    if not text.strip():
        raise UsageError(f"--calibration {path!r} is empty")
    return text


def calibration_moments(model, tokenizer, text: str, a, skip, max_positions=None):
    """({Linear name: h}, info) from one forward pass of `model` over the first --calibration-windows windows of
    --calibration-ctx tokens of `text` (lowbit.calibration); UsageError for a text too short, a context past
    the model's, ids outside its vocabulary or activations that are not finite."""
    import torch

    from lowbit.calibration import calibration_windows, input_second_moments

    ctx = a.calibration_ctx or DEFAULT_CALIBRATION_CTX
    n = a.calibration_windows or DEFAULT_CALIBRATION_WINDOWS
    if max_positions is not None and ctx > max_positions:
        raise UsageError(f"--calibration-ctx {ctx} exceeds the model's context of {max_positions} tokens")
    with contextlib.redirect_stdout(sys.stderr), _quiet_transformers():
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    t0 = time.perf_counter()
    try:
        windows = calibration_windows(ids, ctx, n)
        with torch.no_grad():
            moments = input_second_moments(model, windows, skip=skip)
    except ValueError as e:
        raise UsageError(f"--calibration {a.calibration!r}: {e}") from None
    info = {"text": os.path.abspath(a.calibration), "windows": n, "ctx": ctx,
            "seconds": round(time.perf_counter() - t0, 2)}
    return moments, info


def _source_quantization(src: str, config: dict):
    """config.json's quantization_config when MODEL_DIR is a bitsandbytes 4-bit folder (None for a
    full-precision one); UsageError for a folder lowbit quantize cannot read."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if method == "lowbit":
        raise UsageError(f"MODEL_DIR {src!r} is already a lowbit model (quant_method 'lowbit', saved with "
                         "LowbitConfig); lowbit quantize reads full-precision and bitsandbytes 4-bit folders: load it "
                         "with lowbit.integrations.transformers instead (docs/integrations.md)")
    if method == "bitsandbytes" or qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        if qc.get("load_in_8bit") or not qc.get("load_in_4bit"):
            raise UsageError(f"MODEL_DIR {src!r} is a bitsandbytes 8-bit folder (load_in_8bit); lowbit quantize reads "
                             "bitsandbytes 4-bit (nf4/fp4) folders")
        qt = qc.get("bnb_4bit_quant_type", "fp4")
        if qt not in ("nf4", "fp4"):
            raise UsageError(f"MODEL_DIR {src!r}: quantization_config.bnb_4bit_quant_type={qt!r}; lowbit reads nf4/fp4")
        return qc
    return None


def _from_bnb_layers(model, a, opts: dict, skip, src: str, qc: dict) -> dict:
    """The Linear4bit layers read from a bitsandbytes folder, made ready for replace_linear: kept as
    they are (the same bytes) when --format is their quant_type with their blocksize and double
    quantization (adopted from the folder unless --blocksize / --no-double-quant say otherwise);
    else turned back into nn.Linear holding their dequantized weight, to be re-quantized, with a
    warning. A layer named by --skip becomes nn.Linear with its dequantized weight. Returns the
    options the kept and new layers share (written to lowbit.json)."""
    import torch
    from torch import nn

    from lowbit import Linear4bit
    from lowbit.nn import skip_matches

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    fmt = a.format
    opts = dict(opts)
    same = [m for _, m in layers if m.quant_type == fmt]
    if fmt in ("nf4", "fp4") and same:
        if a.blocksize is None and len({m.blocksize for m in same}) == 1:
            opts["blocksize"] = same[0].blocksize
        if a.double_quant is None and len({m.double_quant for m in same}) == 1:
            opts["double_quant"] = same[0].double_quant

    def skipped(n):
        return skip_matches(n, skip)

    requantized, dense = [], []
    for name, layer in layers:
        if skipped(name):
            dense.append(name)
        elif (fmt in ("nf4", "fp4") and layer.quant_type == fmt and layer.blocksize == opts["blocksize"]
              and layer.double_quant == opts["double_quant"]):
            continue
        else:
            requantized.append(name)
        with torch.no_grad():
            w = layer.dequantized_weight(layer.weight_dtype)
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if layer.bias is not None:
            lin.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    qt = qc.get("bnb_4bit_quant_type", "fp4")
    if requantized:
        why = (f"--format {fmt} differs from the folder's {qt}" if fmt != qt else
               "--blocksize / --no-double-quant differ from the folder's")
        print(f"lowbit: warning: {src!r} is a bitsandbytes {qt} folder and {why}: {len(requantized)} layer(s) are "
              f"dequantized and re-quantized to {fmt} (their error adds to the {qt} error); "
              f"--format {qt} keeps the bitsandbytes bytes as they are", file=sys.stderr)
    if dense:
        print(f"lowbit: warning: --skip keeps {len(dense)} bitsandbytes {qt} layer(s) dense as their dequantized "
              f"weights ({', '.join(dense[:3])}{' ...' if len(dense) > 3 else ''})", file=sys.stderr)
    return opts


@contextlib.contextmanager
def _quiet_transformers():
    """No 'Loading weights' bar or warnings from transformers (so that an error stays one line)."""
    try:
        from transformers.utils import logging as tlog
    except Exception:
        yield
        return
    bar = tlog.is_progress_bar_enabled()
    level = tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


def _write_folder(model, config: dict, out: str, fmt: str, opts: dict, skip) -> None:
    """OUT_DIR as transformers' save_pretrained with a LowbitConfig writes it, so that one folder serves
    load_quantized, `lowbit eval` and AutoModel*.from_pretrained(OUT_DIR) (after `import
    lowbit.integrations.transformers`): config.json = the source's config + quantization_config (and the
    field that stops a transformers without lowbit's integration), model.safetensors = the state dict with
    lowbit's checksums and, for int/SZ layers, the empty uint8 `<layer>.weight` markers save_pretrained writes."""
    import json

    import torch

    from lowbit.integrations.transformers import _HINT_FIELD, LOAD_HINT, LowbitConfig
    from lowbit.io import WEIGHTS, _plain_state_dict, _write_state_dict

    sd = _plain_state_dict(model)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear) and not layer.STORES_WEIGHT:
            sd[f"{name}.weight"] = torch.zeros(0, dtype=torch.uint8)
    _write_state_dict(model, sd, os.path.join(out, WEIGHTS))
    config = dict(config)  # the source's; a bitsandbytes source's quantization_config goes: the layers are lowbit's
    config["quantization_config"] = LowbitConfig(fmt, modules_to_not_convert=list(skip), **opts).to_dict()
    config[_HINT_FIELD] = LOAD_HINT
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def architecture_class(config: dict):
    """The transformers class a config.json's `architectures` names (a causal LM keeps its head: the folder
    holds `model.`-prefixed keys and lm_head, and tied embeddings stay tied), else AutoModel. `lowbit
    quantize` used AutoModel for every folder, which dropped a causal LM's head."""
    import transformers

    for arch in config.get("architectures") or ():
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoModel


def _quantize(a) -> int:
    src, out = os.fspath(a.model_dir), os.fspath(a.out_dir)
    if not os.path.exists(src):
        raise UsageError(f"MODEL_DIR {src!r} does not exist")
    if not os.path.isdir(src):
        raise UsageError(f"MODEL_DIR {src!r} is not a directory")
    config = read_config(src)
    opts = quantize_options(a)
    cal_text = check_calibration_arguments(a, [a.format])
    source_qc = _source_quantization(src, config)
    explicit = a.skip is not None
    requested = tuple(s.strip() for s in (a.skip if explicit else "lm_head").split(",") if s.strip())
    skip = requested
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"OUT_DIR {out!r} exists and is not a directory")
        if not a.force:
            raise UsageError(f"OUT_DIR {out!r} exists; pass --force to overwrite it")
    if os.path.realpath(out) == os.path.realpath(src):
        raise UsageError("OUT_DIR must not be MODEL_DIR (it would overwrite the source model)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch import nn

    import lowbit
    from lowbit.io import WEIGHTS, write_manifest
    from lowbit.nn import skip_matches

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("lowbit quantize needs transformers (pip install transformers)") from None
    t0 = time.perf_counter()
    model_class = architecture_class(config)
    try:
        with contextlib.redirect_stdout(sys.stderr), _quiet_transformers():
            if source_qc is not None:  # bitsandbytes 4-bit: its bytes, into lowbit Linear4bit layers
                from lowbit.integrations.bitsandbytes import from_pretrained_bnb

                model = from_pretrained_bnb(src)  # picks AutoModelForCausalLM from `architectures` too
            else:
                model = model_class.from_pretrained(src, local_files_only=True).eval()
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load a model from {src!r}: {msg}") from None
    if source_qc is not None:
        opts = _from_bnb_layers(model, a, opts, skip, src, source_qc)
    # Resolve --skip to the full names of the Linear layers to leave dense (replace_linear's rule,
    # lowbit.nn.skip_matches: "pooler" -> "pooler.dense").
    dense_names = [n for n, m in model.named_modules() if type(m) is nn.Linear and skip_matches(n, skip)]
    names = [n for n, _ in model.named_modules()]
    for s_ in requested if explicit else ():
        if not any(skip_matches(n, (s_,)) for n in names):
            print(f"lowbit: warning: --skip {s_!r} matches no module of the model", file=sys.stderr)
    skip = tuple(dense_names)
    targets = linear_targets(model, skip)
    kept = [(n, m) for n, m in model.named_modules() if isinstance(m, lowbit.Linear4bit)]  # bnb bytes, kept
    if not targets and not kept:
        raise UsageError(f"the model in {src!r} has no nn.Linear layer to quantize (after --skip)")
    n_params = sum(lin.weight.numel() for _, lin in targets) + sum(m.in_features * m.out_features for _, m in kept)
    calibration, cal_info = None, None
    if cal_text is not None:
        try:
            with contextlib.redirect_stdout(sys.stderr), _quiet_transformers():
                tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is the folder's
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--calibration needs the tokenizer of {src!r}: {msg}") from None
        calibration, cal_info = calibration_moments(model, tok, cal_text, a, skip, max_positions(config))
        print(f"lowbit: calibration: {cal_info['windows']} x {cal_info['ctx']} tokens of {a.calibration} in "
              f"{cal_info['seconds']:.1f} s", file=sys.stderr)
    try:
        with torch.no_grad():
            lowbit.replace_linear(model, a.format, skip=skip, progress=True, calibration=calibration,
                                  **opts)  # one line per layer on stderr
    except (ValueError, TypeError) as e:
        raise UsageError(f"cannot quantize with --format {a.format}: {e}") from None
    bits = sum(m.bits_per_param * m.in_features * m.out_features for m in model.modules()
               if type(m) is not nn.Linear and hasattr(m, "bits_per_param") and hasattr(m, "in_features"))
    os.makedirs(out, exist_ok=True)
    _write_folder(model, config, out, a.format, opts, skip)
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    write_manifest(out, a.format, opts, skip, skip_requested=list(requested), source=os.path.abspath(src),
                   model_class=type(model).__name__, quantized_layers=len(targets) + len(kept),
                   quantized_params=n_params,
                   bits_per_param=bits / n_params, **({"calibration": cal_info} if cal_info else {}))
    size = os.path.getsize(os.path.join(out, WEIGHTS))
    from_bnb = f" ({len(kept)} kept as read from bitsandbytes)" if kept else ""
    print(f"quantized {len(targets) + len(kept)} Linear layers{from_bnb} ({n_params / 1e6:.2f}M params) to {a.format} "
          f"at {bits / n_params:.3f} bits/param in {time.perf_counter() - t0:.1f} s; "
          f"wrote {out}/{WEIGHTS} ({size / 1e6:.2f} MB), lowbit.json, config.json")
    return 0


# -------------------------------------------------------------------------------------- bench


