"""Worker: build this rank's loaders with build_loaders (global rank from the launcher) and dump
the labels each rank trains on per epoch and evaluates, as JSON, for tests/data/test_dali_distributed.py."""
import argparse
import json
import os
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from spnet_dist import distributed as D  # noqa: E402
from spnet_dist.data import build_loaders  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="dali")
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()
    info = D.init_distributed("gloo")
    cfg = types.SimpleNamespace(format="imagefolder", root=a.root, image_size=16, augment="auto", num_workers=1,
                                eval_batch_size=4, backend=a.backend, dali_device="cpu", on_corrupt="error")
    train, val = build_loaders(cfg, 4, info.rank, info.world_size, seed=11,
                               listing_path=Path(a.out) / "data_files.json")
    record = {"steps": len(train), "epochs": [], "val": [], "rank": info.rank,
              "env_local_rank": int(os.environ["LOCAL_RANK"])}
    for epoch in range(a.epochs):
        train.set_epoch(epoch)
        record["epochs"].append([[int(y) for y in labels] for _, labels in train])
    record["val"] = [int(y) for _, labels in val for y in labels]
    (Path(a.out) / f"rank{info.rank}.json").write_text(json.dumps(record))
    D.barrier()
    D.destroy()


if __name__ == "__main__":
    main()
