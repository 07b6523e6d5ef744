"""spnet_dist.run_dir: the paths of a run directory and the one rule for a damaged metrics.jsonl line."""
import json

import pytest

from spnet_dist.run_dir import MetricsError, RunDirectory


def _write(run: RunDirectory, text: str) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    run.metrics.write_text(text)


def test_truncate_metrics_keeps_records_the_checkpoint_contains(tmp_path):
    run = RunDirectory(tmp_path)
    _write(run, "".join(json.dumps({"epoch": e, "step": 10 * e}) + "\n" for e in (1, 2, 3)) + '{"epo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert run.truncate_metrics(epoch=2, step=25) == 2  # epoch 3 and the torn line
    assert [json.loads(line)["epoch"] for line in run.metrics.read_text().splitlines()] == [1, 2]
