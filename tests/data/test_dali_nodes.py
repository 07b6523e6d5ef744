"""DALI on two torchrun "nodes" of one rank each (LOCAL_RANK 0 on both): the ranks read disjoint
halves of the training set and of the validation set, as on a real 2-node job."""
import json

import pytest

from spnet_dist.data.fake import make_fake_imagenet

from ..dist_helpers import WORKERS, run_torchrun_nodes

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.multiprocess


def test_two_nodes_read_disjoint_halves_with_dali(tmp_path):
    # 16 classes x 1 image: a label identifies a file; 16 = 2 ranks x 2 batches x 4.
    root = make_fake_imagenet(tmp_path / "data", classes=16, per_class=1, val_per_class=1, long_side_range=(24, 40))
    out = tmp_path / "out"
    out.mkdir()
    run_torchrun_nodes(WORKERS / "dali_shards.py", 2, ["--root", str(root), "--out", str(out), "--backend", "dali",
                                                       "--epochs", "1"], timeout=600)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["env_local_rank"]) for r in ranks] == [(0, 0), (1, 0)]  # the two-node condition
    train = [[y for batch in r["epochs"][0] for y in batch] for r in ranks]
    assert len(train[0]) == len(train[1]) == 8
    assert not set(train[0]) & set(train[1]), "both nodes read the same samples"
    assert sorted(train[0] + train[1]) == list(range(16))
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(16))  # every val image once
