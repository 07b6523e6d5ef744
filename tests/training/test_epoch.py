"""spnet_dist.training.epoch: the epoch's running sums (reduced across ranks, saved mid-epoch) and
the throughput of a logging interval."""
from __future__ import annotations

import pytest
import torch

from spnet_dist.checkpoint import EpochSums
from spnet_dist.training.epoch import EpochAccumulator, IntervalMeter, pack_epoch_sums, reduce_epoch_means

pytestmark = pytest.mark.usefixtures("own_process_group")


def test_epoch_reduction_on_the_meta_device():
    # The epoch-end crash reproduced without a GPU: sums on 'meta' stand in for CUDA tensors.
    meta = torch.device("meta")
    sums = {"total": torch.zeros((), device=meta), "cls": torch.zeros((), device=meta)}
    keys, packed = pack_epoch_sums(sums, micro_batches=3, images=24, device=meta)
    assert keys == ["cls", "total"] and packed.device == meta and packed.shape == (4,)
    assert packed.dtype == torch.float64
    keys, packed = pack_epoch_sums({"total": torch.tensor(6.0)}, 3, 24, torch.device("cpu"))
    assert packed.tolist() == [6.0, 3.0, 24.0]
    means = reduce_epoch_means({"total": torch.tensor(6.0)}, 3, 24, 2.0, torch.device("cpu"))
    assert means == {"total": 2.0, "images_per_sec": 12.0}


def test_interval_meter_reports_throughput_data_wait_and_eta():
    meter = IntervalMeter(start=10.0)
    for _ in range(4):
        meter.waited(0.25)
        meter.add(images=8, stepped=True)
    speed = meter.report(now=14.0, world_size=2, steps_left=100)
    assert speed == {"images_per_sec": 32 * 2 / 4.0, "data_wait": 0.25, "eta_s": 100.0}
    meter.add(images=8, stepped=False)  # a new interval starts at the report
    assert meter.report(now=15.0, world_size=1, steps_left=0)["images_per_sec"] == 8.0


def test_epoch_accumulator_saves_and_restores_the_sums_of_the_epoch_so_far(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("spnet_dist.training.epoch.time.perf_counter", lambda: now[0])
    acc = EpochAccumulator(torch.device("cpu"))
    now[0] = 103.0
    acc.begin()
    acc.add({"total": torch.tensor(2.0), "cls": torch.tensor(1.5)}, images=8)
    acc.add({"total": torch.tensor(4.0), "cls": torch.tensor(0.5)}, images=8)
    now[0] = 110.0
    saved = acc.snapshot()  # 7 s into the epoch
    assert saved == EpochSums(terms={"total": 6.0, "cls": 2.0}, micro_batches=2, images=16, seconds=7.0)
    resumed = EpochAccumulator(torch.device("cpu"))
    resumed.restore(saved)
    now[0] = 200.0
    resumed.begin()
    now[0] = 201.0
    assert resumed.elapsed() == 8.0  # the clock continues from 7 s
    assert {k: float(v) for k, v in resumed.sums.items()} == saved.terms
    assert (resumed.micro_batches, resumed.images) == (2, 16)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in resumed.sums.values())
    resumed.restore(None)  # an epoch boundary: nothing carried
    resumed.begin()
    assert resumed.sums == {} and resumed.micro_batches == 0 and resumed.elapsed() == 0.0
