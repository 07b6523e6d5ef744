"""What a run tells the world: evaluation records, TensorBoard scalars, progress, the final table.

Only the main process writes or prints; every other rank gets a logger that does nothing, so
the training loop never branches on the rank. Progress bars are for terminals: in a SLURM
log (stdout not a TTY) a bar redrawn with carriage returns becomes megabytes of noise, so
"auto" prints one plain line every ``log_every`` optimizer steps instead.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Optional, Union

from tqdm import tqdm

from ..run_dir import RunDirectory


class RunLogger:
    """Args:
    run_dir: the run directory (created by the caller).
    enabled: False on every rank but the main one.
    progress: "auto" | "bar" | "log" | "none" (config ``run.progress``).
    tensorboard: write TensorBoard scalars under ``out_dir/tensorboard``.
    purge_step: the first step a resumed run logs again (earlier attempts' events at or after it
        are superseded).
    """

    def __init__(self, run_dir: Union[RunDirectory, str, os.PathLike], enabled: bool, progress: str = "auto",
                 tensorboard: bool = True, purge_step: Optional[int] = None) -> None:
        self.run_dir = RunDirectory(run_dir)
        self.enabled = enabled
        if progress == "auto":
            progress = "bar" if sys.stdout.isatty() else "log"
        self.progress = progress if enabled else "none"
        self._bar: Optional[tqdm] = None
        self._writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # import cost only where used

            # A resumed run logs again the steps after its checkpoint that a killed attempt had
            # already logged: purge_step makes TensorBoard drop those earlier events.
            self._writer = SummaryWriter(str(self.run_dir.tensorboard), purge_step=purge_step)

    # ------------------------------------------------------------------ progress
    def start_epoch(self, epoch: int, total_steps: int) -> None:
        if self.progress == "bar":
            self._bar = tqdm(total=total_steps, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)

    def step(self, step: int, epoch: int, terms: Mapping[str, float], lr: float, log: bool,
             speed: Optional[Mapping[str, float]] = None) -> None:
        """Called once per applied optimizer step; ``log`` is True every ``run.log_every`` steps.

        Args:
            step: optimizer steps taken.
            epoch: current epoch.
            terms: loss terms (floats) when ``log``.
            lr: the learning rate this step used.
            log: whether this is a logging step.
            speed: on logging steps, the interval's ``images_per_sec``, ``data_wait`` (fraction
                of the interval spent waiting for the loader) and ``eta_s`` (seconds left).
        """
        speed = speed or {}
        if self._bar is not None:
            self._bar.update(1)
            if log:
                extra = {"img/s": f"{speed['images_per_sec']:.0f}"} if speed else {}
                self._bar.set_postfix(loss=f"{terms['total']:.3f}", lr=f"{lr:.3g}", **extra)
        elif self.progress == "log" and log:
            shown = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
            rate = (f" | {speed['images_per_sec']:.0f} img/s, data wait {100 * speed['data_wait']:.0f} %, "
                    f"ETA {format_duration(speed['eta_s'])}") if speed else ""
            print(f"epoch {epoch} step {step} lr={lr:.4g} {shown}{rate}", flush=True)
        if log:
            values = {f"train/{k}": v for k, v in terms.items()} | {"train/lr": lr}
            values |= {f"train/{k}": v for k, v in speed.items() if k != "eta_s"}
            self.scalars(values, step)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ records
    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def metrics(self, record: Mapping[str, Any]) -> None:
        """Append one evaluation record to the run's metrics file (one JSON object per line)."""
        if not self.enabled:
            return
        self.run_dir.append_metrics(record)
        flat = {f"eval/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")}
        self.scalars(flat, record["step"])

    def print(self, text: str) -> None:
        if self.enabled:
            (tqdm.write if self._bar is not None else print)(text)

    def close(self) -> None:
        self.end_epoch()
        if self._writer is not None:
            self._writer.close()


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"`` (hours may exceed 24: ``"27:00:00"``)."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def results_table(record: Mapping[str, Any]) -> str:
    """The final summary a person reads: accuracy, cost against the static network, gates."""
    rates = record["exec_rates"]
    rows = [
        ("val top-1", f"{record['top1']:.2f} %"),
        ("dynamic MACs / image", f"{record['gmacs']:.4f} GMACs  (paper unit 2xMACs: {record['gmacs_paper']:.4f})"),
        ("static network", f"{record['static_gmacs']:.4f} GMACs (all blocks executed, routers included)"),
        ("MAC ratio", f"{record['mac_ratio']:.3f}"),
        ("mean execution rate", f"{record['exec_rate']:.3f}  over {len(rates)} gated blocks"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    per_block = " ".join(f"{r:.2f}" for r in rates)
    lines.append(f"  {'per-block rates'.ljust(width)}  {per_block}")
    return "\n".join(lines)
