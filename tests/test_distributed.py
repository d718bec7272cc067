"""lowbit.distributed: FSDP2 (fully_shard) shards lowbit's quantized storage.

The two-rank test runs in 2 processes (torch.multiprocessing spawn, gloo, a CPU device mesh);
every check is made inside the ranks against the same model run unsharded in the same process,
so the ranks need no reference from outside. Rank 0 writes the per-rank memory figures to a JSON
file that the test prints (docs/training.md quotes them).
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
from torch import nn

from lowbit import IntLinear, Linear4bit, LoRALinear, QuantLinear
from lowbit.distributed import prepare_for_fsdp, shard
from lowbit.optim import OffloadedAdamW

WORLD = 2
LORA_R = 4


def _model(seed: int) -> nn.Module:
    """nf4+dq with a non-multiple-of-blocksize width (flat layout), fp4 without dq (fp32 scales),
    int3 rows with groups, and an odd row count (uneven shards); LoRA on all but the last."""
    torch.manual_seed(seed)

    def lora(layer):
        m = LoRALinear(layer, r=LORA_R)
        nn.init.normal_(m.lora_B, std=0.05)  # B = 0 would give the A gradients no signal
        return m

    return nn.Sequential(
        lora(Linear4bit.from_linear(nn.Linear(96, 128), quant_type="nf4")),  # 96 % 64: flat layout
        nn.GELU(),
        lora(Linear4bit.from_linear(nn.Linear(128, 128), quant_type="fp4", double_quant=False)),
        nn.GELU(),
        lora(IntLinear.from_linear(nn.Linear(128, 128), bits=3, group_size=64)),
        nn.GELU(),
        Linear4bit.from_linear(nn.Linear(128, 33), quant_type="nf4").requires_grad_(False),  # 33 rows: uneven
    )


def _lowbit_bytes(model: nn.Module) -> dict:
    """Bytes this rank holds for the lowbit layers' own tensors: sharded storage, replicated rest."""
    out = {"sharded": 0, "replicated": 0}
    for layer in model.modules():
        if not isinstance(layer, QuantLinear):
            continue
        for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
            local = t.to_local() if hasattr(t, "to_local") else t
            key = "sharded" if hasattr(t, "to_local") else "replicated"
            out[key] += local.numel() * local.element_size()
    out["total"] = out["sharded"] + out["replicated"]
    return out


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step(model, x, y, opt=None):
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    grads = {n: _full(p.grad).clone() for n, p in _lora_params(model).items()}
    if opt is not None:
        opt.step()
        opt.zero_grad()
    return loss.detach(), grads


