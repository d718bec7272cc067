"""`lowbit tune-scales QUANTIZED_DIR --text FILE --out DIR`: PEQA as a command.

The seed's recipe: "integer quantize the rows/columns of the weight matrices and then only tune the quantization
scales". A folder written by `lowbit quantize --format int2/int3/int4` holds frozen integer codes Q, zero points
z and one fp32 scale s per row group (W = s * (Q - z)); only s is trained here, everything else (codes, zero
points, embeddings, norms, lm_head, biases) stays as it is, so the tuned folder has the same bytes per
parameter and the same kernels.

Objective: distil the unquantized model it came from (the "teacher": `--teacher`, default the source folder
recorded in lowbit.json) on the text's next-token distributions,
    KL(p_teacher || p_student)  averaged over tokens,
with the teacher's logits computed per batch (streamed, nothing cached). Adam on the scales, a 5-step warm-up.
Held-out perplexity (of `--eval-text`, else the last windows of --text, never trained on) is shown on the
progress bar before, every --eval-every steps and after.

The output is a complete quantized folder (config.json, model.safetensors with checksums, lowbit.json, tokenizer
files) that `lowbit eval`, `lowbit.load_quantized` and transformers with lowbit's integration read like the
input. The input folder is never written: --out must be another path, and an existing non-empty --out needs
--force.

Scope: the int family only. The 4-bit LUT family's block absmax is not tuned (in bitsandbytes' layout it is a
uint8 code with double quantization; see docs/int.md for what was measured).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

from ._tools import UsageError, read_config

INT_FORMATS = ("int2", "int3", "int4")


def _check_paths(a) -> tuple[str, dict, str, dict, str]:
    """(quantized dir, its config.json, teacher dir, manifest, out dir), every check that needs no model."""
    from .io import read_manifest

    src = os.fspath(a.quantized_dir)
    config = read_config(src)
    try:
        manifest = read_manifest(src)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"QUANTIZED_DIR: {e}") from None
    fmt = manifest["format"]
    if fmt not in INT_FORMATS:
        raise UsageError(f"QUANTIZED_DIR {src!r} holds format {fmt!r}; tune-scales tunes the scales of the int "
                         f"family ({', '.join(INT_FORMATS)}): quantize with lowbit quantize --format int3")
    teacher = a.teacher or manifest.get("source")
    if not teacher:
        raise UsageError(f"{src!r}/lowbit.json records no source model: pass --teacher MODEL_DIR (the unquantized "
                         "model the folder was made from)")
    if not os.path.isdir(teacher):
        raise UsageError(f"the teacher folder {teacher!r} does not exist (pass --teacher MODEL_DIR, the "
                         "unquantized model the folder was made from)")
    read_config(teacher)
    for name, path in (("--text", a.text), ("--eval-text", a.eval_text)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{name}: no text file {path!r}")
    out = os.fspath(a.out)
    if os.path.realpath(out) == os.path.realpath(src):
        raise UsageError("--out must not be QUANTIZED_DIR: tune-scales never overwrites its input folder")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out!r} exists and is not a folder")
        if os.listdir(out) and not a.force:
            raise UsageError(f"--out {out!r} exists and is not empty; pass --force to write into it")
    return src, config, teacher, manifest, out


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def kl_to_teacher(student_logits, teacher_logits):
    """Mean over tokens of KL(softmax(teacher) || softmax(student)), in fp32."""
    import torch

    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def heldout_ppl(model, windows) -> float:
    """exp(mean next-token NLL) over [W, ctx] windows."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            n += w.numel() - 1
    return math.exp(total / n)


def scale_parameters(model) -> list:
    """Freeze `model` and return the IntLinear scales, set trainable (PEQA's only parameters)."""
    from .nn import IntLinear

    model.requires_grad_(False)
    scales = [m.scale for m in model.modules() if isinstance(m, IntLinear)]
    for s in scales:
        s.requires_grad_(True)
    return scales


def tune(student, teacher, train, heldout, *, steps: int, lr: float, batch: int, eval_every: int, seed: int = 0,
         progress: bool = True) -> dict:
    """Train `student`'s int scales to `teacher`'s next-token distributions on `train` ([N, ctx] ids);
    returns the KL per step, the held-out perplexity before/after (and at every eval) and the number of
    layers tuned."""
    import torch

    scales = scale_parameters(student)
    if not scales:
        raise ValueError("the model has no IntLinear layer: nothing to tune")
    teacher.eval()
    opt = torch.optim.Adam(scales, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    gen = torch.Generator().manual_seed(seed)
    student.eval()  # no dropout: the student must match the teacher's eval-mode distributions
    ppl = [(0, heldout_ppl(student, heldout))]
    kls = []
    bar = range(steps)
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc="tune-scales", unit="step", file=sys.stderr)
        except ImportError:
            pass
    for step in bar:
        idx = torch.randint(0, train.shape[0], (batch,), generator=gen)
        x = train[idx]
        with torch.no_grad():
            t_logits = teacher(input_ids=x, use_cache=False).logits
        loss = kl_to_teacher(student(input_ids=x, use_cache=False).logits, t_logits)
        if not torch.isfinite(loss):
            raise ValueError(f"the KL became {float(loss)} at step {step}; try a smaller --lr")
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        kls.append(float(loss.detach()))
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            ppl.append((step + 1, heldout_ppl(student, heldout)))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(kl=f"{kls[-1]:.4f}", heldout_ppl=f"{ppl[-1][1]:.2f}")
    ppl.append((steps, heldout_ppl(student, heldout)))
    for s in scales:
        s.requires_grad_(False)
    return {"kl": kls, "heldout_ppl": ppl, "layers": len(scales)}


