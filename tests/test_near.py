"""Near-distribution families: deterministic from the seed, MNIST- or FashionMNIST-like in range, ink and framing,
labels valid, train and test apart, homoglyphs measured out of glyphs, evaluation-only sets refused as OOD data, and
an undefended victim measurably less sure on every family than on its own test images."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
from conftest import DATA_ROOT, assert_one_line_error, has_raw, invoke
from tiny_data import write_dataset

from stages import prepare, train
from stages.data import prepared as _data
from stages.data import readers as _prepare_readers
from stages.data.near import glyphs
from stages.evaluation import family_confidence as confidence

DIGIT_LIKE = ("glyphs", "digits-transformed", "pen-strokes", "latin-letters")
GARMENT_LIKE = ("silhouettes", "garments-recombined", "garments-transformed")
DERIVED = {"digits-transformed": "MNIST", "garments-recombined": "FashionMNIST", "garments-transformed": "FashionMNIST"}
N = 300  # train images per generation (and N // 5 test)
_made: dict = {}


def make(name: str, seed: int = 0, n: int = N):
    """A family generated once per (name, seed, n) per test run."""
    if name in DERIVED and not has_raw(DERIVED[name]):
        pytest.skip(f"real {DERIVED[name]} not found under {DATA_ROOT}")
    key = (name, seed, n)
    if key not in _made:
        _made[key] = _prepare_readers.load(name, None, [DATA_ROOT], False, seed, limit=n)
    return _made[key]


def centre_of_mass(images: np.ndarray) -> np.ndarray:
    x = images[:, 0].astype(np.float64)
    ys, xs = np.mgrid[:28, :28]
    mass = x.sum((1, 2))
    return np.stack([(x * ys).sum((1, 2)) / mass, (x * xs).sum((1, 2)) / mass], 1)


@pytest.mark.parametrize("name", _prepare_readers.NEAR_DATASETS)
def test_same_seed_same_bytes_other_seed_other_images(name):
    a, c = make(name), make(name, seed=1)
    again = _prepare_readers.load(name, None, [DATA_ROOT], False, 0, limit=N)
    for split in ("train_images", "train_labels", "test_images", "test_labels"):
        assert getattr(again, split).tobytes() == getattr(a, split).tobytes(), split
    assert not np.array_equal(a.train_images, c.train_images)
    assert not np.array_equal(a.test_images, c.test_images)
    assert len(a.train_images) == N and len(a.test_images) == N // 5
    assert a.attrs["generator"] and a.attrs == again.attrs


@pytest.mark.parametrize("name", _prepare_readers.NEAR_DATASETS)
def test_images_and_labels_are_valid(name):
    raw = make(name)
    for images, labels in ((raw.train_images, raw.train_labels), (raw.test_images, raw.test_labels)):
        assert images.dtype == np.uint8 and images.shape[1:] == (1, 28, 28)
        peak = images.reshape(len(images), -1).max(1)
        assert (peak >= (200 if name in DIGIT_LIKE else 64)).all()  # no blank or faint image
        assert labels.min() >= 0 and labels.max() < len(raw.classes)
    assert set(np.unique(raw.train_labels)) == set(range(len(raw.classes)))


@pytest.mark.parametrize("name", DIGIT_LIKE)
def test_digit_families_are_framed_as_mnist(name):
    """MNIST's mean pixel is 0.131 and its centre of mass (14.0, 14.0), std 0.29 (measured on its train split)."""
    images = make(name).train_images
    assert 0.08 < images.mean() / 255 < 0.2
    com = centre_of_mass(images)
    assert np.abs(com.mean(0) - 14.0).max() < 0.3
    assert np.abs(com - 14.0).max() <= 2.0  # the +-1 pixel jitter plus rounding
    rows, cols = images[:, 0].any(2), images[:, 0].any(1)
    assert (np.maximum(rows.sum(1), cols.sum(1)) <= 24).all()  # the 20-pixel box plus anti-aliasing and blur


@pytest.mark.parametrize("name", GARMENT_LIKE)
def test_garment_families_fill_the_frame(name):
    """FashionMNIST's mean pixel is 0.286 and its products' longest side spans the 28 pixels."""
    images = make(name).train_images
    assert 0.15 < images.mean() / 255 < 0.45
    rows, cols = (images[:, 0] > 0).any(2), (images[:, 0] > 0).any(1)
    assert np.mean(np.maximum(rows.sum(1), cols.sum(1)) >= 27) > 0.95


@pytest.mark.parametrize("name", list(DERIVED))
def test_derived_families_share_no_image_across_splits(name):
    raw = make(name, n=2000)
    train = {hashlib.sha256(x.tobytes()).hexdigest() for x in raw.train_images}
    assert not any(hashlib.sha256(x.tobytes()).hexdigest() in train for x in raw.test_images)
    assert all(p.name.startswith(("train-", "t10k-")) for p in raw.files) and len(raw.files) == 4


