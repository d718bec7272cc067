"""Pieces the command-line bodies share: usage errors, thread scoping, progress bars, layer selection."""

from __future__ import annotations

import contextlib
import json
import os
import sys


class UsageError(Exception):
    """A bad command line or input: reported as one line on stderr, exit status 2."""


def read_config(model_dir) -> dict:
    """MODEL_DIR/config.json as a dict; UsageError (one line) when the folder has none, it cannot be read or it
    is not a JSON object. The one reader of every command (quantize, export, eval, finetune)."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"MODEL_DIR {os.fspath(model_dir)!r} is not a model folder (no config.json, which every "
                         "Hugging Face model folder has)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path!r}: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path!r} does not hold a JSON object")
    return config


@contextlib.contextmanager
def _threads(n: int | None):
    """torch.set_num_threads(n) for the block (None: leave torch's setting)."""
    import torch

    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _progress(it, total: int, desc: str):
    """tqdm over `it` on stderr when tqdm imports; the bare iterable otherwise."""
    try:
        from tqdm.auto import tqdm
    except Exception:
        return it
    return tqdm(it, total=total, desc=desc, unit="layer", leave=False, file=sys.stderr)


# --------------------------------------------------------------------------------------- demo


def linear_targets(model, skip=()):
    """(name, nn.Linear) pairs that replace_linear would swap (same selection rule)."""
    from torch import nn

    from lowbit.nn import skip_matches

    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not skip_matches(n, skip)]


def quantize_layers(model, quant_type: str, opts: dict, skip=(), desc: str | None = None):
    """replace_linear(model, quant_type, skip, **opts) with a tqdm bar; returns the model."""
    from lowbit.nn import layer_factory

    make = layer_factory(quant_type, dict(opts))
    targets = linear_targets(model, skip)
    for name, lin in _progress(targets, len(targets), desc or quant_type):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(lin))
    return model