def _tune_scales(a) -> int:
    """The CLI body (argparse namespace: quantized_dir, text, out, teacher, eval_text, steps, lr, ctx, batch,
    eval_windows, eval_every, force)."""
    src, config, teacher_dir, manifest, out = _check_paths(a)
    text = _read(a.text, "--text")
    eval_text = _read(a.eval_text, "--eval-text") if a.eval_text else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ._eval import _load_fp_model, _load_quantized_folder
    from ._finetune import tokens
    from ._quantize import _TOKENIZER_FILES, _write_folder
    from .io import write_manifest

    t0 = time.perf_counter()
    student = _load_quantized_folder(src)
    teacher = _load_fp_model(teacher_dir)
    vocab = student.config.vocab_size
    if teacher.config.vocab_size != vocab:
        raise UsageError(f"the teacher {teacher_dir!r} has {teacher.config.vocab_size} tokens in its vocabulary, the "
                         f"quantized model {vocab}: it is not the model the folder was made from")
    ids = tokens(src, text, vocab)  # the folder's tokenizer (UTF-8 bytes for a folder without one)
    n = ids.numel() // a.ctx
    if eval_text is None:
        held = max(1, min(a.eval_windows, n // 10))
        if n - held < 1:
            raise UsageError(f"--text has {ids.numel()} tokens: it needs at least 2 windows of --ctx {a.ctx} "
                             "(one to train, one held out)")
        train = ids[: (n - held) * a.ctx].view(-1, a.ctx)
        heldout = ids[(n - held) * a.ctx: n * a.ctx].view(-1, a.ctx)
    else:
        if n < 1:
            raise UsageError(f"--text has {ids.numel()} tokens, fewer than one window of --ctx {a.ctx}")
        train = ids[: n * a.ctx].view(-1, a.ctx)
        eids = tokens(src, eval_text, vocab)
        ne = min(a.eval_windows, eids.numel() // a.ctx)
        if ne < 1:
            raise UsageError(f"--eval-text has {eids.numel()} tokens, fewer than one window of --ctx {a.ctx}")
        heldout = eids[: ne * a.ctx].view(-1, a.ctx)
    try:
        res = tune(student, teacher, train, heldout, steps=a.steps, lr=a.lr, batch=a.batch,
                   eval_every=a.eval_every)
    except ValueError as e:
        raise UsageError(str(e)) from None
    os.makedirs(out, exist_ok=True)
    config.pop("quantization_config", None)
    opts, skip = manifest.get("options", {}), manifest.get("skip", [])
    _write_folder(student, config, out, manifest["format"], opts, skip)
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    extra = {k: v for k, v in manifest.items() if k not in ("manifest_version", "format", "options", "skip",
                                                             "lowbit_version")}
    extra["tuned_scales"] = {"from": os.path.abspath(src), "teacher": os.path.abspath(teacher_dir),
                             "steps": a.steps, "lr": a.lr, "ctx": a.ctx, "batch": a.batch,
                             "heldout_ppl_before": res["heldout_ppl"][0][1],
                             "heldout_ppl_after": res["heldout_ppl"][-1][1]}
    write_manifest(out, manifest["format"], opts, skip, **extra)
    before, after = res["heldout_ppl"][0][1], res["heldout_ppl"][-1][1]
    print(f"tuned the scales of {res['layers']} layers in {a.steps} steps "
          f"({time.perf_counter() - t0:.0f} s): held-out perplexity {before:.2f} -> {after:.2f} "
          f"({heldout.shape[0]} windows of {a.ctx}); KL {res['kl'][0]:.4f} -> {res['kl'][-1]:.4f}; wrote {out}")
    return 0 if math.isfinite(after) else 1


def add_arguments(p) -> None:
    from ._quantize import _positive_float, _positive_int

    p.add_argument("quantized_dir", metavar="QUANTIZED_DIR", help="a folder written by lowbit quantize --format "
                   "int2/int3/int4")
    p.add_argument("--text", required=True, help="UTF-8 training text (e.g. calibration articles)")
    p.add_argument("--out", required=True, help="the tuned folder to write (never QUANTIZED_DIR)")
    p.add_argument("--teacher", default=None, help="the unquantized model folder (default: lowbit.json's source)")
    p.add_argument("--eval-text", default=None, help="held-out text for the perplexity on the progress bar "
                   "(default: the last windows of --text, not trained on)")
    p.add_argument("--steps", type=_positive_int, default=40)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--ctx", type=_positive_int, default=256, help="tokens per training window")
    p.add_argument("--batch", type=_positive_int, default=2)
    p.add_argument("--eval-windows", type=_positive_int, default=4)
    p.add_argument("--eval-every", type=int, default=10, help="held-out perplexity every N steps (0: only "
                   "before and after)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
