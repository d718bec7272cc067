"""OffloadedAdamW: AdamW whose states live in host memory (QLoRA's paged-optimizer idea, done
with explicit copies instead of CUDA managed memory).

For every trainable parameter p that is not on the CPU, the optimizer keeps in host memory
(pinned when CUDA is available):
  a copy of p                  (the tensor the step updates; same dtype as p)
  a gradient buffer            (filled from p.grad during backward)
  exp_avg, exp_avg_sq          (torch.optim.AdamW's states, in p's dtype: fp32 for LoRA weights)
The flow of one training step:
  backward   p's post-accumulate-grad hook copies p.grad into the host buffer on a side CUDA
             stream, so the copies overlap the rest of the backward;
  step()     waits for those copies, runs torch's AdamW on the host tensors (fused CPU kernel by
             default) and copies the updated parameters back to the device (non-blocking).
Frozen parameters (requires_grad=False: quantized storage, base weights) get no hook, no host
copy and no state. Parameters already on the CPU are stepped in place: with every parameter on
the CPU the optimizer *is* torch.optim.AdamW (same state, same arithmetic, same bits).

Compatible with what torch.optim.AdamW works with: LR schedulers (param_groups["lr"]),
state_dict / load_state_dict (states stay on the host; a checkpoint loads into either class),
gradient clipping with torch.nn.utils.clip_grad_norm_ (a device gradient changed after its copy
left, by clipping or GradScaler.unscale_, is copied again at step()), gradient accumulation.
offload_gradients=True also frees each device gradient as soon as it is copied (saves one
gradient's worth of device memory); then torch's clip_grad_norm_ sees no gradients (clip with
`OffloadedAdamW.clip_grad_norm_`) and a second backward before step() raises (no accumulation).

The CUDA stream/event code cannot run on a CPU-only machine: tests run the same bookkeeping with
offload=True on CPU tensors (synchronous copies) and compare it bit for bit with torch.optim.AdamW.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim.adamw import adamw

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # a torch built without distributed support
    DTensor = None

__all__ = ["OffloadedAdamW"]


@dataclass
class _Host:
    """The host side of one offloaded parameter."""

    param: Tensor  # host copy of the parameter (the step updates it)
    grad: Tensor  # host gradient buffer
    has_grad: bool = False
    src: Any = None  # weakref to the device gradient last copied ...
    version: int = -1  # ... and its version counter then (a later in-place change shows here)
    event: Any = None  # CUDA event: the gradient copy finished


def _host_empty_like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _scalar_dtype(fused: bool) -> torch.dtype:
    # torch.optim.optimizer._get_scalar_dtype: the dtype of Adam's "step" state
    return torch.float64 if torch.get_default_dtype() == torch.float64 and not fused else torch.float32


class OffloadedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with its states (and the step's arithmetic) in host memory.

    Arguments are torch.optim.AdamW's (capturable / differentiable are not offered), plus:
      offload: None (default) offloads every trainable parameter that is not on the CPU; True
               also gives CPU parameters a separate host copy and a gradient hook (the offload
               bookkeeping without a GPU: tests); False never offloads (plain AdamW).
      offload_gradients: free each device gradient once it is copied to the host (see the
               module docstring for what that rules out).
    For offloaded parameters, fused=None / foreach=None pick torch's fused CPU AdamW.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, offload: Optional[bool] = None,
                 offload_gradients: bool = False) -> None:
        if offload not in (None, True, False):
            raise TypeError(f"offload must be None, True or False, got {offload!r}")
        if not isinstance(offload_gradients, bool):
            raise TypeError(f"offload_gradients must be a bool, got {offload_gradients!r}")
        # add_param_group (called by Optimizer.__init__) reads these
        self._offload_mode, self._free_grads = offload, offload_gradients
        self._host: dict[Tensor, _Host] = {}
        self._hooks: list[Any] = []
        self._streams: dict[torch.device, Any] = {}  # per CUDA device: the side stream of the gradient copies
        self._uploads: list[Any] = []  # CUDA events after the last step's parameter uploads
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         fused=fused)
        if self._host:  # (Adam.__init__ sets it for fused=True after the groups were added)
            self._step_supports_amp_scaling = False

    # -- registration ----------------------------------------------------------------------------
    def _offloads(self, p: Tensor) -> bool:
        if self._offload_mode is False or not p.requires_grad:
            return False
        return self._offload_mode is True or p.device.type != "cpu"

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p in self._host or not self._offloads(p):
                continue
            if _is_dtensor(p):
                raise ValueError("OffloadedAdamW cannot offload a sharded (DTensor) parameter: FSDP2 gives its "
                                 "sharded parameters no gradient hooks. Shard with fully_shard(..., offload_policy="
                                 "CPUOffloadPolicy()) instead: the parameters are then on the CPU and this "
                                 "optimizer is torch.optim.AdamW on them")
            self._step_supports_amp_scaling = False  # GradScaler's fused path would hand CUDA scales to a CPU step
            host = _Host(param=_host_empty_like(p), grad=_host_empty_like(p))
            host.param.copy_(p.detach())
            self._host[p] = host
            self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))

    # -- backward: gradients leave the device --------------------------------------------------------
    def _grad_ready(self, p: Tensor) -> None:
        host = self._host[p]
        if self._free_grads and host.has_grad:
            raise RuntimeError("OffloadedAdamW(offload_gradients=True): a second backward before step() would "
                               "replace the first one's gradient (the device copy is gone); accumulate gradients "
                               "with offload_gradients=False")
        g = p.grad
        if g.is_cuda:
            side = self._streams.get(g.device)
            if side is None:
                side = self._streams[g.device] = torch.cuda.Stream(device=g.device)
            side.wait_stream(torch.cuda.current_stream(g.device))  # the gradient is complete there
            with torch.cuda.stream(side):
                host.grad.copy_(g, non_blocking=True)
                host.event = torch.cuda.Event()
                host.event.record(side)
            g.record_stream(side)  # its memory is not reused before the copy has read it
        else:
            host.grad.copy_(g)
            host.event = None
        host.has_grad, host.src, host.version = True, weakref.ref(g), g._version
        if self._free_grads:
            p.grad = None
            host.src = None

    def _host_grad(self, p: Tensor, host: _Host) -> Optional[Tensor]:
        """The gradient the step uses for offloaded p (None: p has none this step)."""
        if host.event is not None:  # the hook's copy has landed
            host.event.synchronize()
            host.event = None
        if self._free_grads:
            return host.grad if host.has_grad else None
        g = p.grad  # still on the device: it is the truth (zero_grad, clipping, scaling)
        if g is None:
            return None
        if not host.has_grad or host.src() is not g or g._version != host.version:
            host.grad.copy_(g)  # changed (or never seen) since the hook copied it
            host.has_grad, host.src, host.version = True, weakref.ref(g), g._version
        return host.grad

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for event in self._uploads:  # the previous step's uploads have read the host copies
            event.synchronize()
        self._uploads.clear()
        for group in self.param_groups:
            local = [p for p in group["params"] if p not in self._host and p.grad is not None]
            if local:
                self._adamw(group, local, [p.grad for p in local], group["foreach"], group["fused"])
            moved = []
            for p in group["params"]:
                host = self._host.get(p)
                g = None if host is None else self._host_grad(p, host)
                if g is not None:
                    moved.append((p, host, g))
            if moved:
                foreach, fused = group["foreach"], group["fused"]
                if fused is None and foreach is None:
                    fused = True  # torch's fused CPU AdamW
                self._adamw(group, [h.param for _, h, _ in moved], [g for _, _, g in moved], foreach, fused,
                            keys=[p for p, _, _ in moved])
                for p, host, _ in moved:
                    p.copy_(host.param, non_blocking=True)
                    if self._free_grads:
                        host.has_grad = False  # consumed
                for dev in {p.device for p, _, _ in moved if p.is_cuda}:
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(dev))
                    self._uploads.append(event)
        return loss

    def _adamw(self, group: dict, params: list[Tensor], grads: list[Tensor], foreach, fused,
               keys: Optional[list[Tensor]] = None) -> None:
        """torch.optim.AdamW's step on `params` (state keyed by `keys`, default the params)."""
        exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], []
        for p, g, key in zip(params, grads, keys or params):
            if g.is_sparse:
                raise RuntimeError("OffloadedAdamW does not support sparse gradients")
            state = self.state[key]
            if not state:  # as torch.optim.Adam._init_group
                state["step"] = (torch.zeros((), dtype=_scalar_dtype(True), device=p.device) if fused
                                 else torch.tensor(0.0, dtype=_scalar_dtype(False)))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, foreach=foreach, fused=fused,
              grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
              has_complex=any(torch.is_complex(p) for p in params), amsgrad=group["amsgrad"], beta1=beta1,
              beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=group["maximize"], capturable=False, differentiable=False)

    # -- gradients -------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for host in self._host.values():
            host.has_grad, host.src = False, None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the gradients the next step() uses, wherever they
        are (needed with offload_gradients=True, where the device holds none). Returns the total
        norm (before clipping)."""
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                host = self._host.get(p)
                g = p.grad if host is None else self._host_grad(p, host)
                if g is not None:
                    grads.append(g)
        total = torch.nn.utils.get_total_norm(grads, norm_type)
        torch.nn.utils.clip_grads_with_norm_([_GradHolder(g) for g in grads], max_norm, total)
        if not self._free_grads:  # the clipped host copies are now the truth
            for group in self.param_groups:
                for p in group["params"]:
                    host = self._host.get(p)
                    if host is not None and p.grad is not None:
                        p.grad.copy_(host.grad)
                        host.src, host.version = weakref.ref(p.grad), p.grad._version
        return total

    # -- checkpoints -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Optimizer.load_state_dict, with the states of offloaded parameters placed on the host
        (torch would move them to the parameter's device)."""
        if not self._host:
            return super().load_state_dict(state_dict)
        to_host = {p: h.param for p, h in self._host.items()}
        to_dev = {h.param: p for p, h in self._host.items()}
        for group in self.param_groups:  # load against the host copies ...
            group["params"] = [to_host.get(p, p) for p in group["params"]]
        try:
            super().load_state_dict(state_dict)
        finally:  # ... then key everything by the device parameters again
            for group in self.param_groups:
                group["params"] = [to_dev.get(p, p) for p in group["params"]]
            state = {to_dev.get(p, p): s for p, s in self.state.items()}
            self.state.clear()
            self.state.update(state)
        if torch.cuda.is_available():
            for p in self._host:
                for k, v in self.state.get(p, {}).items():
                    if isinstance(v, Tensor) and k != "step" and not v.is_pinned():
                        self.state[p][k] = v.pin_memory()
        for p, host in self._host.items():  # the device parameters are the truth
            host.param.copy_(p.detach())
            host.has_grad, host.src = False, None


class _GradHolder:
    """An object with .grad, for torch.nn.utils.clip_grads_with_norm_ (which reads p.grad)."""

    __slots__ = ("grad",)

    def __init__(self, grad: Tensor) -> None:
        self.grad = grad
