"""FSDP2 on the block-FP4 family: lowbit.distributed.shard shards BlockFPLinear's codes and scale bytes by
output row (its SHARDED_STORAGE), keeps NVFP4's per-tensor global scale whole, and a sharded model computes,
trains LoRA and checkpoints exactly like the unsharded one.

Two ranks (spawn, gloo, a CPU mesh), as tests/test_distributed.py; every check is made inside the ranks against
the same model run unsharded in the same process. The bug each step catches is named beside it.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from torch import nn

from lowbit import LoRALinear
from lowbit.distributed import shard
from lowbit.nn.blockfp import BlockFPLinear
from tests.test_distributed import _free_port, _full, _step, check_checkpoints, record_storage_dtypes

WORLD = 2


def _model(seed: int) -> nn.Module:
    """nvfp4 and mxfp4 layers with LoRA, and a frozen nvfp4 head of 33 rows (uneven shards)."""
    torch.manual_seed(seed)

    def lora(layer):
        m = LoRALinear(layer, r=4)
        nn.init.normal_(m.lora_B, std=0.05)
        return m

    return nn.Sequential(
        lora(BlockFPLinear.from_linear(nn.Linear(96, 128), quant_type="nvfp4")),
        nn.GELU(),
        lora(BlockFPLinear.from_linear(nn.Linear(128, 128), quant_type="mxfp4")),
        nn.GELU(),
        BlockFPLinear.from_linear(nn.Linear(128, 33), quant_type="nvfp4").requires_grad_(False),
    )


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
        shard(model, mesh)

        # 1. codes and scale bytes sharded by row (a family whose SHARDED_STORAGE named nothing, or the wrong
        #    dim, fails here); the nvfp4 global scale stays a whole buffer on every rank
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BlockFPLinear)]
        assert len(layers) == 3
        for n, m in layers:
            for s in ("weight_packed", "weight_scale"):
                t = getattr(m, s)
                full = _full(t)
                rows = -(-full.shape[0] // WORLD)
                assert isinstance(t, nn.Parameter) and not t.requires_grad and t.dtype == torch.uint8, f"{n}.{s}"
                assert torch.equal(t.to_local(), full[rank * rows:][:t.to_local().shape[0]]), f"{n}.{s}"
            if m.quant_type == "nvfp4":
                assert not hasattr(m.weight_global_scale, "to_local"), f"{n}.weight_global_scale must stay whole"

        # 2. forward equals the unsharded model, bit for bit
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref_out, rtol=0, atol=0)

        # 3. a data-parallel LoRA step (half the batch per rank) equals the full-batch step
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ref_loss, ref_grads = _step(ref, x, y, ref_opt)
        half = slice(rank * 4, rank * 4 + 4)
        loss, grads = _step(model, x[half], y[half], opt)
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / WORLD, ref_loss, rtol=1e-6, atol=1e-7)
        assert grads.keys() == ref_grads.keys() and len(grads) == 4
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
        with torch.no_grad():
            after = model(x)
            torch.testing.assert_close(after, ref(x), rtol=1e-5, atol=1e-6)

        # 4-5. a sharded checkpoint (DCP) into a differently initialised sharded model, and the full state dict
        #      into a plain model (the byte check of BlockFPLinear's load runs on the gathered tensors)
        check_checkpoints(model, _model, mesh, x, after, tmp, rank)

        # 6. a bf16 policy casts neither the uint8 storage nor the fp32 global scale (a cast scale divisor
        #    would change every nvfp4 weight)
        bf = shard(_model(0), mesh, units=[LoRALinear], mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        seen = record_storage_dtypes(bf)
        with torch.no_grad():
            out_bf = bf(x)
            ref_bf = _model(0).bfloat16()(x.bfloat16())
        assert out_bf.dtype == torch.bfloat16
        torch.testing.assert_close(out_bf, ref_bf, rtol=2e-2, atol=2e-2)
        assert seen["0.base.weight_packed"] == seen["0.base.weight_scale"] == torch.uint8
        assert seen["0.base.weight_global_scale"] == torch.float32
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_ranks_blockfp(tmp_path):
    torch.multiprocessing.spawn(_ranks, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
