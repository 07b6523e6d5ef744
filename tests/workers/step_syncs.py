"""Worker: host syncs of SPNetStep on N ranks (torchrun, gloo) at ZeRO 0, 1 and 2.

Every rank prints one line ``SYNCS <rank> <stage> <json counts>`` per stage: the syncs of 3
training steps after 3 warm-up steps (DeepSpeed's throughput timer would start after 2). Run by
tests/training/test_step.py; ZeRO 1/2 partition and reduce gradients differently with 2 ranks
than with 1, so the 1-rank count alone would not cover their step.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from spnet_dist import distributed as D  # noqa: E402
from spnet_dist.config import load_config  # noqa: E402
from spnet_dist.device_audit import HostSyncCounter  # noqa: E402
from spnet_dist.models.from_config import build_model  # noqa: E402
from spnet_dist.training.reproducibility import seed_everything  # noqa: E402
from spnet_dist.training.step import SPNetStep  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BATCH, SIZE = 8, 16  # per rank


def main() -> None:
    precision = sys.argv[1] if len(sys.argv) > 1 else "fp32"
    info = D.init_distributed("gloo")
    try:
        for stage in (0, 1, 2):
            cfg = load_config(REPO / "configs" / "demo.yaml",
                              [f"engine.global_batch_size={BATCH * info.world_size}", f"data.image_size={SIZE}",
                               f"engine.zero_stage={stage}", f"engine.precision={precision}",
                               "teacher.execution=masked"],
                              check_paths=False, world_size=info.world_size)
            seed_everything(0)
            step = SPNetStep(cfg, build_model(cfg), info.device, info.world_size, steps_per_epoch=100)
            g = torch.Generator().manual_seed(info.rank)
            images = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
            targets = torch.randint(0, 10, (BATCH,), generator=g)
            for _ in range(3):
                step(images, targets)
            with HostSyncCounter() as syncs:
                for _ in range(3):
                    step(images, targets)
            print(f"SYNCS {info.rank} {stage} {json.dumps(dict(syncs.counts), sort_keys=True)}", flush=True)
            D.barrier()
    finally:
        D.destroy()


if __name__ == "__main__":
    main()
