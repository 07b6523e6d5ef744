"""spnet_dist.training.run_log: progress lines with interval throughput, data wait and ETA."""
from spnet_dist.training.run_log import RunLogger, format_duration


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(27 * 3600) == "27:00:00"


def test_progress_line_reports_interval_throughput_data_wait_and_eta(tmp_path, capsys):
    log = RunLogger(tmp_path, enabled=True, progress="log", tensorboard=False)
    speed = {"images_per_sec": 1234.4, "data_wait": 0.031, "eta_s": 3725.0}
    log.step(100, 2, {"total": 1.5}, 0.1, True, speed)
    line = capsys.readouterr().out.strip()
    assert line == "epoch 2 step 100 lr=0.1 total=1.5000 | 1234 img/s, data wait 3 %, ETA 1:02:05"
    log.step(101, 2, {}, 0.1, False)  # not a logging step: silent
    assert capsys.readouterr().out == ""
    log.close()
