"""spnet_dist.checkpoint.snapshot without DeepSpeed: RNG streams as JSON, and the trainer's own
files saved and loaded rank by rank through a stand-in engine (same and another world size)."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from spnet_dist import checkpoint as C
from spnet_dist.checkpoint.safe_load import _torch_engine_class
from spnet_dist.config import Config, to_dict


def test_rng_round_trips_through_json():
    state = json.loads(json.dumps(C.capture_rng(torch.device("cpu"))))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    C.restore_rng(state, torch.device("cpu"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


# --------------------------------------------------------------------------------------------
# save_snapshot / load_snapshot with a stand-in engine: the trainer's own files, rank by rank
# --------------------------------------------------------------------------------------------


class _Engine:
    """What save_snapshot / load_snapshot use of a DeepSpeed engine: its files are one torch file."""

    def __init__(self, zero_stage: int = 0, loads: bool = True):
        cls = _torch_engine_class()
        self.checkpoint_engine = cls.__new__(cls)  # the type engine_loads_safely accepts
        self.zero_stage, self.loads, self.calls = zero_stage, loads, []

    def zero_optimization_stage(self) -> int:
        return self.zero_stage

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls.append(("save", tag, save_latest))
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.arange(3.0)}}, Path(save_dir) / tag / C.MODEL_STATES)

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        self.calls.append(("load", tag, load_optimizer_states, load_lr_scheduler_states))
        self.loaded = self.checkpoint_engine.load(str(Path(load_dir) / tag / C.MODEL_STATES))
        return (str(Path(load_dir) / tag) if self.loads else None), {}


def _config() -> dict:
    cfg = Config()
    cfg.engine.zero_stage = 0  # the checkpoint holds no optimizer shards (validate_checkpoint checks them)
    return to_dict(cfg)


def _snapshot(rank: int, teacher: bool = True) -> C.Snapshot:
    return C.Snapshot(
        state=C.TrainState(epoch=1, step=12, batch_in_epoch=3, bad_steps=1, best_top1=0.5, best_tag="step_00000008"),
        rank=C.RankState(rng={"rank": rank}, loader={"epoch": 1, "batches_seen": 3 + rank, "seed": 7},
                         epoch_sums=C.EpochSums(terms={"ce": 1.0 + rank, "kd": 10.0 * (rank + 1)},
                                                micro_batches=3, images=12 + rank, seconds=5.0 + rank)),
        teacher=C.TeacherState(weights={"w": torch.tensor([1.0, 2.0])}, momentum=0.99, num_updates=12)
        if teacher else None,
        config=_config(), world_size=2, steps_per_epoch=6, scheduler={"lr": 0.1}, global_steps=12)


def _saved_by_two_ranks(ckpt: Path, teacher: bool = True) -> Path:
    """Rank 1 writes its part first, then rank 0 adds the shared files and publishes."""
    engine = _Engine()
    out = None
    for rank in (1, 0):
        out = C.save_snapshot(ckpt, engine, _snapshot(rank, teacher), rank=rank, is_main=rank == 0, keep=3,
                              best=True)
    assert engine.calls[0] == ("save", C.tmp_dir_name("step_00000012"), False)  # DeepSpeed writes no `latest`
    return out


def test_a_snapshot_loads_back_on_each_rank_of_the_same_world_size(tmp_path):
    path = _saved_by_two_ranks(tmp_path / "checkpoints")
    assert path == tmp_path / "checkpoints" / "step_00000012"
    C.validate_checkpoint(path)
    assert (tmp_path / "checkpoints" / C.LATEST).read_text().strip() == path.name
    assert (tmp_path / "checkpoints" / "best").resolve() == path.resolve()
    for rank in (0, 1):
        engine = _Engine(zero_stage=2)
        got = C.load_snapshot(path, engine, rank=rank, world_size=2, device=torch.device("cpu"))
        saved = _snapshot(rank)
        assert engine.calls == [("load", path.name, True, True)]  # same world: optimizer restored
        assert torch.equal(engine.loaded["module"]["w"], torch.arange(3.0))
        assert got.optimizer_loaded
        assert got.state == saved.state and got.rank == saved.rank
        assert (got.config, got.world_size, got.steps_per_epoch) == (saved.config, 2, 6)
        assert (got.scheduler, got.global_steps, got.num_threads) == ({"lr": 0.1}, 12, saved.num_threads)
        assert got.versions == saved.versions
        assert (got.teacher.momentum, got.teacher.num_updates) == (0.99, 12)
        assert torch.equal(got.teacher.weights["w"], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_snapshot_loads_onto_another_world_size_with_merged_sums(tmp_path, zero_stage):
    """2 ranks -> 1 and 3: rank 0's loader position for all, the old ranks' sums on new rank 0, no RNG."""
    path = _saved_by_two_ranks(tmp_path / "checkpoints", teacher=False)
    engine = _Engine(zero_stage=zero_stage)
    one = C.load_snapshot(path, engine, rank=0, world_size=1, device=torch.device("cpu"))
    # ZeRO 1/2 optimizer shards are tied to the world size; ZeRO 0's optimizer state is not sharded.
    assert engine.calls == [("load", path.name, zero_stage == 0, True)] and one.optimizer_loaded == (zero_stage == 0)
    assert one.teacher is None and one.world_size == 2
    assert one.rank.rng is None and one.rank.loader == _snapshot(0).rank.loader
    assert one.rank.epoch_sums == C.EpochSums(terms={"ce": 3.0, "kd": 30.0}, micro_batches=6, images=25, seconds=5.0)
    other = C.load_snapshot(path, _Engine(), rank=2, world_size=3, device=torch.device("cpu"))
    assert other.rank.rng is None and other.rank.loader == _snapshot(0).rank.loader
    assert other.rank.epoch_sums == C.EpochSums(terms={"ce": 0.0, "kd": 0.0}, seconds=5.0)


def test_a_snapshot_saved_at_an_epoch_boundary_has_no_sums_on_any_world_size(tmp_path):
    ckpt = tmp_path / "checkpoints"
    engine = _Engine()
    for rank in (1, 0):
        snap = _snapshot(rank)
        snap.rank.epoch_sums = None
        C.save_snapshot(ckpt, engine, snap, rank=rank, is_main=rank == 0, keep=3)
    path = ckpt / "step_00000012"
    assert not (ckpt / "best").exists()
    for world in (1, 2):
        got = C.load_snapshot(path, _Engine(), rank=0, world_size=world, device=torch.device("cpu"))
        assert got.rank.epoch_sums is None


def test_an_engine_that_cannot_load_is_a_checkpoint_error(tmp_path):
    path = _saved_by_two_ranks(tmp_path / "checkpoints")
    with pytest.raises(C.CheckpointError, match="could not load"):
        C.load_snapshot(path, _Engine(loads=False), rank=0, world_size=2, device=torch.device("cpu"))
