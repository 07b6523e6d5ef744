"""HostSyncCounter sees every way a value reaches the host (the training-step tests rely on it)."""
import pytest
import torch

from spnet_dist.device_audit import SYNC_FUNCTIONS, HostSyncCounter

T = torch.tensor([1.0, 0.0, 2.0])
ONE = torch.tensor(1.0)

# (name it is counted under, the call): bool/float/int/index are what Python's protocols call.
READS = [
    ("item", lambda: ONE.item()),
    ("bool", lambda: bool(ONE)),
    ("bool", lambda: (ONE > 0) and None),  # an `if t:` / `and` on a tensor
    ("is_nonzero", lambda: ONE.is_nonzero()),
    ("is_nonzero", lambda: torch.is_nonzero(ONE)),
    ("float", lambda: float(ONE)),
    ("int", lambda: int(ONE)),
    ("index", lambda: range(ONE.long())),
    ("tolist", lambda: T.tolist()),
    ("cpu", lambda: T.cpu()),
    ("numpy", lambda: T.numpy()),
    ("nonzero", lambda: T.nonzero()),
    ("nonzero", lambda: torch.nonzero(T)),
    ("nonzero", lambda: torch.argwhere(T)),
    ("masked_select", lambda: T.masked_select(T > 0)),
    ("equal", lambda: torch.equal(T, T)),
    ("allclose", lambda: torch.allclose(T, T)),
    ("unique", lambda: torch.unique(T)),
]


@pytest.mark.parametrize("name,read", READS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(READS)])
def test_every_host_read_is_counted(name, read):
    with HostSyncCounter(patch_accelerator=False) as syncs:
        read()
    assert dict(syncs.counts) == {name: 1}


def test_device_work_is_not_counted():
    with HostSyncCounter(patch_accelerator=False) as syncs:
        x = (T * 2).sum() + T.mean()
        torch.isfinite(x).logical_not().long().add_(1)
        T.to(torch.float64)
    assert syncs.total == 0


def test_blocking_waits_are_counted_and_restored():
    originals = [getattr(owner, attr) for owner, attr, _ in SYNC_FUNCTIONS]
    with HostSyncCounter() as syncs:
        torch.cpu.synchronize()
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()
        if not torch.cuda.is_available():
            with pytest.raises((RuntimeError, AssertionError)):
                torch.cuda.synchronize()  # counted before CUDA refuses
    expected = {"torch.cpu.synchronize": 1, "accelerator.synchronize": 1}
    if not torch.cuda.is_available():
        expected["torch.cuda.synchronize"] = 1
    assert dict(syncs.counts) == expected
    assert [getattr(owner, attr) for owner, attr, _ in SYNC_FUNCTIONS] == originals
    assert "synchronize" not in vars(get_accelerator())
