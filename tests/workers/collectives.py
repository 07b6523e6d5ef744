"""Worker: spnet_dist.distributed collectives on N ranks (torchrun, gloo). Prints COLLECTIVES-OK.

Run by tests/test_distributed.py; any failed check raises, which fails the whole job.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from spnet_dist import distributed as D  # noqa: E402


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(D.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


class NeedsTwoArguments(Exception):
    """An exception that cannot be unpickled (its __init__ needs more than its args)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")


def raises(exc: BaseException):
    def fn():
        raise exc
    return fn


def check_run_on_main(rank: int) -> None:
    calls = []
    assert D.run_on_main(lambda: calls.append(rank) or {"from": rank}, what="compute") == {"from": 0}
    assert calls == ([0] if rank == 0 else [])  # rank 0 alone runs the step
    assert D.run_on_main(lambda: f"own-{rank}", what="compute", share=False) == ("own-0" if rank == 0 else None)
    # An exception that travels: the same type and one-line message on every rank.
    try:
        D.run_on_main(raises(PermissionError(13, "Permission denied", "/run/config.yaml")), what="write")
    except PermissionError as err:
        assert str(err) == "[Errno 13] Permission denied: '/run/config.yaml'", err
    else:
        raise AssertionError("run_on_main did not raise rank 0's PermissionError")
    # A result that cannot be broadcast fails on rank 0, before the broadcast, and travels too.
    try:
        D.run_on_main(lambda: (lambda: None), what="compute")
    except AttributeError as err:
        assert "pickle" in str(err), err
    else:
        raise AssertionError("run_on_main broadcast an unpicklable result")
    # Exceptions that cannot travel (unpicklable, a multi-line message): RankZeroError everywhere.
    for fn, kind in ((raises(NeedsTwoArguments("/data", "stale")), "NeedsTwoArguments: /data: stale"),
                     (raises(ValueError("two\nlines")), "ValueError: two lines")):
        try:
            D.run_on_main(fn, what="list the data")
        except D.RankZeroError as err:
            assert str(err).startswith("rank 0 could not list the data: ") and kind in str(err), err
        else:
            raise AssertionError(f"run_on_main did not raise RankZeroError for {kind}")


def main() -> None:
    info = D.init_distributed("gloo")
    assert D.init_distributed() == info, "init_distributed must be idempotent"
    rank, world = info.rank, info.world_size
    assert (rank, world) == (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    assert info.local_rank == int(os.environ["LOCAL_RANK"]) and info.device == torch.device("cpu")
    assert D.get_rank() == rank and D.get_world_size() == world
    assert D.is_main_process() == (rank == 0)
    assert world >= 3, "needs >= 3 ranks: with 2, a + b == b + a makes any order bit-identical"

    # ---- all_reduce_mean_: values whose float32 sum depends on the order -----------------
    g = torch.Generator().manual_seed(1234 + rank)
    spread = torch.randn(4096, generator=g) * 10.0 ** torch.randint(-8, 9, (4096,), generator=g)
    triple = torch.tensor([1.0, 1e8, -1e8][rank % 3]).repeat(16)  # (1+1e8)-1e8=0, 1+(1e8-1e8)=1
    half = (torch.randn(33, generator=g) * 100).to(torch.bfloat16)
    wide = torch.randn(5, 7, generator=g, dtype=torch.float64)
    tensors = [spread, triple, half, wide]

    inputs = [gather(t) for t in tensors]
    forward = sum(inputs[0][1:], inputs[0][0].clone())
    backward = sum(reversed(inputs[0][:-1]), inputs[0][-1].clone())
    assert not torch.equal(forward, backward), "test data should make the order matter"
    exact = [torch.stack([x.double() for x in xs]).mean(0) for xs in inputs]

    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(t, *args, **kwargs):
        calls.append((t.dtype, t.numel()))
        return real_all_reduce(t, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        D.all_reduce_mean_(tensors)
    finally:
        dist.all_reduce = real_all_reduce
    # float32 bucket (spread + triple), bfloat16, float64: one collective per dtype.
    assert sorted(str(c[0]) for c in calls) == ["torch.bfloat16", "torch.float32", "torch.float64"], calls

    for t in tensors:
        copies = gather(t)
        assert all(torch.equal(c.view(torch.uint8), copies[0].view(torch.uint8)) for c in copies), \
            f"{t.dtype} result differs between ranks"
    assert D.count_rank_mismatches(tensors) == 0
    torch.testing.assert_close(wide, exact[3].to(wide.dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(half.float(), exact[2].float(), rtol=2e-2, atol=2e-2)

    # ---- count_rank_mismatches sees a real difference -----------------------------------
    assert D.count_rank_mismatches([torch.tensor([float(rank)])]) > 0

    # ---- average_buffers_: float buffers averaged, integer buffers from rank 0 -------------
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4).train()
    data = torch.Generator().manual_seed(99 + rank)
    for _ in range(2 if rank == 0 else 1):  # rank 0 runs one extra forward
        bn(torch.randn(8, 4, 5, 5, generator=data) + rank)
    assert D.count_rank_mismatches(list(bn.buffers())) > 0
    expected_mean = torch.stack(gather(bn.running_mean)).double().mean(0)
    expected_var = torch.stack(gather(bn.running_var)).double().mean(0)
    D.average_buffers_(bn)
    assert D.count_rank_mismatches(list(bn.buffers())) == 0
    torch.testing.assert_close(bn.running_mean.double(), expected_mean)
    torch.testing.assert_close(bn.running_var.double(), expected_var)
    assert bn.num_batches_tracked.item() == 2, "integer buffers take rank 0's value"

    # ---- broadcast_ / broadcast_object --------------------------------------------------
    ints = torch.arange(5) + rank
    D.broadcast_([ints], src=1)
    assert torch.equal(ints, torch.arange(5) + 1)
    assert D.broadcast_object({"run": f"id-{rank}"}) == {"run": "id-0"}

    # ---- run_on_main: rank 0's result, or rank 0's error, on every rank --------------------
    check_run_on_main(rank)

    D.barrier()
    print(f"COLLECTIVES-OK rank={rank}", flush=True)
    D.destroy()
    assert not dist.is_initialized()
    D.destroy()  # safe twice


if __name__ == "__main__":
    main()
