"""Worker: ``spnet_dist.evaluate.evaluate`` on N ranks (torchrun, gloo) over the strided,
unequal shards of ``tests.dist_helpers.eval_problem``; rank 0 writes the record as JSON.

Run by tests/test_evaluate.py, which compares the record with a hand computation.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from spnet_dist import distributed as D  # noqa: E402
from spnet_dist.data import build_eval_loader  # noqa: E402
from spnet_dist.evaluate import evaluate  # noqa: E402
from spnet_dist.flops import profile_macs  # noqa: E402
from tests.dist_helpers import eval_problem  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=3)
    a = p.parse_args()
    info = D.init_distributed("gloo")
    model, images, targets = eval_problem(a.images)
    loader = build_eval_loader(TensorDataset(images, targets), a.batch_size, info.rank, info.world_size)
    record = evaluate(model, loader, profile_macs(model, (8, 8)), torch.device("cpu"))
    # How many images each rank read: the test checks the shards really were unequal.
    shard_sizes = [None] * info.world_size
    torch.distributed.all_gather_object(shard_sizes, sum(len(y) for _, y in loader))
    record["shard_images"] = shard_sizes
    if info.rank == 0:
        Path(a.out).write_text(json.dumps(record))
    D.barrier()
    D.destroy()


if __name__ == "__main__":
    main()
