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


def test_paths_of_a_run_directory(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert (run.config, run.metrics, run.checkpoints, run.data_files, run.tensorboard) == tuple(
        tmp_path / "run" / name for name in ("config.yaml", "metrics.jsonl", "checkpoints", "data_files.json",
                                             "tensorboard"))
    assert RunDirectory(run).root == run.root and run.holds_run() == []
    run.root.mkdir()
    run.config.write_text("x")
    assert run.holds_run() == ["config.yaml"]


def test_a_torn_last_line_is_ignored_with_a_warning(tmp_path):
    run = RunDirectory(tmp_path)
    _write(run, '{"epoch": 1, "top1": 50.0}\n{"epoch": 2, "top1": 60.0}\n{"epoch": 3, "to')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: torn last line ignored"):
        assert run.last_metrics() == {"epoch": 2, "top1": 60.0}
    with pytest.warns(UserWarning):
        assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_an_unparsable_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    run = RunDirectory(tmp_path)
    _write(run, '{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: not a JSON record") as err:
        run.last_metrics()
    assert "\n" not in str(err.value)
    with pytest.raises(MetricsError):
        run.truncate_metrics(epoch=5, step=50)  # records lost in the middle: not silently dropped


def test_appending_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    from spnet_dist.run_dir import read_jsonl

    run = RunDirectory(tmp_path)
    _write(run, '{"epoch": 1}\n{"epo')
    with pytest.warns(UserWarning):
        assert read_jsonl(run.metrics, drop_torn=True) == [{"epoch": 1}]
    run.append_metrics({"epoch": 2})
    assert run.read_metrics() == [{"epoch": 1}, {"epoch": 2}]
    assert run.last_metrics() is not None and RunDirectory(tmp_path / "none").last_metrics() is None


def test_truncate_metrics_keeps_exactly_what_the_checkpoint_saw(tmp_path):
    """A record is kept when both its epoch and its step are at most the checkpoint's: a mid-epoch
    checkpoint at step 25 keeps the record of step 25 and drops a later one of the same epoch;
    records of older versions without the keys count as (0, 0)."""
    run = RunDirectory(tmp_path)
    assert run.truncate_metrics(epoch=1, step=1) == 0  # no metrics.jsonl yet
    records = [{"top1": 1.0}, {"epoch": 2, "step": 25}, {"epoch": 2, "step": 30}, {"epoch": 3, "step": 20}]
    _write(run, "".join(json.dumps(r) + "\n" for r in records))
    assert run.truncate_metrics(epoch=2, step=25) == 2
    assert run.read_metrics() == records[:2]


def test_last_metrics_is_the_newest_of_many(tmp_path):
    run = RunDirectory(tmp_path)
    _write(run, "".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    assert run.last_metrics() == {"epoch": 3}
