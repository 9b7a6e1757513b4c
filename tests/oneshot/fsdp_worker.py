"""``python -m tests.oneshot.fsdp_worker OUT``: one_shot_prune on an FSDP2-sharded MLP over 2 CPU ranks (gloo).

Each rank calibrates on its own batches; rank 0 writes ``OUT/wanda.pt`` (the full weights after Wanda, gathered
here only to check them, and both ranks' batches) and ``OUT/sparsegpt.txt`` (the refusal message)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 9), nn.ReLU(), nn.Linear(9, 4))


def _batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(8, 16, generator=g) * torch.linspace(0.2, 3.0, 16) for _ in range(2)]


def _run(rank: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pat_callbacks.core.sharding import gather_full
    from pat_callbacks.oneshot import one_shot_prune

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        one_shot_prune(model, "sparsegpt", 0.5, calibration=_batches(rank))
        refusal = "not refused"
    except ValueError as error:
        refusal = str(error)
    result = one_shot_prune(model, "wanda", 0.5, calibration=_batches(rank))
    full = {name: gather_full(p.to_local().detach(), p) for name, p in result.pruner.params.items()}
    if rank == 0:
        torch.save(
            {"weights": full, "batches": _batches(0) + _batches(1), "sparsity": result.sparsity}, f"{out}/wanda.pt"
        )
        Path(out, "sparsegpt.txt").write_text(refusal)
    dist.barrier()  # neither rank tears gloo down while the other still writes or reduces
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(sys.argv[1],), nprocs=2, join=True)
