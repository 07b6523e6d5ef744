"""spnet_dist.checkpoint.store: sealing, the one validator + resolver, aliases, pruning, leftovers."""
import json
import os

import pytest

from spnet_dist import checkpoint as C
from spnet_dist.checkpoint.layout import trash_dir_name

from .helpers import fake_checkpoint as _fake_checkpoint


def test_publish_seals_renames_and_points_latest_last(tmp_path):
    ckpt = tmp_path / "checkpoints"
    path = _fake_checkpoint(ckpt, 4)
    assert path == ckpt / "step_00000004" and not list(ckpt.glob(".tmp-*"))
    assert (ckpt / C.LATEST).read_text() == "step_00000004"
    marker = json.loads((path / C.MARKER).read_text())
    assert set(marker["files"]) == {"mp_rank_00_model_states.pt", C.STATE_FILE, C.rank_file(0)}
    C.validate_checkpoint(path)
    assert C.resolve_checkpoint(tmp_path) == path


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker", "missing_file"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage):
    ckpt = tmp_path / "checkpoints"
    older = _fake_checkpoint(ckpt, 4)
    newest = _fake_checkpoint(ckpt, 8)
    states = newest / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        states.write_bytes(states.read_bytes()[:10])
    elif damage == "flip":
        states.write_bytes(b"X" + states.read_bytes()[1:])
    elif damage == "no_marker":
        (newest / C.MARKER).unlink()
    else:
        states.unlink()
    with pytest.raises(C.CheckpointError, match="step_00000008"):
        C.validate_checkpoint(newest)
    with pytest.warns(UserWarning, match="step_00000008"):
        assert C.resolve_checkpoint(tmp_path) == older
    with pytest.raises(C.CheckpointError, match="step_00000008"):
        C.resolve_checkpoint(tmp_path, "step_00000008")


def test_a_file_swapped_for_another_valid_one_fails_its_checksum(tmp_path):
    # Same size, another checkpoint's content (a valid file, wrong bytes): only the SHA-256 tells.
    ckpt = tmp_path / "checkpoints"
    older = _fake_checkpoint(ckpt, 4, payload=b"weights")
    newest = _fake_checkpoint(ckpt, 8, payload=b"WEIGHTS")
    (newest / C.MODEL_STATES).write_bytes((older / C.MODEL_STATES).read_bytes())
    with pytest.raises(C.CheckpointError, match=r"step_00000008: mp_rank_00_model_states.pt fails its SHA-256"):
        C.validate_checkpoint(newest)


