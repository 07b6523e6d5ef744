"""Worker: a rank-0-only step fails; every rank prints the error it ends with.

    setup_failure.py --config C --fail {save_config,scan,checkpoint} [--linger S] section.field=value ...

On rank 0 the chosen step raises (monkeypatched): ``save_config`` raises PermissionError while
the run directory is prepared, ``scan`` raises OSError(ESTALE) while the image folders are
listed, ``checkpoint`` raises OSError(ENOSPC) while the teacher's weights of the first checkpoint
are written (a full disk after training began). Every rank that ends with an exception prints
``rank R error: <Type>: <message>`` and exits 1. Rank 0 then stays alive for ``--linger`` seconds: NCCL does not notice that a peer has
stopped (gloo would see its socket close), so a rank waiting in a collective for rank 0 would
wait until the process-group timeout; the linger makes gloo behave the same way here.
"""
import argparse
import errno
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from spnet_dist import distributed as D  # noqa: E402
from spnet_dist import training  # noqa: E402
from spnet_dist.config import load_config  # noqa: E402
from spnet_dist.data import loaders  # noqa: E402
from spnet_dist.training import planning  # noqa: E402


def say(line: str) -> None:
    """One line in one write(2): a pipe keeps writes below PIPE_BUF (4 KiB) whole."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--fail", choices=("save_config", "scan", "checkpoint"), required=True)
    p.add_argument("--linger", type=float, default=150.0)  # beyond the test's 120 s guard
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    cfg = load_config(a.config, a.overrides)
    rank = int(os.environ["RANK"])
    if rank == 0 and a.fail == "save_config":
        def save_config(cfg, path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        planning.save_config = save_config
    if rank == 0 and a.fail == "scan":
        def build_imagefolder(root):
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(Path(root) / "train"))
        loaders.build_imagefolder = build_imagefolder
    if rank == 0 and a.fail == "checkpoint":
        import safetensors.torch

        def save_file(tensors, filename, metadata=None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), Path(filename).name)
        safetensors.torch.save_file = save_file
    try:
        training.main(cfg)
    except Exception as err:
        # One write(2) per line: the tests run workers with PYTHONUNBUFFERED=1, so print() writes
        # the text and its newline apart, and the other rank's line could land in between (seen once).
        say(f"rank {rank} error: {type(err).__name__}: {err}")
        say(f"rank {rank} failed at {time.time():.3f}")
        if rank == 0:
            time.sleep(a.linger)
        D.destroy()
        raise SystemExit(1)
    say(f"rank {rank} trained")
    D.destroy()


if __name__ == "__main__":
    main()
