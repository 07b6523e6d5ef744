"""Worker: run the SP-Net Trainer under a launcher and save what the tests compare, per rank.

Modes:
  fit   train with the config (e.g. 24 steps), then save this rank's teacher and student
        state dicts and the final evaluation record.
  grad  one optimizer step on an explicit global batch: rank r feeds micro-batch r; a single
        rank with grad_accum=k feeds micro-batches 0..k-1 in order. Saves the student.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from spnet_dist.config import load_config  # noqa: E402
from spnet_dist.train import Trainer  # noqa: E402


def _save(state: dict, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("fit", "grad"))
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # deepspeed launcher
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    out = Path(a.out)
    cfg = load_config(a.config, a.overrides)
    trainer = Trainer(cfg)
    rank, world = trainer.dist.rank, trainer.dist.world_size
    if a.mode == "fit":
        record = trainer.fit()
        _save(trainer.teacher.module.state_dict(), out / f"teacher_rank{rank}.safetensors")
        if rank == 0:
            (out / "record.json").write_text(json.dumps(record))
    else:
        g = torch.Generator().manual_seed(1234)
        global_size = cfg.engine.global_batch_size
        images = torch.randn(global_size, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
        targets = torch.randint(0, cfg.model.num_classes, (global_size,), generator=g)
        micro = global_size // (world * cfg.engine.grad_accum)
        chunks = list(zip(images.split(micro), targets.split(micro)))
        mine = chunks[rank::world] if world > 1 else chunks
        for x, y in mine:
            trainer.train_step(x, y)
        assert trainer.state.step == 1
    _save(trainer.model.state_dict(), out / f"student_rank{rank}.safetensors")


if __name__ == "__main__":
    main()
