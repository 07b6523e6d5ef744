"""spnet_dist.training.signals: handlers that only record, restored afterwards; SLURM's pair of
SIGTERMs is one stop request, a deliberate second SIGTERM exits at once."""
import os
import signal
import subprocess
import sys

from spnet_dist.training import signals as signals_module
from spnet_dist.training.signals import StopSignals

from ..dist_helpers import REPO_ROOT, child_env


def test_signal_handlers_only_record_and_are_restored():
    previous = signal.getsignal(signal.SIGUSR2)
    stop = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested == signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGTERM)  # first SIGTERM: a stop request too, not an exit
        assert stop.requested == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) is previous


def _run(body: str) -> subprocess.CompletedProcess:
    """``body`` in a fresh interpreter with the signals module loaded as ``m`` (no trainer imports):
    a SIGTERM that wrongly exits kills that process, not the test run."""
    code = ("import importlib.util, os, signal, time\n"
            f"spec = importlib.util.spec_from_file_location('signals', {signals_module.__file__!r})\n"
            "m = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(m)\n" + body)
    return subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=120)


def test_slurms_pair_of_sigterms_is_one_request():
    # At a time limit and at the end of a GraceTime SLURM sends SIGTERM, SIGCONT, SIGTERM within
    # 5 ms (docs/library-facts.md): the second must not cut short the save the first one starts.
    # A window of 60 s keeps the test independent of how long the two kills take on a busy machine.
    proc = _run("m.StopSignals.BURST_S = 60.0\n"
                "s = m.StopSignals().install()\n"
                "os.kill(os.getpid(), signal.SIGTERM)\n"
                "os.kill(os.getpid(), signal.SIGCONT)\n"
                "os.kill(os.getpid(), signal.SIGTERM)\n"
                "time.sleep(0.5)\n"
                "print('still alive, requested', s.requested)\n")
    assert proc.returncode == 0, proc.stderr
    assert f"still alive, requested {int(signal.SIGTERM)}" in proc.stdout


def test_a_deliberate_second_sigterm_exits_at_once():
    # A second SIGTERM after the window (shortened to 0.2 s here) is a person's "stop now".
    proc = _run("m.StopSignals.BURST_S = 0.2\n"
                "s = m.StopSignals().install()\n"
                "os.kill(os.getpid(), signal.SIGTERM)\n"
                "assert s.requested == signal.SIGTERM\n"
                "time.sleep(1.0)\n"
                "os.kill(os.getpid(), signal.SIGTERM)\n"
                "time.sleep(30)\n"
                "print('still alive')\n")
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "still alive" not in proc.stdout
