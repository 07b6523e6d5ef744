"""Worker: one attempt of spnet-train with a planted interruption, under a launcher or alone.

    resume_job.py --config C [--signal-step N] [--kill-in-save-step N] [--stop-self-step N]
                  [--rank R] [--save-weights DIR] [--refuse-unsafe-load] section.field=value ...

Runs ``spnet_dist.training.main(cfg)`` (auto-resume included). Exit status as ``spnet-train``: 75
after a preemption, 0 when done; SIGKILL/SIGSTOP hooks end it the hard way. With
``--save-weights`` every rank writes its student and teacher state dicts as safetensors there.
"""
import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from spnet_dist import distributed as D  # noqa: E402
from spnet_dist import training  # noqa: E402
from spnet_dist.config import load_config  # noqa: E402
from spnet_dist.training.signals import EXIT_PREEMPTED  # noqa: E402
from tests.load_guard import refuse_unsafe_torch_load  # noqa: E402
from tests.resume_hooks import interruptions  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--signal-step", type=int)
    p.add_argument("--kill-in-save-step", type=int)
    p.add_argument("--stop-self-step", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--save-weights")
    p.add_argument("--refuse-unsafe-load", action="store_true",
                   help="torch.load raises unless weights_only=True (prints SAFE-LOADS=<n> at the end)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    cfg = load_config(a.config, a.overrides)
    saved = {}
    original_fit = training.Trainer.fit

    def fit(self):
        record = original_fit(self)
        saved["student"] = self.model.state_dict()
        saved["teacher"] = self.teacher.module.state_dict()
        saved["rank"] = self.dist.rank
        return record

    training.Trainer.fit = fit
    try:
        with interruptions(signal_step=a.signal_step, kill_in_save_step=a.kill_in_save_step,
                           stop_self_step=a.stop_self_step, rank=a.rank), \
                (refuse_unsafe_torch_load() if a.refuse_unsafe_load else contextlib.nullcontext([])) as loaded:
            training.main(cfg)
        if a.refuse_unsafe_load:
            print(f"SAFE-LOADS={len(loaded)} rank={saved['rank']}", flush=True)
    except training.Preempted as err:
        print(err, flush=True)
        D.destroy()
        raise SystemExit(EXIT_PREEMPTED)
    if a.save_weights:
        out = Path(a.save_weights)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("student", "teacher"):
            save_file({k: v.detach().cpu().contiguous() for k, v in saved[name].items()},
                      str(out / f"{name}_rank{saved['rank']}.safetensors"))
    D.destroy()


if __name__ == "__main__":
    main()
