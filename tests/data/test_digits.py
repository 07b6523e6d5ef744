import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spnet_dist.data import digits as digits_mod
from spnet_dist.data.digits import MARKER, prepare_digits
from spnet_dist.data.folder import build_imagefolder


def listing(root: Path, split: str) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted((root / split).iterdir())}


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return prepare_digits(tmp_path_factory.mktemp("cache") / "digits", seed=0)


def test_layout_and_split_sizes(digits_root):
    train, val = listing(digits_root, "train"), listing(digits_root, "val")
    assert sorted(train) == sorted(val) == [str(d) for d in range(10)]
    n_train, n_val = sum(map(len, train.values())), sum(map(len, val.values()))
    # scikit-learn rounds the test share up: ceil(0.2 * 1797) = 360
    assert (n_train, n_val) == (1437, 360)
    # every one of the 1797 images exactly once across the splits (file name = sklearn index)
    names = [f for split in (train, val) for files in split.values() for f in files]
    assert sorted(names) == [f"{i:04d}.jpg" for i in range(1797)]
    # stratified: each class has ~20% of its images in val (classes hold 174..183 images)
    for d in map(str, range(10)):
        share = len(val[d]) / (len(val[d]) + len(train[d]))
        assert 0.18 < share < 0.22
    marker = json.loads((digits_root / MARKER).read_text())
    assert marker["seed"] == 0 and marker["counts"] == {"train": 1437, "val": 360}


def test_files_are_grey_32px_jpegs_of_the_right_digit(digits_root):
    from sklearn.datasets import load_digits
    digits = load_digits()
    path = next((digits_root / "val" / "3").iterdir())
    index = int(path.stem)
    assert digits.target[index] == 3
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.mode == "L" and image.size == (32, 32)
        # downscaled back to 8x8 it matches the source (0..16 scaled to 0..255) closely
        small = image.resize((8, 8), Image.Resampling.BOX)
    error = np.abs(np.asarray(small, dtype=float) - digits.images[index] * 255 / 16).mean()
    assert error < 25


def test_loads_as_imagefolder(digits_root):
    train, val = build_imagefolder(digits_root)
    assert train.classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797
    assert train.class_to_idx["7"] == 7  # folder name == label


def test_deterministic_per_seed(digits_root, tmp_path):
    same = prepare_digits(tmp_path / "same", seed=0)
    assert all_bytes(same) == all_bytes(digits_root)
    other = prepare_digits(tmp_path / "other", seed=1)
    assert listing(other, "val") != listing(digits_root, "val")
    assert sum(map(len, listing(other, "val").values())) == 360


def test_idempotent_second_call_writes_nothing(digits_root, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in digits_root.rglob("*")}

    def must_not_write(*args, **kwargs):
        raise AssertionError("cache rebuilt although complete")

    monkeypatch.setattr(digits_mod, "_write_digits", must_not_write)
    assert prepare_digits(digits_root, seed=0) == digits_root
    assert {p: p.stat().st_mtime_ns for p in digits_root.rglob("*")} == before


def test_incomplete_cache_and_leftover_temp_dir_are_rebuilt(tmp_path):
    target = tmp_path / "digits"
    # what a crash mid-write would leave: a temp tree next to the target, and a target without
    # its marker (e.g. copied by hand or written by an older, non-atomic version)
    leftover = tmp_path / ".digits.tmp-crashed"
    (leftover / "train" / "0").mkdir(parents=True)
    (leftover / "train" / "0" / "junk.jpg").write_bytes(b"junk")
    (target / "train" / "5").mkdir(parents=True)
    (target / "train" / "5" / "half.jpg").write_bytes(b"half")

    root = prepare_digits(target, seed=0)
    assert (root / MARKER).is_file()
    assert not (root / "train" / "5" / "half.jpg").exists()
    assert len(list(root.rglob("*.jpg"))) == 1797
    assert not leftover.exists()
    assert not list(tmp_path.glob(".digits.old-*")) and not list(tmp_path.glob(".digits.tmp-*"))


def test_different_seed_replaces_the_cache(tmp_path):
    target = prepare_digits(tmp_path / "d", seed=0)
    prepare_digits(target, seed=3)
    assert json.loads((target / MARKER).read_text())["seed"] == 3
    assert listing(target, "val") == listing(prepare_digits(tmp_path / "e", seed=3), "val")


def test_finished_concurrent_writer_wins(tmp_path, monkeypatch):
    """If a complete cache appears while we write (a writer that could not lock), keep it."""
    target = tmp_path / "digits"
    real_write = digits_mod._write_digits

    def write_and_let_another_rank_finish_first(out, seed, val_fraction):
        counts = real_write(out, seed, val_fraction)
        (target / "train").mkdir(parents=True)
        (target / "val").mkdir()
        wanted = {"version": digits_mod.DIGITS_CACHE_VERSION, "seed": seed, "val_fraction": val_fraction}
        (target / MARKER).write_text(json.dumps({**wanted, "winner": "other"}))
        return counts

    monkeypatch.setattr(digits_mod, "_write_digits", write_and_let_another_rank_finish_first)
    prepare_digits(target, seed=0)
    assert json.loads((target / MARKER).read_text())["winner"] == "other"
    assert not list(target.rglob("*.jpg"))  # ours was discarded, theirs untouched
    assert not list(tmp_path.glob(".digits.tmp-*"))


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    real_write = digits_mod._write_digits

    def counting_write(*args):
        calls.append(1)
        return real_write(*args)

    monkeypatch.setattr(digits_mod, "_write_digits", counting_write)
    results, errors = [], []

    def run():
        try:
            results.append(prepare_digits(tmp_path / "digits", seed=0))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert len(calls) == 1  # the others waited on the lock, then found the complete cache
    assert len(list(results[0].rglob("*.jpg"))) == 1797


def test_bad_val_fraction(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_digits(tmp_path / "d", val_fraction=1.0)
