"""Worker: train the toy BN model through spnet_dist.engine and save what the tests compare.

Works as a plain process (1 rank), under torchrun and under the deepspeed launcher (which
passes ``--local_rank``). Rank 0 writes ``--out`` (a torch.save'd dict); the other ranks only
take part in the collectives.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from spnet_dist import distributed as D  # noqa: E402
from spnet_dist.engine import build_engine  # noqa: E402
from tests.dist_helpers import ds_config, make_cfg, toy_model, train_steps  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # deepspeed launcher
    a = p.parse_args()

    info = D.init_distributed("gloo")
    rank, world = info.rank, info.world_size
    if a.local_rank is not None:
        assert a.local_rank == info.local_rank, (a.local_rank, info.local_rank)
    cfg = make_cfg(engine__zero_stage=a.zero, engine__grad_accum=a.grad_accum,
                   engine__global_batch_size=a.global_batch, engine__precision=a.precision,
                   schedule__epochs=4, schedule__milestones=[1])
    engine, _, scheduler = build_engine(toy_model(seed=0), cfg.optim, cfg.schedule,
                                        ds_config(cfg, world), steps_per_epoch=2)
    assert engine.world_size == world and engine.global_rank == rank
    # build_engine unlinked every rank's DeepSpeed shared-memory segment (the deepspeed
    # launcher's LOCAL_SIZE turns them on); the mapped segments must still carry DeepSpeed's
    # shared-memory all-reduce.
    D.barrier()
    shm_left = [path.name for path in map(D.deepspeed_shm_path, range(world)) if path.exists()]
    shm_sum = None
    if os.environ.get("LOCAL_SIZE") == str(world):
        import deepspeed.comm

        shm_sum = deepspeed.comm.inference_all_reduce(torch.full((8,), float(rank + 1))).tolist()

    losses = train_steps(engine, a.steps, rank, world, a.grad_accum, a.global_batch)
    module = engine.module
    params = [p.detach() for p in module.parameters()]
    float_buffers = [b for b in module.buffers() if b.is_floating_point()]
    result = {
        "world": world,
        "params": {n: p.detach().cpu().clone() for n, p in module.named_parameters()},
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        "losses": losses,
        "global_steps": engine.global_steps,
        "lr": engine.get_lr()[0],
        "scheduler_steps": scheduler.last_epoch,
        "param_mismatch": D.count_rank_mismatches(params),
        "buffer_mismatch_before": D.count_rank_mismatches(float_buffers),
        "shm_left": shm_left,
        "shm_sum": shm_sum,
    }
    D.average_buffers_(module)
    result["buffer_mismatch_after"] = D.count_rank_mismatches(list(module.buffers()))
    if rank == 0:
        torch.save(result, a.out)
    D.barrier()
    print(f"TRAIN-OK rank={rank} world={world}", flush=True)
    D.destroy()


if __name__ == "__main__":
    main()
