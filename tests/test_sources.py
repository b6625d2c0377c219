"""Dataset readers: every raw format parsed from tiny files the tests write, the offline pools, convert()."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torchvision.datasets as tvd
from conftest import DATA_ROOT, has_raw
from PIL import Image

from models.params import UserError
from stages.data import raw as _raw_files
from stages.data import readers as _sources
from stages.data.readers import convert, load


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """IDX as LeCun wrote it: magic 0x0000 0x08 (uint8) <ndim>, big-endian dims, then the bytes."""
    data = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += np.ascontiguousarray(array, np.uint8).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def idx_arrays(
    rng: np.random.Generator,
    n_train: int = 12,
    n_test: int = 5,
    size: int = 28,
    classes: int = 10,
    first_label: int = 0,
) -> dict[str, np.ndarray]:
    return {
        "train-images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels": rng.integers(first_label, first_label + classes, n_train).astype(np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels": rng.integers(first_label, first_label + classes, n_test).astype(np.uint8),
    }


def write_mnist(folder: Path, arrays: dict[str, np.ndarray], gz: bool, prefix: str = "", test: str = "t10k") -> None:
    for part, array in arrays.items():
        kind = "idx3" if "images" in part else "idx1"
        write_idx(folder / f"{prefix}{part.replace('t10k', test)}-{kind}-ubyte", array, gz)


def check_raw(raw, n_train: int, n_test: int, shape: tuple[int, int, int], n_classes: int) -> None:
    assert raw.train_images.dtype == np.uint8 and raw.test_images.dtype == np.uint8
    assert raw.train_labels.dtype == np.int64 and raw.test_labels.dtype == np.int64
    assert raw.train_images.shape == (n_train, *shape)
    assert raw.test_images.shape == (n_test, *shape)
    assert raw.train_labels.shape == (n_train,) and raw.test_labels.shape == (n_test,)
    assert len(raw.classes) == n_classes
    for labels in (raw.train_labels, raw.test_labels):
        assert labels.min() >= 0 and labels.max() < n_classes


def test_registry_keys():
    assert list(_sources.DATASETS) == [
        "mnist",
        "fashionmnist",
        "kmnist",
        "emnist-letters",
        "emnist-digits",
        "cifar10",
        "cifar100",
        "svhn",
        "tinyimagenet",
        "sklearn-digits",
        "skimage-patches",
        "generated",
        *_sources.NEAR_DATASETS,
    ]
    assert set(_sources.OFFLINE_DATASETS) <= set(_sources.DATASETS)


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_mnist_idx_in_source_dir(tmp_path, gz):
    arrays = idx_arrays(np.random.default_rng(0))
    write_mnist(tmp_path, arrays, gz)
    raw = load("mnist", tmp_path, [], download=False, seed=0)
    check_raw(raw, 12, 5, (1, 28, 28), 10)
    np.testing.assert_array_equal(raw.train_images[:, 0], arrays["train-images"])
    np.testing.assert_array_equal(raw.test_labels, arrays["t10k-labels"])
    assert sorted(p.name for p in raw.files) == sorted(f"{n}{'.gz' if gz else ''}" for n in _raw_files.IDX_FILES)


def test_source_may_be_a_torchvision_root(tmp_path):
    arrays = idx_arrays(np.random.default_rng(1))
    write_mnist(tmp_path / "FashionMNIST" / "raw", arrays, gz=True)
    raw = load("fashionmnist", tmp_path, [], download=False, seed=0)
    np.testing.assert_array_equal(raw.train_labels, arrays["train-labels"])
    assert raw.classes == tvd.FashionMNIST.classes


def test_kmnist_from_data_roots_in_order(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    arrays = idx_arrays(np.random.default_rng(2))
    write_mnist(second / "KMNIST" / "raw", arrays, gz=False)
    write_mnist(first / "KMNIST" / "raw", {k: v[:3] for k, v in arrays.items()}, gz=True)
    raw = load("kmnist", None, [tmp_path / "missing", first, second], download=False, seed=0)
    check_raw(raw, 3, 3, (1, 28, 28), 10)  # the first root that holds every file wins
    assert all(first in p.parents for p in raw.files)


def test_debian_folder_is_searched(tmp_path, monkeypatch):
    arrays = idx_arrays(np.random.default_rng(3))
    write_mnist(tmp_path / "fashion-mnist", arrays, gz=True)
    monkeypatch.setitem(_raw_files.DEBIAN_DIRS, "fashionmnist", [tmp_path / "fashion-mnist"])
    raw = load("fashionmnist", None, [tmp_path / "empty-root"], download=False, seed=0)
    np.testing.assert_array_equal(raw.test_images[:, 0], arrays["t10k-images"])


def test_emnist_letters_are_transposed_and_shifted(tmp_path):
    arrays = idx_arrays(np.random.default_rng(4), classes=26, first_label=1)
    arrays["train-labels"][:2] = [1, 26]  # both ends of the 1..26 range
    write_mnist(tmp_path, arrays, gz=True, prefix="emnist-letters-", test="test")
    raw = load("emnist-letters", tmp_path, [], download=False, seed=0)
    check_raw(raw, 12, 5, (1, 28, 28), 26)
    np.testing.assert_array_equal(raw.train_images[:, 0], arrays["train-images"].transpose(0, 2, 1))
    np.testing.assert_array_equal(raw.train_labels, arrays["train-labels"].astype(np.int64) - 1)
    assert raw.classes[0] == "a" and raw.classes[-1] == "z"


def test_emnist_digits_from_torchvision_root(tmp_path):
    arrays = idx_arrays(np.random.default_rng(5))
    write_mnist(tmp_path / "EMNIST" / "raw", arrays, gz=False, prefix="emnist-digits-", test="test")
    raw = load("emnist-digits", None, [tmp_path], download=False, seed=0)
    np.testing.assert_array_equal(raw.test_images[:, 0], arrays["t10k-images"].transpose(0, 2, 1))
    np.testing.assert_array_equal(raw.test_labels, arrays["t10k-labels"])
    assert raw.classes == list("0123456789")


# ---------------------------------------------------------------------------------------------- CIFAR, SVHN


def dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_batch(rng: np.random.Generator, n: int, label_key: str, classes: int) -> dict:
    # The official batches: 'data' is (n, 3072) uint8, channel planes in row-major order; labels a list.
    return {
        "batch_label": "test batch",
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, classes, n).tolist(),
        "filenames": [f"{i}.png" for i in range(n)],
    }


def test_cifar10_pickle_batches(tmp_path):
    rng = np.random.default_rng(6)
    folder = tmp_path / "cifar-10-batches-py"
    batches = {f"data_batch_{i}": cifar_batch(rng, 4, "labels", 10) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(rng, 3, "labels", 10)
    for file_name, batch in batches.items():
        dump(folder / file_name, batch)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    raw = load("cifar10", tmp_path, [], download=False, seed=0)
    check_raw(raw, 20, 3, (3, 32, 32), 10)
    assert raw.classes == names
    first = batches["data_batch_1"]["data"][0]
    np.testing.assert_array_equal(raw.train_images[0, 1], first[1024:2048].reshape(32, 32))  # green plane
    np.testing.assert_array_equal(raw.train_labels[4:8], batches["data_batch_2"]["labels"])
    assert len(raw.files) == 7


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(7)
    dump(tmp_path / "train", cifar_batch(rng, 6, "fine_labels", 100) | {"coarse_labels": [0] * 6})
    dump(tmp_path / "test", cifar_batch(rng, 2, "fine_labels", 100) | {"coarse_labels": [0] * 2})
    dump(tmp_path / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20})
    raw = load("cifar100", tmp_path, [], download=False, seed=0)
    check_raw(raw, 6, 2, (3, 32, 32), 100)
    assert raw.classes[42] == "c42"


def test_svhn_mat(tmp_path):
    rng = np.random.default_rng(8)
    folder = tmp_path / "SVHN"
    folder.mkdir()
    stored = {}
    for split, n in (("train", 7), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # SVHN stores (H, W, C, N)
        y = np.array([[10], [1], [9], *([[5]] * (n - 3))], dtype=np.uint8)
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        stored[split] = x
    raw = load("svhn", None, [tmp_path], download=False, seed=0)
    check_raw(raw, 7, 3, (3, 32, 32), 10)
    assert raw.train_labels[:3].tolist() == [0, 1, 9]  # digit 0 is stored as 10
    np.testing.assert_array_equal(raw.test_images[2], stored["test"][..., 2].transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------- image folders


def save_image(path: Path, value: int, size: int = 64, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), (value,) * len(mode)).save(path)


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n")
    rows = []
    for label, wnid in enumerate(wnids):
        for i in range(3):  # the colour encodes the class, so the label mapping can be checked
            save_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 40 + 80 * label)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        save_image(root / "val" / "images" / f"val_{label}.JPEG", 40 + 80 * label)
        rows.append(f"val_{label}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(reversed(rows)) + "\n")
    save_image(root / "test" / "images" / "test_0.JPEG", 0)  # unlabelled: ignored
    raw = load("tinyimagenet", tmp_path, [], download=False, seed=0)
    check_raw(raw, 9, 3, (3, 64, 64), 3)
    assert raw.classes == ["goldfish", "European fire salamander", "n01641577"]
    for images, labels in ((raw.train_images, raw.train_labels), (raw.test_images, raw.test_labels)):
        np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 40 + 80 * labels, atol=3)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_generic_image_folder(tmp_path, mode):
    for label, name in enumerate(["cat", "dog"]):
        for i in range(10):
            save_image(tmp_path / name / f"{i}.png", 50 + 100 * label, size=20 + i, mode=mode)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    raw = load("tinyimagenet", tmp_path, [], download=False, seed=3)
    channels = 3 if mode == "RGB" else 1
    check_raw(raw, 16, 4, (channels, _sources.FOLDER_SIZE, _sources.FOLDER_SIZE), 2)  # sizes differ: resized
    assert raw.classes == ["cat", "dog"] and len(raw.files) == 20
    assert np.bincount(raw.test_labels).tolist() == [2, 2]  # stratified
    np.testing.assert_array_equal(raw.train_images[:, 0, 0, 0], 50 + 100 * raw.train_labels)
    again = load("tinyimagenet", tmp_path, [], download=False, seed=3)
    np.testing.assert_array_equal(again.train_labels, raw.train_labels)


def test_image_folder_with_train_and_test(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for label, name in enumerate(["a", "b"]):
            for i in range(n):
                save_image(tmp_path / split / name / f"{i}.jpg", 100 * label, size=16)
    raw = load("tinyimagenet", tmp_path, [], download=False, seed=0)
    check_raw(raw, 8, 4, (3, 16, 16), 2)  # one size everywhere: kept


# ---------------------------------------------------------------------------------------------- offline pools


@pytest.mark.parametrize(
    "name, shape, n_classes, minimum",
    [
        ("sklearn-digits", (1, 28, 28), 10, 1797),
        ("skimage-patches", (3, 32, 32), len(_sources.SKIMAGE_PHOTOS), 4000),
        ("generated", (3, 32, 32), len(_sources.GENERATORS), 7000),
    ],
)
def test_offline_pools(name, shape, n_classes, minimum):
    raw = load(name, None, [], download=False, seed=0)
    n_train, n_test = len(raw.train_labels), len(raw.test_labels)
    assert n_train + n_test >= minimum and n_test > 0
    check_raw(raw, n_train, n_test, shape, n_classes)
    assert raw.files == []
    assert set(np.unique(raw.train_labels)) == set(range(n_classes))
    assert raw.train_images.std() > 20  # real content, not a constant
    same, other = load(name, None, [], False, seed=0), load(name, None, [], False, seed=1)
    np.testing.assert_array_equal(same.train_images, raw.train_images)
    np.testing.assert_array_equal(same.test_labels, raw.test_labels)
    assert not np.array_equal(other.train_images, raw.train_images)


def test_generated_sizes_and_balance():
    raw = load("generated", None, [], download=False, seed=0)
    assert len(raw.train_labels) == _sources.GENERATED_TRAIN and len(raw.test_labels) == _sources.GENERATED_TEST
    assert len(raw.classes) >= 6
    assert len(set(np.bincount(raw.train_labels).tolist())) == 1


def test_offline_pool_rejects_source(tmp_path):
    with pytest.raises(UserError, match="built in"):
        load("generated", tmp_path, [], download=False, seed=0)


# ---------------------------------------------------------------------------------------------- convert


def test_convert_shapes_and_channels():
    rng = np.random.default_rng(9)
    gray = rng.integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    rgb = convert(gray, 32, 3)
    assert rgb.shape == (5, 3, 32, 32) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, 0], rgb[:, 2])  # replicated
    assert convert(gray, None, None) is gray
    np.testing.assert_array_equal(convert(gray, None, 3)[:, 1:2], gray)

    colour = rng.integers(0, 256, (7, 3, 64, 64), dtype=np.uint8)
    small = convert(colour, 16, 1)
    assert small.shape == (7, 1, 16, 16) and small.dtype == np.uint8
    luma = convert(colour, None, 1)[:, 0].astype(float)
    expected = np.tensordot([0.299, 0.587, 0.114], colour.astype(float), axes=([0], [1]))
    assert np.abs(luma - expected).max() <= 0.51
    np.testing.assert_array_equal(convert(colour, 16, 1, chunk=3), small)  # chunking changes nothing


def test_convert_keeps_constant_images_exact():
    flat = np.full((2, 3, 40, 40), 77, np.uint8)
    assert (convert(flat, 28, None) == 77).all() and (convert(flat, 56, 1) == 77).all()


# ---------------------------------------------------------------------------------------------- errors


def one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_unknown_dataset_lists_choices():
    message = one_line_error(lambda: load("imagenet", None, [], download=False, seed=0))
    assert "imagenet" in message and all(name in message for name in _sources.DATASETS)


def test_missing_files_say_what_to_put_where(tmp_path):
    message = one_line_error(lambda: load("mnist", None, [tmp_path], download=False, seed=0))
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "MNIST" / "raw") in message
    message = one_line_error(lambda: load("cifar10", tmp_path, [], download=False, seed=0))
    assert "data_batch_1" in message and str(tmp_path) in message
    message = one_line_error(lambda: load("tinyimagenet", None, [tmp_path], download=False, seed=0))
    assert "tiny-imagenet-200" in message
    message = one_line_error(lambda: load("svhn", tmp_path / "nowhere", [], download=False, seed=0))
    assert "not a folder" in message


def test_truncated_file_is_one_line(tmp_path):
    write_mnist(tmp_path, idx_arrays(np.random.default_rng(10)), gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    message = one_line_error(lambda: load("mnist", tmp_path, [], download=False, seed=0))
    assert "train-images-idx3-ubyte" in message


def test_failed_download_becomes_put_files_here(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("Name or service not known")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    message = one_line_error(lambda: load("mnist", None, [tmp_path], download=True, seed=0))
    assert "download failed" in message and str(tmp_path / "MNIST" / "raw") in message


def test_download_lands_in_first_data_root(tmp_path, monkeypatch):
    arrays = idx_arrays(np.random.default_rng(11))

    def fake_download(self):  # what torchvision leaves behind: .gz and the extracted files in raw/
        write_mnist(Path(self.raw_folder), arrays, gz=False)

    monkeypatch.setattr(tvd.MNIST, "download", fake_download)
    raw = load("mnist", None, [tmp_path / "root", tmp_path / "other"], download=True, seed=0)
    np.testing.assert_array_equal(raw.train_labels, arrays["train-labels"])
    assert all((tmp_path / "root" / "MNIST" / "raw") in p.parents for p in raw.files)


# ---------------------------------------------------------------------------------------------- real offline data


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_real_offline_data(name, folder):
    if not has_raw(folder):
        pytest.skip(f"no {DATA_ROOT / folder / 'raw'}")
    raw = load(name, None, [DATA_ROOT], download=False, seed=0)
    check_raw(raw, 60000, 10000, (1, 28, 28), 10)
    assert np.bincount(raw.train_labels).min() > 5000
    assert len(raw.files) == 4 and all(p.is_file() for p in raw.files)