@pytest.mark.parametrize("world_size,zero_stage,dropped", [(2, 0, "rank_00001.json"),
                                                          (2, 2, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                                          (1, 1, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_a_marker_without_every_ranks_part_is_refused(tmp_path, world_size, zero_stage, dropped):
    # A rank that never wrote its part (its save failed without raising) leaves a marker that
    # matches every file it lists: the parts each rank must write are checked too.
    ckpt = tmp_path / "checkpoints"
    path = _fake_checkpoint(ckpt, 4, world_size=world_size, zero_stage=zero_stage)
    C.validate_checkpoint(path)
    marker = json.loads((path / C.MARKER).read_text())
    del marker["files"][dropped]
    (path / dropped).unlink()
    (path / C.MARKER).write_text(json.dumps(marker))
    with pytest.raises(C.CheckpointError, match=f"step_00000004: {dropped} missing from complete.json"):
        C.validate_checkpoint(path)


def test_resolve_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(C.CheckpointError, match="no checkpoints/ directory") as err:
        C.resolve_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(C.CheckpointError, match="no complete checkpoint"):
        C.resolve_checkpoint(tmp_path)
    _fake_checkpoint(tmp_path / "checkpoints", 1)
    with pytest.raises(C.CheckpointError, match=r"step_00000099: no such checkpoint \(found: step_00000001\)"):
        C.resolve_checkpoint(tmp_path, "step_00000099")
    for tag in ("..", "a/b", ""):
        with pytest.raises(C.CheckpointError, match="is not a checkpoint tag"):
            C.resolve_checkpoint(tmp_path, tag)


def test_prune_keeps_newest_and_aliased_and_republish_replaces(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(ckpt, step)
    C.point_alias(ckpt, "best", "step_00000002")
    assert C.prune(ckpt, keep=2) == ["step_00000001", "step_00000003"]
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == \
        ["step_00000002", "step_00000004", "step_00000005"]
    assert C.resolve_checkpoint(tmp_path, "best") == (ckpt / "step_00000002").resolve()
    # An attempt that stopped at step 5 before saves step 5 again: the new content wins, sealed.
    _fake_checkpoint(ckpt, 5, payload=b"other")
    C.validate_checkpoint(ckpt / "step_00000005")
    assert b"other" in (ckpt / "step_00000005" / "mp_rank_00_model_states.pt").read_bytes()


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _fake_checkpoint(ckpt, 1)
    (ckpt / ".tmp-step_00000002").mkdir()
    (ckpt / ".tmp-step_00000002" / "half.pt").write_bytes(b"x")
    assert C.remove_leftovers(ckpt) == [".tmp-step_00000002"]
    assert C.resolve_checkpoint(tmp_path).name == "step_00000001"


def test_latest_pointing_past_the_newest_valid_checkpoint_is_named(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _fake_checkpoint(ckpt, 1)
    newest = _fake_checkpoint(ckpt, 2)
    (newest / C.MARKER).unlink()
    assert (ckpt / C.LATEST).read_text() == "step_00000002"
    with pytest.warns(UserWarning) as caught:
        assert C.resolve_checkpoint(tmp_path).name == "step_00000001"
    assert [str(w.message).split(";")[0].rsplit("/", 1)[-1] for w in caught] == [
        "step_00000002: incomplete (no complete.json", "latest names step_00000002, which is not a valid checkpoint"]


def test_prune_never_removes_the_checkpoint_latest_names(tmp_path):
    """`latest` can name an older step than the newest directories (a save published its directory
    but was killed before pointing `latest`): the resume target survives any prune."""
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _fake_checkpoint(ckpt, step)
    (ckpt / C.LATEST).write_text("step_00000002")
    assert C.prune(ckpt, keep=1) == ["step_00000004"]
    assert (ckpt / "step_00000002").is_dir()


def test_an_alias_update_replaces_a_dangling_temporary_link(tmp_path):
    """A killed alias update leaves `.best.tmp<pid>` behind; a later process with that pid still points the alias."""
    ckpt = tmp_path / "checkpoints"
    tag = _fake_checkpoint(ckpt, 2).name
    os.symlink("step_gone", ckpt / f".best.tmp{os.getpid()}")
    C.point_alias(ckpt, "best", tag)
    assert os.readlink(ckpt / "best") == tag and not (ckpt / f".best.tmp{os.getpid()}").is_symlink()


def test_a_zero_checkpoint_without_its_model_states_is_refused(tmp_path):
    """ZeRO 1/2 add the optimizer shards to the required files; the model states stay required."""
    path = _fake_checkpoint(tmp_path / "checkpoints", 2, world_size=2, zero_stage=1)
    marker = json.loads((path / C.MARKER).read_text())
    del marker["files"][C.MODEL_STATES]
    (path / C.MARKER).write_text(json.dumps(marker))
    (path / C.MODEL_STATES).unlink()
    with pytest.raises(C.CheckpointError, match=C.MODEL_STATES):
        C.validate_checkpoint(path)


def test_a_moved_aside_checkpoint_whose_replacement_was_sealed_is_removed(tmp_path):
    """Killed between sealing the replacement and deleting the old copy: the sealed one stays."""
    ckpt = tmp_path / "checkpoints"
    path = _fake_checkpoint(ckpt, 2, payload=b"new")
    (ckpt / trash_dir_name(path.name)).mkdir()
    assert C.remove_leftovers(ckpt) == [trash_dir_name(path.name)]
    C.validate_checkpoint(path)
    assert (path / C.MODEL_STATES).read_bytes() == b"new" * 100
