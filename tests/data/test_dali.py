"""The DALI loaders (CPU twin of the GPU pipeline) against the Loader contract and the torchvision backend."""
import json
import logging
from pathlib import Path

import pytest
import torch

from spnet_dist.data import CorruptImageError, Loader, build_loaders
from spnet_dist.data.dali import (DaliEvalLoader, DaliRecipe, DaliTrainLoader, ReaderOptions, live_pipelines,
                                  resolve_dali_device)
from spnet_dist.data.fake import make_fake_imagenet
from spnet_dist.data.torchvision_loader import TrainLoader

from .helpers import IndexDataset, assert_same_batches, data_cfg, take

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.usefixtures("no_dali_threads_left")

RECIPE = DaliRecipe("imagenet", 16, True)


@pytest.fixture(scope="module")
def indexed_files(tmp_path_factory):
    """30 small JPEGs; sample i has label i, so labels identify files."""
    root = make_fake_imagenet(tmp_path_factory.mktemp("fake"), classes=30, per_class=1, val_per_class=1,
                              long_side_range=(40, 64))
    files = sorted((root / "train").glob("*/*.JPEG"))
    return [(str(p), i) for i, p in enumerate(files)]


# ----------------------------------------------------------------------------- order and shards

def test_same_samples_per_rank_and_epoch_as_the_torchvision_loader(indexed_files):
    for rank in (0, 1):
        dali = DaliTrainLoader(indexed_files, 4, rank, 2, seed=7, recipe=RECIPE, num_threads=1)
        tv = TrainLoader(IndexDataset(len(indexed_files)), 4, rank, 2, seed=7)
        assert isinstance(dali, Loader) and len(dali) == len(tv) == 3  # 15 per rank -> 3 full batches
        got, want = take(dali, 6), take(tv, 6)  # two epochs
        assert [y.tolist() for _, y in got] == [y.tolist() for _, y in want]
        images = got[0][0]
        assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32


def test_two_ranks_disjoint_full_batches_same_step_count(indexed_files):
    # 30 files, 2 ranks, batch 4: 15 per rank, 3 full batches, 3 samples per rank left for the next
    # epoch's reshuffle (drop_last, as torchvision's DistributedSampler does).
    loaders = [DaliTrainLoader(indexed_files, 4, r, 2, seed=1, recipe=RECIPE, num_threads=1) for r in (0, 1)]
    orders = []
    for epoch in range(2):
        seen = [[y for _, ys in loader for y in ys.tolist()] for loader in loaders]
        assert all(len(s) == 12 for s in seen)  # full batches only, same number of steps
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0] + seen[1])) == 24
        orders.append(seen[0])
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_union_is_the_whole_train_set_when_it_divides(indexed_files):
    files = indexed_files[:24]  # 24 = 2 ranks x 3 batches x 4
    for epoch in range(2):
        union = []
        for rank in (0, 1):
            loader = DaliTrainLoader(files, 4, rank, 2, seed=3, recipe=RECIPE, num_threads=1)
            loader.set_epoch(epoch)
            union += [y for _, ys in loader for y in ys.tolist()]
        assert sorted(union) == list(range(24))


def test_different_seeds_give_different_orders(indexed_files):
    a = [y.tolist() for _, y in DaliTrainLoader(indexed_files, 4, seed=0, recipe=RECIPE, num_threads=1)]
    b = [y.tolist() for _, y in DaliTrainLoader(indexed_files, 4, seed=1, recipe=RECIPE, num_threads=1)]
    assert a != b


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("k", [2, 5, 7], ids=["mid-epoch", "mid-second-epoch", "at-epoch-end"])
def test_resume_is_bitwise_exact_across_epoch_ends(indexed_files, k):
    # 30 files, batch 4, 1 rank: 7 batches per epoch; 20 batches from k cross 2-3 epoch ends.
    make = lambda: DaliTrainLoader(indexed_files, 4, seed=5, recipe=RECIPE, num_threads=1)  # noqa: E731
    reference = take(make(), k + 20)
    first = make()
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint writes
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # the trainer's usual call must not reset the position
    assert_same_batches(take(resumed, 20), reference[k:])


def test_state_before_and_after_a_pipeline_exists(indexed_files):
    loader = DaliTrainLoader(indexed_files, 4, seed=5, recipe=RECIPE, num_threads=1)
    state = loader.state_dict()
    assert state["pipeline"] is None and state["batches_seen"] == 0
    take(loader, 1)
    state = loader.state_dict()
    assert isinstance(state["pipeline"], str) and state["segment_start"] == 0 and state["batches_seen"] == 1


