"""spnet_dist.training.signals: handlers that only record, restored afterwards; a second SIGTERM exits."""
import os
import signal
import subprocess
import sys

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


def test_second_sigterm_exits_at_once():
    code = ("import os, signal, time\n"
            "from spnet_dist.training.signals import StopSignals\n"
            "s = StopSignals().install()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "assert s.requested == signal.SIGTERM\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(30)\n"
            "print('still alive')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "still alive" not in proc.stdout