def check_checkpoints(model: nn.Module, build, mesh, x, after, tmp: str, rank: int) -> None:
    """Inside the ranks, for a sharded `model` whose output on x is `after` (build(seed): the unsharded model):
    a sharded checkpoint (DCP) loads into a differently initialised sharded model, and the full state dict has an
    unsharded model's keys and loads into one, both giving `after` exactly. Shared by the families' FSDP2 tests."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    ckpt = os.path.join(tmp, "dcp")
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=ckpt)
    other = shard(build(1), mesh)
    with torch.no_grad():
        assert not torch.equal(other(x), after)
    sd = {"model": get_model_state_dict(other)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(other, sd["model"])
    with torch.no_grad():
        torch.testing.assert_close(other(x), after, rtol=0, atol=0)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = build(2)
        assert list(full) == list(plain.state_dict())
        plain.load_state_dict(full)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), after, rtol=0, atol=0)


def record_storage_dtypes(model: nn.Module) -> dict:
    """{"<layer>.<tensor>": dtype} of every lowbit layer's own parameters and buffers as its forward sees them
    (filled by forward pre-hooks on the next forward): what a MixedPrecisionPolicy cast or left alone."""
    seen = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.register_forward_pre_hook(lambda mod, args, n=n: seen.update(
                {f"{n}.{k}": v.dtype for k, v in list(mod.named_parameters(recurse=False))
                 + list(mod.named_buffers(recurse=False))}))
    return seen


def _ranks(rank: int, port: int, tmp: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        g = torch.Generator().manual_seed(7)
        x, y = torch.randn(8, 96, generator=g), torch.randn(8, 33, generator=g)
        ref, model = _model(0), _model(0)
        with torch.no_grad():
            ref_out = ref(x)
        one_rank = _lowbit_bytes(ref)
        shard(model, mesh)

        # 1. every quantized storage tensor: this rank holds its half of the rows
        storage = [(f"{n}.{s}", getattr(m, s)) for n, m in model.named_modules() if isinstance(m, QuantLinear)
                   for s in ("weight", "weight_absmax", "codes", "zeros") if hasattr(m, s)]
        assert len(storage) == 8, [n for n, _ in storage]
        for name, t in storage:
            full = _full(t)
            assert isinstance(t, nn.Parameter) and not t.requires_grad and t.dtype == full.dtype, name
            assert t.to_local().shape[0] == -(-full.shape[0] // WORLD) - (rank * (full.shape[0] % WORLD)), name
            assert torch.equal(t.to_local(), full[rank * -(-full.shape[0] // WORLD):][:t.to_local().shape[0]]), name
        for n, m in model.named_modules():
            if isinstance(m, Linear4bit):
                assert not hasattr(m.weight_code, "to_local"), f"{n}.weight_code must stay a whole buffer"

        # 2. forward equals the unsharded model
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref_out, rtol=0, atol=0)

        # 3. a data-parallel LoRA step: each rank half the batch; mean loss and averaged gradients
        #    equal the single-process full-batch step
        with pytest.raises(ValueError, match="CPUOffloadPolicy"):  # FSDP2's sharded parameters get no grad hooks
            OffloadedAdamW(model.parameters(), offload=True)
        ref_opt = OffloadedAdamW(ref.parameters(), lr=1e-2)
        opt = OffloadedAdamW(model.parameters(), lr=1e-2)
        ref_loss, ref_grads = _step(ref, x, y, ref_opt)
        half = slice(rank * 4, rank * 4 + 4)
        loss, grads = _step(model, x[half], y[half], opt)
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / WORLD, ref_loss, rtol=1e-6, atol=1e-7)
        assert grads.keys() == ref_grads.keys() and len(grads) == 6
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
        with torch.no_grad():
            after = model(x)
            torch.testing.assert_close(after, ref(x), rtol=1e-5, atol=1e-6)

        # 4. sharded checkpoint (DCP) into a differently initialised sharded model; 5. the full state dict
        check_checkpoints(model, _model, mesh, x, after, tmp, rank)

        # 6. a bf16 MixedPrecisionPolicy: code tables stay fp32 buffers, integer storage uint8/int32,
        #    the fp32 scales of the no-double-quant layer stay whole (not cast)
        bf = shard(_model(0), mesh, units=[LoRALinear], mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        seen = record_storage_dtypes(bf)
        with torch.no_grad():
            out_bf = bf(x)
            ref_bf = _model(0).bfloat16()(x.bfloat16())
        assert out_bf.dtype == torch.bfloat16
        torch.testing.assert_close(out_bf, ref_bf, rtol=2e-2, atol=2e-2)
        assert seen["0.base.weight"] == torch.uint8 and seen["0.base.weight_absmax"] == torch.uint8
        assert seen["0.base.weight_code"] == seen["0.base.weight_nested_code"] == torch.float32
        assert seen["2.base.weight_absmax"] == torch.float32 and not hasattr(bf[2].base.weight_absmax, "to_local")
        assert seen["4.base.codes"] == torch.int32

        # 7. memory: the test model, and a Llama-7B MLP-shaped pair (allocated, not quantized)
        mem = {"test model": (one_rank, _lowbit_bytes(model))}
        big = nn.Sequential(Linear4bit(4096, 11008), IntLinear(4096, 11008, bits=3, group_size=128))
        one = _lowbit_bytes(big)
        mem["nf4+dq and int3/g128, 4096->11008 each"] = (one, _lowbit_bytes(shard(big, mesh)))
        if rank == 0:
            with open(os.path.join(tmp, "memory.json"), "w") as f:
                json.dump(mem, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_two_ranks_shard_forward_train_checkpoint(tmp_path):
    t0 = time.perf_counter()
    torch.multiprocessing.spawn(_ranks, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    print(f"\n{WORLD} ranks, {time.perf_counter() - t0:.1f} s; bytes of the lowbit layers' tensors per rank:")
    for what, (one, per) in json.loads((tmp_path / "memory.json").read_text()).items():
        shardable = one["total"] - per["replicated"]
        print(f"  {what}: 1 rank {one['total']:,}; {WORLD} ranks {per['total']:,} = sharded {per['sharded']:,} "
              f"({per['sharded'] / shardable:.4f} of {shardable:,}) + replicated {per['replicated']:,}")
        assert per["sharded"] <= shardable / WORLD + 64  # + the padding of the 33-row layer


# ----------------------------------------------------------------------------------------------
# prepare_for_fsdp in one process
# ----------------------------------------------------------------------------------------------


def test_prepare_keeps_keys_dtypes_and_outputs():
    model = _model(0)
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = model(x)
    sd = model.state_dict()
    done = prepare_for_fsdp(model)
    assert done == ["0.base.weight", "0.base.weight_absmax", "2.base.weight", "4.base.codes", "4.base.zeros",
                    "6.weight", "6.weight_absmax"]
    assert prepare_for_fsdp(model) == []  # idempotent
    after_sd = model.state_dict()
    assert sorted(after_sd) == sorted(sd)
    for k in sd:
        assert after_sd[k].dtype == sd[k].dtype and torch.equal(after_sd[k], sd[k]), k
    for name in done:
        p = model.get_parameter(name)
        assert not p.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    # the trainable parameters are still exactly the LoRA ones
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(_lora_params(model))


def test_prepare_float_storage_keeps_its_dtype_under_half():
    layer = Linear4bit.from_linear(nn.Linear(128, 64), quant_type="fp4", double_quant=False)
    assert prepare_for_fsdp(layer, shard_float_storage=True) == ["weight", "weight_absmax"]
    layer.half()
    assert layer.weight_absmax.dtype == torch.float32 and isinstance(layer.weight_absmax, nn.Parameter)
    assert layer.weight.dtype == torch.uint8 and layer.compute_dtype == torch.float16
    assert layer.weight_code.dtype == torch.float32
    assert Linear4bit.KEEP_DTYPE == ()  # the class is untouched


def test_prepare_and_shard_reject_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prepare_for_fsdp(object())
    with pytest.raises(TypeError, match="units must be"):
        shard(_model(0), units=["LoRALinear"])
