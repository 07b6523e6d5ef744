"""Checkpoints as the trainer seals them, without training: every rank's part, then the marker."""
from __future__ import annotations

from pathlib import Path

from spnet_dist import checkpoint as C
from spnet_dist.config import Config, to_dict


def fake_checkpoint(ckpt_dir: Path, step: int, payload: bytes = b"weights", world_size: int = 1,
                    zero_stage: int = 0) -> Path:
    """What every rank would have written into the temporary directory, then sealed."""
    tag = C.step_tag(step)
    tmp = ckpt_dir / C.tmp_dir_name(tag)
    tmp.mkdir(parents=True)
    (tmp / C.MODEL_STATES).write_bytes(payload * 100)
    cfg = Config()
    cfg.engine.zero_stage = zero_stage
    C.write_json(tmp / C.STATE_FILE, {"train_state": {"epoch": 0, "step": step}, "config": to_dict(cfg),
                                      "world_size": world_size})
    for rank in range(world_size):
        C.write_json(tmp / C.rank_file(rank), {"loader": {}})
        if zero_stage > 0:
            (tmp / C.optim_states_file(rank)).write_bytes(payload * 10)
    return C.publish(ckpt_dir, tmp, tag, step)