def test_world_size_change_restarts_the_epoch_order_deterministically(indexed_files, caplog):
    two = DaliTrainLoader(indexed_files[:24], 4, 0, 2, seed=2, recipe=RECIPE, num_threads=1)
    take(two, 1)  # both ranks together consumed the first 8 samples of the epoch's permutation
    state = two.state_dict()
    runs = []
    for _ in range(2):
        one = DaliTrainLoader(indexed_files[:24], 4, 0, 1, seed=2, recipe=RECIPE, num_threads=1)
        with caplog.at_level(logging.WARNING, logger="spnet_dist.data.sampling"):
            one.load_state_dict(state)
        assert "order is regenerated" in caplog.text
        assert one.batches_seen == 2  # 8 samples = 2 batches of 4 on one rank
        runs.append([y.tolist() for _, y in one])
    assert runs[0] == runs[1] and len(runs[0]) == 4  # the rest of the epoch, the same every time
    # the samples already consumed are not repeated: a 1-rank loader's epoch minus its first 8
    full = DaliTrainLoader(indexed_files[:24], 4, 0, 1, seed=2, recipe=RECIPE, num_threads=1)
    assert [y.tolist() for _, y in full][2:] == runs[0]


def test_resumes_from_a_torchvision_state(indexed_files):
    tv = TrainLoader(IndexDataset(len(indexed_files)), 4, seed=4)
    take(tv, 3)
    dali = DaliTrainLoader(indexed_files, 4, seed=4, recipe=RECIPE, num_threads=1)
    dali.load_state_dict(tv.state_dict())
    assert [y.tolist() for _, y in take(dali, 4)] == [y.tolist() for _, y in take(tv, 4)]


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_counts_every_image_once(indexed_files, world):
    files = indexed_files[:23]  # divisible by neither the batch (4) nor 2 or 3 ranks
    seen = []
    for rank in range(world):
        loader = DaliEvalLoader(files, 4, rank, world, DaliRecipe("imagenet", 16, False), num_threads=1)
        batches = [y.tolist() for _, y in loader]
        assert len(batches) == len(loader)
        seen += [y for b in batches for y in b]
    assert sorted(seen) == list(range(23))


def test_eval_pixels_match_torchvision_decoding(tmp_path):
    root = make_fake_imagenet(tmp_path / "d", classes=2, per_class=2, val_per_class=5, long_side_range=(120, 200))
    tv_val = list(build_loaders(data_cfg(root, image_size=64, backend="torchvision"), 4)[1])
    dali_val = list(build_loaders(data_cfg(root, image_size=64), 4)[1])
    for (xd, yd), (xt, yt) in zip(dali_val, tv_val):
        assert torch.equal(yd, yt)
        # same resize-shorter + centre crop + normalisation; the rest is decoder/resampler
        # rounding (a one-pixel shift of these grainy images gives ~0.2)
        assert (xd - xt).abs().mean() < 0.05
    assert sum(len(y) for _, y in dali_val) == 10


# ----------------------------------------------------------------------------- bad data

def _corrupt(root: Path) -> tuple[Path, Path]:
    files = sorted((root / "train").glob("*/*.JPEG"))
    truncated, garbage = files[1], files[4]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    garbage.write_bytes(b"this is not a JPEG" * 20)
    return truncated, garbage


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_corrupt_file_stops_the_run_naming_it(tmp_path, backend):
    root = make_fake_imagenet(tmp_path / "d", classes=2, per_class=6, val_per_class=1, long_side_range=(40, 64))
    truncated, garbage = _corrupt(root)
    train, _ = build_loaders(data_cfg(root, backend=backend), 4)
    with pytest.raises(CorruptImageError) as err:
        for _ in range(2):
            list(train)
    assert str(truncated) in str(err.value) or str(garbage) in str(err.value)
    assert "data.on_corrupt" in str(err.value)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_corrupt_files_are_skipped_counted_and_batches_stay_full(tmp_path, backend):
    root = make_fake_imagenet(tmp_path / "d", classes=2, per_class=6, val_per_class=1, long_side_range=(40, 64))
    truncated, garbage = _corrupt(root)
    train, _ = build_loaders(data_cfg(root, backend=backend, on_corrupt="skip"), 4)
    for epoch in range(2):
        train.set_epoch(epoch)
        sizes = [len(y) for _, y in train]
        assert sizes == [4, 4, 4]
    assert sorted(train.skipped) == sorted([str(truncated), str(garbage)])
    assert sorted(train.state_dict()["skipped"]) == sorted(train.skipped)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_corrupt_validation_image_is_left_out_once(tmp_path, backend):
    root = make_fake_imagenet(tmp_path / "d", classes=2, per_class=1, val_per_class=5, long_side_range=(40, 64))
    bad = sorted((root / "val").glob("*/*.JPEG"))[3]
    bad.write_bytes(bad.read_bytes()[:200])
    _, val = build_loaders(data_cfg(root, backend=backend, on_corrupt="skip", eval_batch_size=3), 1)
    assert sum(len(y) for _, y in val) == 9
    assert val.skipped == [str(bad)]