def test_glyphs_exclude_latin_digits_and_their_homoglyphs():
    bank = glyphs.glyph_bank()
    assert not set(bank.chars) & set(glyphs.REFERENCES)
    # look-alikes everyone agrees on (Cyrillic, Greek) must be among those the measurement removed
    for char in "АВЕКМНОРСТХЗбаеорсхΟΙοΑΒΕΗΚΜΝΡΤΧ":
        assert char in bank.removed, char
    assert len(set(bank.removed)) > 400 and len(set(bank.chars)) > 1000
    sample = np.arange(0, len(bank.chars), 25)
    scores = glyphs.homoglyph_scores(
        [bank.chars[i] for i in sample], bank.fonts[sample], [bank.masks[i] for i in sample]
    )
    assert scores.max() <= glyphs.HOMOGLYPH_THRESHOLD and scores.mean() > 0.3  # measured, not vacuous
    test_chars = {bank.chars[i] for i in glyphs._split_chars(bank, np.random.default_rng(0))[1]}
    train_chars = {bank.chars[i] for i in glyphs._split_chars(bank, np.random.default_rng(0))[0]}
    assert not test_chars & train_chars and len(test_chars) > 0.15 * len(set(bank.chars))


def test_prepare_records_the_generator_fonts_and_evaluation_mark(tmp_path):
    for name, only in (("glyphs", False), ("latin-letters", True)):
        out = tmp_path / f"{name}.h5"
        result = invoke("prepare", "--dataset", name, "--limit", 100, "--seed", 3, "--out", out)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.strip() == str(out)
        with h5py.File(out) as f:
            assert bool(f.attrs["evaluation_only"]) is only
            assert int(f.attrs["seed"]) == 3 and "matplotlib" in f.attrs["generator"]
            assert f["train/images"].shape == (90, 1, 28, 28) and f["test/images"].shape == (20, 1, 28, 28)
            inputs = json.loads(f.attrs["inputs"])
        assert [p.name for p in glyphs.font_paths()] == [r["path"].split("/")[-1] for r in inputs]
        for record in inputs[:3]:
            with open(record["path"], "rb") as font:
                assert hashlib.sha256(font.read()).hexdigest() == record["sha256"]
    with h5py.File(tmp_path / "glyphs.h5") as f:
        assert f.attrs["homoglyph_threshold"] == glyphs.HOMOGLYPH_THRESHOLD
        assert len(f.attrs["homoglyphs_removed"]) == len(glyphs.glyph_bank().removed)


@pytest.fixture(scope="module")
def evaluation_only_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "letters.h5"
    prepare.run(dataset="latin-letters", out=out, limit=50)
    return out


@pytest.mark.parametrize("ood", ["latin-letters", "emnist-letters", "emnist-digits", "file", "generated,file"])
@pytest.mark.parametrize("stage", ["train-ini", "train"])
def test_evaluation_only_sets_are_refused_as_ood(stage, ood, evaluation_only_file, tiny, tmp_path):
    ood = ood.replace("file", str(evaluation_only_file))
    if stage == "train" and "," in ood:
        pytest.skip("outlier exposure takes one set")
    extra = ["--objective", "outlier-exposure"] if stage == "train" else []
    out = tmp_path / "v.h5"
    result = invoke(stage, "--dataset", tiny, "--ood", ood, "--epochs", 1, "--out", out, *extra)
    line = assert_one_line_error(result, code=1)
    assert "evaluation-only" in line and "--ood" in line
    assert not out.exists()


def test_a_renamed_copy_keeps_its_evaluation_mark(evaluation_only_file, tiny, tmp_path):
    copy = tmp_path / "innocent.h5"
    copy.write_bytes(evaluation_only_file.read_bytes())
    with h5py.File(copy, "r+") as f:
        f.attrs["name"] = "innocent"
    assert_one_line_error(invoke("train-ini", "--dataset", tiny, "--ood", copy, "--out", tmp_path / "v.h5"), code=1)
    plain = write_dataset(tmp_path / "plain.h5", name="plain")  # an ordinary set still passes the check

    _data.refuse_evaluation_only(str(plain), "--ood")


# ------------------------------------------------------------------------------------------------ not digits, measured


def _victim(tmp_path_factory, dataset: str) -> tuple:
    folder = tmp_path_factory.mktemp(dataset)
    data = prepare.run(dataset=dataset, out=folder / "data.h5", data_root=DATA_ROOT, limit=5000, val_size=500)
    torch.manual_seed(0)
    return train.run(dataset=str(data), out=folder / "victim.h5", epochs=1, batch_size=32, device="cpu"), folder


@pytest.mark.parametrize("dataset,families", [("mnist", DIGIT_LIKE), ("fashionmnist", GARMENT_LIKE)])
def test_an_undefended_victim_is_less_sure_on_every_family(dataset, families, tmp_path_factory, capsys):
    if not has_raw({"mnist": "MNIST", "fashionmnist": "FashionMNIST"}[dataset]):
        pytest.skip(f"real {dataset} not found under {DATA_ROOT}")
    victim, folder = _victim(tmp_path_factory, dataset)
    paths = [prepare.run(dataset=name, out=folder / f"{name}.h5", data_root=DATA_ROOT, limit=1000) for name in families]
    rows = confidence.table(victim, [str(p) for p in paths])
    with capsys.disabled():
        print(
            f"\nLeNet-5, 1 epoch (batch 32) on 4,500 {dataset} images; test splits (families: 200 images each)\n"
            + confidence.format_rows(rows)
        )
    own = rows[0]
    assert own["own"] and own["images"] == 1000 and own["mean_top"] > 0.5  # it learned (chance: 0.1)
    for row in rows[1:]:
        assert row["images"] == 200
        assert row["mean_top"] < own["mean_top"], row["dataset"]
        assert row["confident"] < own["confident"], row["dataset"]
