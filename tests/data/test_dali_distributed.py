"""DALI backend on 2 CPU ranks under torchrun (gloo): shards, validation, the public CLI."""
import json

import pytest

from spnet_dist.data.fake import make_fake_imagenet

from ..conftest import REPO_ROOT
from ..dist_helpers import WORKERS, run_torchrun

pytest.importorskip("nvidia.dali")
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_two_ranks_read_disjoint_shards_covering_the_train_set(tmp_path):
    # 24 classes x 1 image: a label identifies a file. 24 = 2 ranks x 3 batches x 4, and the 24
    # val images split 12/12 (uneven splits: the 23-image cases in test_dali.py).
    root = make_fake_imagenet(tmp_path / "data", classes=24, per_class=1, val_per_class=1, long_side_range=(40, 64))
    out = tmp_path / "out"
    out.mkdir()
    run_torchrun(WORKERS / "dali_shards.py", 2, ["--root", str(root), "--out", str(out)], timeout=600)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    for epoch in range(2):
        shards = [[y for batch in rank["epochs"][epoch] for y in batch] for rank in ranks]
        assert all(len(batch) == 4 for rank in ranks for batch in rank["epochs"][epoch])
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(24))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # reshuffled per epoch
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(24))  # every val image once


def test_imagefolder_run_trains_with_dali_through_the_cli_on_two_ranks(tmp_path):
    root = make_fake_imagenet(tmp_path / "data", classes=4, per_class=8, val_per_class=3, long_side_range=(40, 80))
    out = tmp_path / "run"
    run_torchrun("-m", 2, ["spnet_dist.train", "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
                           "data.format=imagefolder", f"data.root={root}", "data.backend=dali",
                           "data.augment=imagenet", "data.image_size=16", "model.num_classes=4",
                           "engine.global_batch_size=8", "schedule.epochs=1", "schedule.warmup_epochs=0",
                           f"run.out_dir={out}", "run.progress=log", "run.tensorboard=false"], timeout=900)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["images"] == 12  # 4 classes x 3 val images, each once across the 2 ranks
    assert record["step"] == 4  # 32 images / (2 ranks x 4) per optimizer step
    listing = json.loads((out / "data_files.json").read_text())
    assert len(listing["splits"]["train"]["files"]) == 32
