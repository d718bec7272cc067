"""bitsandbytes 4-bit folders, both ways, without bitsandbytes:

    from lowbit.integrations.bitsandbytes import from_pretrained_bnb, save_pretrained_bnb
    model = from_pretrained_bnb("llama-bnb-nf4")     # a transformers + bitsandbytes folder -> lowbit Linear4bit
    save_pretrained_bnb(model, "out-bnb")            # nf4/fp4 Linear4bit layers -> a folder bitsandbytes loads

The bytes are the same in both directions (lowbit's nf4/fp4 layout is bitsandbytes'; lowbit.formats.nf4
reads and writes its quant_state), so nothing is re-quantized. Only the 4-bit LUT family (nf4/fp4) has a
bitsandbytes form; other layers are refused by name. Moved out of integrations/transformers.py (the HF
quantizer), which still re-exports both names.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import transformers

from ..nn import Linear4bit, QuantLinear

__all__ = ["from_pretrained_bnb", "save_pretrained_bnb"]


def save_pretrained_bnb(model, out_dir) -> None:
    """Write `model` (a transformers model whose quantized layers are nf4/fp4 Linear4bit, from
    from_pretrained with LowbitConfig or from replace_linear) as a folder transformers + bitsandbytes
    load: config.json with a bitsandbytes `quantization_config` (quant_method "bitsandbytes", load_in_4bit)
    and model.safetensors in bitsandbytes' key names (`lowbit.to_bnb_state_dict`: the same bytes). Every
    nn.Linear left dense is listed in llm_int8_skip_modules. Raises ValueError naming a layer bitsandbytes
    cannot hold (int, SZ, "optimal"), or layers that disagree on quant_type / double quantization."""
    import copy

    from transformers import BitsAndBytesConfig

    from ..io import _plain_state_dict, _tied_names, save_safetensors, to_bnb_state_dict

    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise ValueError("lowbit: the model has no lowbit layer to export")
    for n, m in quant.items():
        if not isinstance(m, Linear4bit) or m.quant_type not in ("nf4", "fp4"):
            kind = getattr(m, "quant_type", type(m).__name__)
            raise ValueError(f"lowbit: layer {n!r} is {kind}; bitsandbytes 4-bit holds only nf4/fp4 Linear4bit")
    kinds = {(m.quant_type, m.double_quant) for m in quant.values()}
    if len(kinds) > 1:
        raise ValueError(f"lowbit: the layers mix {sorted(kinds)} (quant_type, double_quant); a bitsandbytes "
                         "config holds one")
    (qt, dq), = kinds
    dense = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    compute = {m.compute_dtype for m in quant.values()} - {None}
    config = copy.deepcopy(model.config)
    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq, llm_int8_skip_modules=dense,
        bnb_4bit_compute_dtype=compute.pop() if len(compute) == 1 else model.dtype)
    os.makedirs(out_dir, exist_ok=True)
    sd = to_bnb_state_dict(model)
    plain = _plain_state_dict(model)  # contiguous CPU copies, each tensor once (tied weights: transformers re-ties)
    tied = _tied_names(model, plain)
    sd = {k: plain[k] if k in plain else v.detach().contiguous().cpu() for k, v in sd.items() if k not in tied}
    save_safetensors(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})  # umask's mode
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)


def from_pretrained_bnb(model_dir, auto_class=None, **kwargs):
    """Load a folder written by transformers + bitsandbytes in 4 bits (config.json with
    `quant_method: bitsandbytes`, `load_in_4bit`, nf4/fp4) into lowbit Linear4bit layers, on any
    device and without bitsandbytes: the model is built from its config, every nn.Linear
    bitsandbytes quantized becomes a Linear4bit of the same format (quant_type and blocksize from the
    layer's own quant_state; the bytes are the same, so nothing is re-quantized), and the checkpoint's
    bnb keys load as they are. 4-bit weights stored in another dtype (`bnb_4bit_quant_storage`, e.g.
    bfloat16 for FSDP) are read as their bytes.

    auto_class: e.g. AutoModelForCausalLM (default: that class when config.architectures names a
    causal LM, else AutoModel). A checkpoint of a model with a head loads into its base model (the
    head's weights are dropped) and the other way round, as transformers' from_pretrained does.
    kwargs go to `auto_class.from_config`. Raises ValueError naming the key when the folder is not a
    4-bit bitsandbytes folder or does not fit the model."""
    import glob
    import json

    from safetensors.torch import load_file

    from ..formats.nf4 import read_bnb_quant_state

    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: not a Hugging Face model folder")
    with open(path) as f:
        qc = json.load(f).get("quantization_config") or {}
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise ValueError(f"{path}: quantization_config is not bitsandbytes 4-bit (quant_method="
                         f"{qc.get('quant_method')!r}, load_in_4bit={qc.get('load_in_4bit')!r})")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{path}: quantization_config.bnb_4bit_quant_type={quant_type!r}: lowbit reads nf4/fp4")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if auto_class is None:
        causal = any(str(a).endswith("ForCausalLM") for a in getattr(config, "architectures", None) or ())
        auto_class = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    files = sorted(glob.glob(os.path.join(os.fspath(model_dir), "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {os.fspath(model_dir)!r}")
    sd = {}
    for file in files:
        sd.update(load_file(file))
    # Built on the CPU, not on the meta device: non-persistent buffers (rotary frequencies, ...) are
    # not in the checkpoint and must be computed. Peak memory: the model in its config's dtype.
    model = auto_class.from_config(config, **kwargs)
    sd = _match_base_prefix(sd, model)
    # The Linear layers bitsandbytes quantized are exactly those whose weight has a bnb quant_state.
    quantized = {k.split(".weight.quant_state.")[0] for k in sd if ".weight.quant_state.bitsandbytes__" in k}
    compute = getattr(torch, str(qc.get("bnb_4bit_compute_dtype", "float32")).replace("torch.", ""), None)
    for name in sorted(quantized):
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if type(lin) is not nn.Linear:
            raise ValueError(f"{name}.weight.quant_state: {name!r} is not an nn.Linear in {type(model).__name__}")
        state = read_bnb_quant_state(sd, name + ".")
        if state["quant_type"] not in ("nf4", "fp4"):
            raise ValueError(f"{name}.weight.quant_state: quant_type={state['quant_type']!r}; lowbit reads nf4/fp4")
        codes = sd.get(name + ".weight")
        if isinstance(codes, torch.Tensor) and codes.dtype != torch.uint8:  # bnb_4bit_quant_storage != uint8
            sd[name + ".weight"] = codes.contiguous().view(torch.uint8)
        try:
            layer = Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                               quant_type=state["quant_type"], blocksize=int(state["blocksize"]),
                               double_quant=name + ".weight.nested_absmax" in sd,
                               compute_dtype=compute if isinstance(compute, torch.dtype) else None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}.weight.quant_state: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    result = model.load_state_dict(sd, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in sd if k in params}
    # A key the checkpoint lacks is fine only when it is tied to one it has (lm_head to the embedding).
    missing = [k for k in result.missing_keys if not (k in params and params[k].data_ptr() in loaded)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{os.fspath(model_dir)}: the checkpoint does not fit {type(model).__name__}: missing "
                         f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()


def _match_base_prefix(sd: dict, model: nn.Module) -> dict:
    """The checkpoint's keys as `model` names them, when one of them is the base model and the other
    has a head (transformers' rule): drop `<base_model_prefix>.` and the head's keys, or add it."""
    bmp = getattr(model, "base_model_prefix", "") or ""
    if not bmp:
        return sd
    mine = set(model.state_dict())
    lead = bmp + "."
    model_has = any(k.startswith(lead) for k in mine)
    ckpt_has = any(k.startswith(lead) for k in sd)
    if ckpt_has and not model_has:
        return {k[len(lead):]: v for k, v in sd.items() if k.startswith(lead)}
    if model_has and not ckpt_has:
        return {lead + k: v for k, v in sd.items()}
    return sd
