"""build_loaders shards by the GLOBAL rank it is given, whatever the launcher's LOCAL_RANK says.

On two nodes of one rank each, both ranks have LOCAL_RANK=0: a loader that sharded by the local
rank would hand both nodes the same half of the data set. This is the one-process form of that
condition (the two-node torchrun launch is in test_dali_nodes.py): the launcher environment of
global rank 1 on the second node, and the loaders of ranks 0 and 1 compared.
"""
import pytest

from spnet_dist.data import build_loaders
from spnet_dist.data.fake import make_fake_imagenet
from spnet_dist.data.sampling import ShardedTrainLoader

from .helpers import data_cfg

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.usefixtures("no_dali_threads_left")

N_TRAIN, N_VAL, BATCH, SEED = 16, 6, 4, 11


@pytest.fixture(scope="module")
def labelled_files(tmp_path_factory):
    """One training image per class (a label identifies a file), 16 = 2 ranks x 2 batches x 4."""
    return make_fake_imagenet(tmp_path_factory.mktemp("ranked"), classes=N_TRAIN, per_class=1, val_per_class=1,
                              long_side_range=(24, 40))


def _second_node_environment(monkeypatch, rank: int) -> None:
    """What torchrun exports on node ``rank`` of a 2-node job with one process per node."""
    for name, value in {"RANK": rank, "LOCAL_RANK": 0, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 1, "GROUP_RANK": rank,
                        "NODE_RANK": rank}.items():
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_two_nodes_of_one_rank_each_read_disjoint_halves(labelled_files, monkeypatch, backend):
    read, evaluated = {}, {}
    for rank in (0, 1):
        _second_node_environment(monkeypatch, rank)
        train, val = build_loaders(data_cfg(labelled_files, backend=backend, num_workers=0 if backend == "torchvision"
                                            else 1), BATCH, rank=rank, world_size=2, seed=SEED)
        assert train.rank == rank
        read[rank] = [y for _, labels in train for y in labels.tolist()]
        evaluated[rank] = [y for _, labels in val for y in labels.tolist()]
        # exactly the global rank's share of the epoch's permutation (labels are the file indices)
        assert read[rank] == ShardedTrainLoader(N_TRAIN, BATCH, rank, 2, SEED).epoch_indices(0)
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == list(range(N_TRAIN))
    assert sorted(evaluated[0] + evaluated[1]) == list(range(N_TRAIN))  # one val image per class, each once
