"""lowbit.optim.OffloadedAdamW against torch.optim.AdamW (bit for bit on CPU), and gradient
checkpointing through lowbit layers.

On a CPU-only machine OffloadedAdamW's default is torch.optim.AdamW itself; offload=True runs the
offload bookkeeping (host copies, gradient hooks, re-copy of gradients changed after the hook,
state on the host, load_state_dict against the host copies) on CPU tensors, with synchronous
copies in place of the CUDA side stream. The stream/event code needs a GPU (tests/test_gpu.py
territory; see docs/training.md).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit import Linear4bit, LoRALinear
from lowbit.optim import OffloadedAdamW

STEPS = 10


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: a second intra-op thread only spins against the other jobs on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    m[2].weight.requires_grad_(False)  # frozen parameters mixed in (one with a trainable bias)
    m[4].bias.requires_grad_(False)
    return m


def _batches(n: int = STEPS, micro: int = 2):
    g = torch.Generator().manual_seed(1)
    return [[(torch.randn(5, 24, generator=g), torch.randn(5, 8, generator=g)) for _ in range(micro)]
            for _ in range(n)]


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * 0.9 ** s)


def _train(model, opt, sched, batches, clip=None, opt_clips=False):
    losses = []
    for micro in batches:
        for x, y in micro:  # gradient accumulation over micro-batches
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            losses.append(loss.detach())
        if clip is not None:
            if opt_clips:
                opt.clip_grad_norm_(clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses


def _params_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs"


# (OffloadedAdamW options, the torch.optim.AdamW options it must equal bit for bit)
CASES = {
    "default-is-adamw": (dict(), dict()),
    "offload-fused": (dict(offload=True), dict(fused=True)),
    "offload-foreach": (dict(offload=True, foreach=True), dict(foreach=True)),
    "offload-single-tensor-amsgrad": (dict(offload=True, foreach=False, amsgrad=True),
                                      dict(foreach=False, amsgrad=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bit_equal_to_adamw_with_schedule_clipping_frozen_params(case):
    ours_kw, ref_kw = CASES[case]
    ref, ours = _model(), _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-2, weight_decay=0.1, **ref_kw)
    opt = OffloadedAdamW(ours.parameters(), lr=3e-2, weight_decay=0.1, **ours_kw)
    assert isinstance(opt, torch.optim.Optimizer)
    ref_sched, sched = _schedule(ref_opt), _schedule(opt)
    batches = _batches()
    frozen = ours[2].weight.clone()
    ref_losses = _train(ref, ref_opt, ref_sched, batches, clip=0.2)
    losses = _train(ours, opt, sched, batches, clip=0.2)
    assert [float(x) for x in losses] == [float(x) for x in ref_losses]
    _params_equal(ours, ref)
    assert torch.equal(ours[2].weight, frozen)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert set(opt.state) == set(trainable)  # frozen parameters: no state
    if ours_kw.get("offload"):
        assert set(opt._host) == set(trainable)  # ... and no host copy
        for p in trainable:
            assert all(t.device.type == "cpu" for t in opt.state[p].values())
    else:
        assert not opt._host


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_continues_identically(case):
    ours_kw, _ = CASES[case]
    batches = _batches()
    straight = _model()
    opt = OffloadedAdamW(straight.parameters(), lr=3e-2, **ours_kw)
    sched = _schedule(opt)
    _train(straight, opt, sched, batches, clip=0.2)

    first = _model()
    opt1 = OffloadedAdamW(first.parameters(), lr=3e-2, **ours_kw)
    sched1 = _schedule(opt1)
    _train(first, opt1, sched1, batches[:4], clip=0.2)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)

    resumed = _model(seed=123)  # different starting weights: everything must come from the checkpoint
    resumed.load_state_dict(ck["model"])
    opt2 = OffloadedAdamW(resumed.parameters(), lr=3e-2, **ours_kw)
    sched2 = _schedule(opt2)
    sched2.load_state_dict(ck["sched"])
    opt2.load_state_dict(ck["opt"])
    _train(resumed, opt2, sched2, batches[4:], clip=0.2)
    _params_equal(resumed, straight)
    for p in (p for p in resumed.parameters() if p.requires_grad):
        assert all(t.device.type == "cpu" for t in opt2.state[p].values())


def test_checkpoints_move_between_adamw_and_offloaded_adamw():
    batches = _batches(6)
    a = _model()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)
    _train(a, opt_a, _schedule(opt_a), batches[:3])
    b = copy.deepcopy(a)
    opt_b = OffloadedAdamW(b.parameters(), lr=1e-2, offload=True)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for micro in batches[3:]:
        for m, o in ((a, opt_a), (b, opt_b)):
            for x, y in micro:
                nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
    _params_equal(b, a)
    back = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)
    back.load_state_dict(copy.deepcopy(opt_b.state_dict()))  # and the other way
    for p, q in zip(a.parameters(), b.parameters()):
        if p.requires_grad:
            assert torch.equal(back.state[p]["exp_avg_sq"], opt_b.state[q]["exp_avg_sq"])


def test_offload_gradients_frees_device_grads_and_clips_through_the_optimizer():
    ref, ours = _model(), _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-2, fused=True)
    opt = OffloadedAdamW(ours.parameters(), lr=3e-2, offload=True, offload_gradients=True)
    batches = _batches(STEPS, micro=1)  # no accumulation across micro-batches in this mode
    x, y = batches[0][0]
    nn.functional.mse_loss(ours(x), y).backward()
    assert all(p.grad is None for p in ours.parameters())  # gone in the hook
    opt.zero_grad()
    _train(ref, ref_opt, _schedule(ref_opt), batches, clip=0.2)
    _train(ours, opt, _schedule(opt), batches, clip=0.2, opt_clips=True)
    _params_equal(ours, ref)


def test_offload_gradients_refuses_accumulation():
    m = _model()
    opt = OffloadedAdamW(m.parameters(), offload=True, offload_gradients=True)
    x, y = _batches(1)[0][0]
    nn.functional.mse_loss(m(x), y).backward()
    with pytest.raises(RuntimeError, match="offload_gradients=False"):
        nn.functional.mse_loss(m(x), y).backward()
    opt.zero_grad()
    nn.functional.mse_loss(m(x), y).backward()  # fine again after zero_grad (or step)


def test_zero_grad_without_step_drops_the_copied_gradients():
    m = _model()
    before = [p.clone() for p in m.parameters()]
    opt = OffloadedAdamW(m.parameters(), lr=1e-2, offload=True)
    x, y = _batches(1)[0][0]
    nn.functional.mse_loss(m(x), y).backward()
    opt.zero_grad()
    opt.step()  # nothing to do: no gradients
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q)


def test_grad_scaler_and_closure_as_with_adamw():
    out = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
                 lambda ps: OffloadedAdamW(ps, lr=1e-2, offload=True)):
        m = _model()
        opt = make(m.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for micro in _batches(5):
            for x, y in micro:
                scaler.scale(nn.functional.mse_loss(m(x), y)).backward()
            scaler.unscale_(opt)  # changes the gradients after the hooks copied them
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.2)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        x, y = _batches(1)[0][0]

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        out.append((opt.step(closure), [p.detach().clone() for p in m.parameters()]))
    (ref_loss, ref_params), (loss, params) = out
    assert torch.equal(loss, ref_loss)
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


def test_rejects_bad_options():
    with pytest.raises(TypeError, match="offload"):
        OffloadedAdamW(_model().parameters(), offload="yes")
    with pytest.raises(TypeError, match="offload_gradients"):
        OffloadedAdamW(_model().parameters(), offload_gradients=1)


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing through lowbit layers
# ----------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = LoRALinear(Linear4bit.from_linear(nn.Linear(d, 2 * d)), r=4)
        self.down = LoRALinear(Linear4bit.from_linear(nn.Linear(2 * d, d), quant_type="fp4"), r=4)
        for lora in (self.up, self.down):
            nn.init.normal_(lora.lora_B, std=0.1)  # B = 0 would make the A gradients zero

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


def _lora_grads(model, x, ckpt: bool):
    model.zero_grad()
    h = x
    for block in model:
        h = checkpoint(block, h, use_reentrant=False) if ckpt else block(h)
    h.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_grads():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(64), _Block(64))
    x = torch.randn(3, 7, 64)
    plain = _lora_grads(model, x, ckpt=False)
    ckpt = _lora_grads(model, x, ckpt=True)
    assert plain.keys() == ckpt.keys() and len(plain) == 8
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n


def test_hf_gradient_checkpointing_enable_through_lowbit_layers():
    transformers = pytest.importorskip("transformers")
    from lowbit import replace_linear

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    replace_linear(model, "nf4")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Linear4bit):
            parent, _, child = name.rpartition(".")
            lora = LoRALinear(mod, r=4)
            nn.init.normal_(lora.lora_B, std=0.05)
            setattr(model.get_submodule(parent), child, lora)
    model.train()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))

    calls = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *a: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, n_plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt, n_ckpt = grads()
    assert (n_plain, n_ckpt) == (1, 2)  # the layer ran again in the backward: checkpointing is on
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 7 * 2
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=0, msg=n)


# Every hyperparameter at a non-default value: the cases above compare only default betas, eps and
# amsgrad, so an optimizer that hard-coded beta2 = 0.999 (or ignored eps, amsgrad or maximize) matched
# torch bit for bit. Each option here changes the trajectory (checked below against AdamW at its default).
OPTIONS = [
    dict(betas=(0.8, 0.95), eps=1e-4, weight_decay=0.25, amsgrad=False),
    dict(betas=(0.7, 0.9), eps=1e-3, weight_decay=0.0, amsgrad=True),
    dict(betas=(0.95, 0.98), eps=1e-6, weight_decay=0.05, amsgrad=True, maximize=True),
]
MODES = {"default": (dict(), dict()), "offload-fused": (dict(offload=True), dict(fused=True)),
         "offload-foreach": (dict(offload=True, foreach=True), dict(foreach=True)),
         "offload-single": (dict(offload=True, foreach=False), dict(foreach=False))}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("opts", OPTIONS, ids=["betas-eps-wd", "amsgrad", "maximize"])
def test_bit_equal_to_adamw_at_non_default_hyperparameters(mode, opts):
    ours_kw, ref_kw = MODES[mode]
    batches = _batches(6)
    runs = {}
    for name, make in (("ours", lambda ps: OffloadedAdamW(ps, lr=2e-2, **opts, **ours_kw)),
                       ("torch", lambda ps: torch.optim.AdamW(ps, lr=2e-2, **opts, **ref_kw))):
        model = _model()
        opt = make(model.parameters())
        _train(model, opt, _schedule(opt), batches)
        runs[name] = model
    _params_equal(runs["ours"], runs["torch"])
    defaults = dict(eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False)  # torch.optim.AdamW's
    for key in opts:  # each non-default option moved the result: ignoring it could not go unnoticed
        if key != "betas" and opts[key] == defaults[key]:
            continue
        default = _model()
        kw = dict(opts)
        kw.pop(key)
        if key == "betas":
            for i, d in enumerate((0.9, 0.999)):  # beta1 and beta2 each
                b = list(opts["betas"])
                b[i] = d
                kw["betas"] = tuple(b)
                other = _model()
                opt = torch.optim.AdamW(other.parameters(), lr=2e-2, **kw, **ref_kw)
                _train(other, opt, _schedule(opt), batches)
                assert not torch.equal(other[0].weight, runs["torch"][0].weight), (key, i)
            continue
        opt = torch.optim.AdamW(default.parameters(), lr=2e-2, **kw, **ref_kw)
        _train(default, opt, _schedule(opt), batches)
        assert not torch.equal(default[0].weight, runs["torch"][0].weight), key