# ----------------------------------------------------------------------------- rank 0 scans

# ----------------------------------------------------------------------------- devices

def test_dali_device_resolution():
    assert resolve_dali_device("auto", torch.device("cpu")) == "cpu"
    assert resolve_dali_device("auto", torch.device("cuda", 3)) == "gpu"
    assert resolve_dali_device("cpu", torch.device("cuda", 0)) == "cpu"
    with pytest.raises(ValueError, match="data.dali_device"):
        resolve_dali_device("gpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="data.dali_device"):
        resolve_dali_device("tpu", None)


# ----------------------------------------------------------------------------- reader options (issue 19 finding 5)

def test_reader_options_come_from_the_config_and_reach_dalis_file_reader(tmp_path, monkeypatch):
    import nvidia.dali.fn as fn

    from spnet_dist.config import DataConfig

    assert (DataConfig().dali_dont_use_mmap, DataConfig().dali_prefetch_queue_depth) == (True, 4)  # cluster defaults
    root = make_fake_imagenet(tmp_path / "fake", classes=2, per_class=8, val_per_class=2, long_side_range=(40, 64))
    seen, real = [], fn.readers.file

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("dont_use_mmap", "prefetch_queue_depth")})
        return real(*args, **kwargs)

    monkeypatch.setattr(fn.readers, "file", spy)
    for mmap_off, depth in ((True, 4), (False, 1)):
        seen.clear()
        train, val = build_loaders(data_cfg(root, dali_dont_use_mmap=mmap_off, dali_prefetch_queue_depth=depth), 4)
        take(train, 1), take(val, 1)
        assert seen == [{"dont_use_mmap": mmap_off, "prefetch_queue_depth": depth}] * 2  # train and val pipelines
        train.release()


def test_reader_options_may_change_between_a_checkpoint_and_its_resume(indexed_files):
    # Neither option changes the bytes or the order, so the pipeline checkpoint restores into the
    # other setting bit for bit (which is why checkpoint.resume lets them change).
    make = lambda reader: DaliTrainLoader(indexed_files, 4, seed=5, recipe=RECIPE, num_threads=1,  # noqa: E731
                                          reader=reader)
    reference = take(make(ReaderOptions(dont_use_mmap=False, prefetch_queue_depth=1)), 12)
    first = make(ReaderOptions(dont_use_mmap=False, prefetch_queue_depth=1))
    take(first, 5)
    resumed = make(ReaderOptions(dont_use_mmap=True, prefetch_queue_depth=4))
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same_batches(take(resumed, 7), reference[5:])


# ----------------------------------------------------------------------------- release (issue 19 finding 6)

@pytest.mark.parametrize("k", [3, 7, 10], ids=["mid-epoch", "at-epoch-end", "mid-second-epoch"])
def test_release_frees_the_pipeline_and_the_epoch_continues_exactly(indexed_files, k):
    # 7 batches per epoch. The trainer stops drawing at its step limit without exhausting the
    # loader; before release() the pipeline lived on until the next set_epoch.
    make = lambda: DaliTrainLoader(indexed_files, 4, seed=5, recipe=RECIPE, num_threads=1)  # noqa: E731
    reference = take(make(), k + 10)
    loader = make()
    take(loader, k)
    before = live_pipelines()
    states = [loader.state_dict()]
    loader.release()
    assert live_pipelines() == before - 1
    states.append(loader.state_dict())  # a checkpoint taken after release() (the trainer saves after evaluating)
    loader.release()  # twice is harmless
    assert_same_batches(take(loader, 10), reference[k:])
    for state in states:
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert_same_batches(take(resumed, 10), reference[k:])


# ----------------------------------------------------------------------------- the public CLI

@pytest.mark.usefixtures("own_process_group")
def test_demo_config_trains_with_dali_through_the_cli(digits_root, tmp_path, capsys):
    from spnet_dist import train

    from ..conftest import REPO_ROOT, tiny_overrides

    out_dir = tmp_path / "run"
    train.cli(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), *tiny_overrides(digits_root, out_dir),
               "data.backend=dali", "data.dali_device=cpu"])
    assert "val top-1" in capsys.readouterr().out
    record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 6 and record["images"] == 360  # every validation image, once
    assert (out_dir / "data_files.json").is_file()  # rank 0's file list
