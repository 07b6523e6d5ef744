"""Worker: train with the real Trainer, which writes its checkpoints in the run-directory layout
spnet-export reads::

    RUN/checkpoints/<tag>/        engine.save_checkpoint(RUN/checkpoints, tag=<tag>) on every rank
    RUN/checkpoints/<tag>/teacher.safetensors   teacher parameters + buffers, fp32 (rank 0)
    RUN/checkpoints/latest        DeepSpeed's text file naming <tag>
    RUN/checkpoints/final         symlink to <tag>

Rank 0 also writes ``RUN/eval_logits.safetensors``: the trainer's eval-mode logits (closed
blocks skipped, the training precision) of the first validation images, and the images.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from spnet_dist import distributed as D  # noqa: E402
from spnet_dist.config import load_config  # noqa: E402
from spnet_dist.execution import set_execution  # noqa: E402
from spnet_dist.training import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # deepspeed launcher
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    cfg = load_config(a.config, a.overrides)
    trainer = Trainer(cfg)
    trainer.fit()  # ends with the `final` checkpoint
    run = Path(cfg.run.out_dir)
    tag = f"step_{trainer.state.step:08d}"
    if trainer.dist.is_main:
        final = run / "checkpoints" / "final"
        assert final.resolve().name == tag and (final / "teacher.safetensors").is_file(), sorted(final.parent.iterdir())
        images = torch.stack([trainer.val_loader.dataset[i][0] for i in range(48)])
        model = trainer.model
        model.eval()
        set_execution(model, "skip")
        with torch.no_grad(), trainer.step_fn.autocast:
            logits = model(images.to(trainer.device)).logits.float().cpu()
        save_file({"images": images.contiguous(), "logits": logits.contiguous()}, str(run / "eval_logits.safetensors"))
    D.barrier()
    print(f"CHECKPOINT-OK rank={trainer.dist.rank} tag={tag}", flush=True)
    D.destroy()


if __name__ == "__main__":
    main()
