"""tools/bench_step.py's timing: the variant order is shuffled every round (seeded), ratios pair rounds."""
import importlib.util
import random

from .conftest import REPO_ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", REPO_ROOT / "tools" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_round_runs_every_variant_in_a_seeded_shuffled_order():
    bench = _bench()
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("vanilla", "before", "after", "after-skip")}
    times = bench.interleaved(fns, rounds=12, per_round=1, rng=random.Random(0))
    orders = [tuple(calls[i:i + 4]) for i in range(0, len(calls), 4)]
    assert all(sorted(order) == sorted(fns) for order in orders) and all(len(v) == 12 for v in times.values())
    assert len(set(orders)) > 1  # not one fixed order
    assert len({order[0] for order in orders}) > 1  # no variant always runs first (or right after the same one)
    calls.clear()
    bench.interleaved(fns, rounds=12, per_round=1, rng=random.Random(0))
    assert [tuple(calls[i:i + 4]) for i in range(0, len(calls), 4)] == orders  # seeded: reproducible


def test_one_ratio_per_question_from_paired_rounds():
    bench = _bench()
    times = {"after": [2.0, 4.0, 3.0], "vanilla": [1.0, 2.0, 2.0]}
    assert bench.ratio(times, "after", "vanilla") == (2.0, 1.5, 2.0)  # per-round ratios 2, 2, 1.5
    assert bench.spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert [q[1:] for q in bench.QUESTIONS] == [("after", "vanilla"), ("before", "after"), ("after-skip", "after")]
