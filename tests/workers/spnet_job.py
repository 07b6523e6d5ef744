"""Worker: run the SP-Net Trainer under a launcher and save what the tests compare, per rank.

Modes:
  fit   train with the config (e.g. 24 steps), then save this rank's teacher and student
        state dicts and the final evaluation record.
  grad  one optimizer step on an explicit global batch: rank r feeds micro-batch r; a single
        rank with grad_accum=k feeds micro-batches 0..k-1 in order. Saves the student.
  shards  build the Trainer on datasets that record which samples are read, run one epoch of
        its train loader and one pass of its eval loader; rank 0 writes every rank's
        (rank, local rank) and the indices it read to shards.json.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from spnet_dist import distributed as D  # noqa: E402
from spnet_dist.data import loaders as data_build  # noqa: E402
from spnet_dist.config import load_config  # noqa: E402
from spnet_dist.training import Trainer  # noqa: E402


def _save(state: dict, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


class RecordingDataset(Dataset):
    """Passes samples through and remembers which indices were read (num_workers=0 only)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        self.read.append(int(index))
        return self.dataset[index]

    def __getattr__(self, name: str):  # classes, targets, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def record_shards(cfg, out: Path) -> None:
    assert cfg.data.num_workers == 0, "the recording dataset only sees reads in this process"
    recorded = []
    build_datasets = data_build.build_datasets

    def build_recording_datasets(*args, **kwargs):
        datasets = tuple(RecordingDataset(d) for d in build_datasets(*args, **kwargs))
        recorded.extend(datasets)
        return datasets

    # What the Trainer's build_loaders calls (torchvision backend: the digits default).
    data_build.build_datasets = build_recording_datasets
    trainer = Trainer(cfg)
    train_set, val_set = recorded
    for _ in trainer.train_loader:  # one epoch
        pass
    for _ in trainer.val_loader:
        pass
    mine = {"rank": trainer.dist.rank, "local_rank": trainer.dist.local_rank,
            "env_local_rank": int(os.environ["LOCAL_RANK"]), "train": train_set.read, "val": val_set.read,
            "train_size": len(train_set), "val_size": len(val_set)}
    everyone = [None] * trainer.dist.world_size
    torch.distributed.all_gather_object(everyone, mine)
    if trainer.dist.rank == 0:
        (out / "shards.json").write_text(json.dumps(everyone))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("fit", "grad", "shards"))
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # deepspeed launcher
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    out = Path(a.out)
    cfg = load_config(a.config, a.overrides)
    if a.mode == "shards":
        record_shards(cfg, out)
        return
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
    try:
        main()
    finally:
        # As spnet-train does: a process that exits with its gloo group alive can abort in
        # interpreter shutdown (a gloo worker thread frees a finished work's tensors, needs the
        # GIL, and is killed: "terminate called without an active exception", SIGABRT).
        D.destroy()
