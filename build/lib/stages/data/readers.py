"""Dataset readers behind `prepare`: torchvision's raw formats, image folders, and three offline pools.

Every loader returns a RawDataset of uint8 (N, C, H, W) images and int64 labels. Raw files are looked for in
--source, then the data roots (torchvision's layout), then Debian's dataset folders; torchvision downloads
only when allowed. sklearn-digits, skimage-patches and generated need no files at all.
"""

from __future__ import annotations

import pickle
import string
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.datasets.mnist import read_image_file, read_label_file

from models.params import UserError
from stages.data.raw import (
    RawDataset,
    download_into,
    load_mnist_like,
    locate,
    one_line,
    raw_dataset,
    read_idx,
    reading,
    split_stratified,
)

# Near-distribution families (stages/data/near): generated, or derived from MNIST / FashionMNIST's raw files.
NEAR_DATASETS = (
    "glyphs",
    "digits-transformed",
    "pen-strokes",
    "latin-letters",
    "silhouettes",
    "garments-recombined",
    "garments-transformed",
)
# Pools that need no file and no network: the CLI's safe choices on an offline machine.
OFFLINE_DATASETS = (
    "sklearn-digits",
    "skimage-patches",
    "generated",
    "glyphs",
    "pen-strokes",
    "latin-letters",
    "silhouettes",
)
# Sets a thief of a digit classifier would most likely query with: measured against, never trained on (no OOD set,
# no outlier exposure); their artifacts carry evaluation_only = true.
EVALUATION_ONLY = ("latin-letters", "emnist-letters", "emnist-digits")

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER_SIZE = 64  # an image folder whose images differ in size is resized to this

# Photographs scikit-image ships inside its wheel (the others need pooch and the network). Synthetic
# images (checkerboard, logo, colorwheel, horse, phantom) are left out: the pool stands for natural images.
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "stereo_motorcycle",
    "text",
)
PATCH = 32
MAX_PATCHES_PER_PHOTO = 600  # retina alone has ~1,900 patches; the cap keeps classes comparable
FLAT_PATCH_STD = 2.0  # patches this flat are background (black sky, fundus border) and carry no class

GENERATED_TRAIN, GENERATED_TEST, GENERATED_SIZE = 6000, 1000, 32


def load_emnist(
    name: str, split: str, source: Path | None, data_roots: list[Path], download: bool, seed: int
) -> RawDataset:
    """EMNIST 'letters' or 'digits': IDX files named emnist-<split>-{train,test}-{images,labels}-idx?-ubyte."""
    names = [
        f"emnist-{split}-{part}"
        for part in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "test-images-idx3-ubyte",
            "test-labels-idx1-ubyte",
        )
    ]
    fetch = lambda root: tvd.EMNIST(str(root), split=split, train=True, download=True)  # noqa: E731
    # NIST's own archive unpacks to gzip/; accept that folder as well as torchvision's EMNIST/raw/.
    files = locate(
        name, names, source, data_roots, download, "EMNIST/raw", fetch, extra_layouts=("gzip",), gzipped=True
    )
    train_x, train_y, test_x, test_y = (
        read_idx(name, files[n], read_image_file if "images" in n else read_label_file) for n in names
    )
    # EMNIST stores each image column-major (transposed); torchvision 0.29.1 returns them as stored, so
    # its images look mirrored and rotated. Transposing the last two axes gives upright characters.
    train_x, test_x = train_x.transpose(0, 2, 1), test_x.transpose(0, 2, 1)
    classes = list(tvd.EMNIST.classes_split_dict[split])
    if split == "letters":
        # Letters are labelled 1..26 (torchvision keeps an 'N/A' class 0 that never occurs); shift to 0..25.
        train_y, test_y, classes = train_y - 1, test_y - 1, classes[1:]
    return raw_dataset(name, train_x[:, None], train_y, test_x[:, None], test_y, classes, files.values())


# ---------------------------------------------------------------------------------------------- CIFAR, SVHN


class _ArraysOnly(pickle.Unpickler):
    """CIFAR batches hold dicts, lists, strings and numpy arrays; any other global could run code, so refuse it."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: not array data (a pickle that could run code)")
        return super().find_class(module, name)


def _read_pickle(name: str, path: Path) -> dict:
    with reading(name, path), open(path, "rb") as f:
        # latin1, as torchvision does: the batches were pickled by Python 2.
        return _ArraysOnly(f, encoding="latin1").load()


def load_cifar(
    name: str, dataset_cls: type, source: Path | None, data_roots: list[Path], download: bool, seed: int
) -> RawDataset:
    """CIFAR-10/100 python batches (torchvision's cifar-10-batches-py/ or cifar-100-python/ folder)."""
    train_names = [n for n, _ in dataset_cls.train_list]
    test_names = [n for n, _ in dataset_cls.test_list]
    meta_name = dataset_cls.meta["filename"]
    fetch = lambda root: dataset_cls(str(root), train=True, download=True)  # noqa: E731
    # Our own read, not dataset_cls(root): its md5 check would refuse any file but the official ones.
    files = locate(
        name, train_names + test_names + [meta_name], source, data_roots, download, dataset_cls.base_folder, fetch
    )

    def read(batch_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for batch_name in batch_names:
            entry = _read_pickle(name, files[batch_name])
            with reading(name, files[batch_name]):
                images.append(np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        return np.concatenate(images), np.asarray(labels)

    train_x, train_y = read(train_names)
    test_x, test_y = read(test_names)
    with reading(name, files[meta_name]):
        classes = _read_pickle(name, files[meta_name])[dataset_cls.meta["key"]]
    return raw_dataset(name, train_x, train_y, test_x, test_y, classes, files.values())


def load_svhn(name: str, source: Path | None, data_roots: list[Path], download: bool, seed: int) -> RawDataset:
    """SVHN cropped digits: train_32x32.mat and test_32x32.mat, read with scipy as torchvision does."""
    import scipy.io  # only this loader needs scipy's import time

    names = [tvd.SVHN.split_list[split][1] for split in ("train", "test")]

    def fetch(root: Path) -> None:
        for split in ("train", "test"):
            tvd.SVHN(str(root / "SVHN"), split=split, download=True)

    # torchvision's SVHN root holds the .mat files directly; downloads here go to <root>/SVHN/.
    files = locate(name, names, source, data_roots, download, "SVHN", fetch, extra_layouts=("",))
    arrays = []
    for file_name in names:
        with reading(name, files[file_name]):
            mat = scipy.io.loadmat(files[file_name])
            labels = mat["y"].astype(np.int64).reshape(-1)
            labels[labels == 10] = 0  # SVHN labels digit 0 as 10
            arrays += [np.transpose(mat["X"], (3, 2, 0, 1)), labels]  # (H, W, C, N) -> (N, C, H, W)
    return raw_dataset(name, *arrays, list(string.digits), files.values())


# ---------------------------------------------------------------------------------------------- image folders


def _read_images(name: str, paths: list[Path], size: int | None) -> np.ndarray:
    """Decode with PIL to one uint8 NCHW array: gray stays 1 channel only if every image is gray."""
    headers = []
    for path in paths:
        with reading(name, path), Image.open(path) as image:
            headers.append((image.mode, image.size))
    mode = "L" if all(m in ("1", "L", "I", "I;16") for m, _ in headers) else "RGB"
    if size is None and len({s for _, s in headers}) > 1:
        size = FOLDER_SIZE
    images = []
    for path in paths:
        with reading(name, path), Image.open(path) as image:
            image = image.convert(mode)
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            images.append(np.asarray(image))
    stacked = np.stack(images)
    return stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2)


def _tiny_imagenet(name: str, root: Path) -> RawDataset:
    """tiny-imagenet-200/: train/<wnid>/images/*.JPEG, and val/images/ labelled by val/val_annotations.txt.

    Its test/ folder is unlabelled, so val serves as the test split.
    """
    wnids, class_to_idx = find_classes(root / "train")
    train = make_dataset(str(root / "train"), class_to_idx, extensions=IMG_EXTENSIONS)
    annotations = root / "val" / "val_annotations.txt"
    with reading(name, annotations):
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        val = [(str(root / "val" / "images" / row[0]), class_to_idx[row[1]]) for row in rows]
    words_file = root / "words.txt"
    words = {}
    if words_file.is_file():
        for line in words_file.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    classes = [words.get(wnid, wnid) for wnid in wnids]
    train_paths, val_paths = [Path(p) for p, _ in train], [Path(p) for p, _ in val]
    return raw_dataset(
        name,
        _read_images(name, train_paths, 64),
        [c for _, c in train],
        _read_images(name, val_paths, 64),
        [c for _, c in val],
        classes,
        train_paths + val_paths + [annotations],
    )


def _image_folder(name: str, root: Path, seed: int) -> RawDataset:
    """<root>/<class>/*.png|jpg, or <root>/train/<class>/ with <root>/test/ (or val/); else split by seed."""
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    splits = [root / "train", test_dir] if (root / "train").is_dir() and test_dir else [root]
    with reading(name, root):
        classes, class_to_idx = find_classes(splits[0])
        samples = [make_dataset(str(d), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True) for d in splits]
    if not samples[0]:
        raise UserError(f"{name}: no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of {splits[0]}")
    all_paths = [Path(p) for split in samples for p, _ in split]
    images = _read_images(name, all_paths, None)
    labels = np.asarray([c for split in samples for _, c in split])
    if len(splits) == 2:
        n = len(samples[0])
        return raw_dataset(name, images[:n], labels[:n], images[n:], labels[n:], classes, all_paths)
    return raw_dataset(name, *split_stratified(images, labels, seed), classes, all_paths)


def load_tinyimagenet(name: str, source: Path | None, data_roots: list[Path], download: bool, seed: int) -> RawDataset:
    """Tiny ImageNet (64x64, 200 classes, val as test), or any ImageNet-style folder given as --source."""

    def is_tiny(folder: Path) -> bool:
        return (folder / "train").is_dir() and (folder / "val" / "val_annotations.txt").is_file()

    candidates = [source, source / "tiny-imagenet-200"] if source else [r / "tiny-imagenet-200" for r in data_roots]
    for folder in candidates:
        if is_tiny(folder):
            return _tiny_imagenet(name, folder)
    if source is not None and any(p.is_dir() for p in source.iterdir()):
        return _image_folder(name, source, seed)
    why = ""
    if source is None and download:
        fetch = lambda root: tvd.utils.download_and_extract_archive(  # noqa: E731
            TINY_IMAGENET_URL, download_root=str(root), md5=TINY_IMAGENET_MD5
        )
        why = download_into(name, data_roots, fetch)
        if data_roots and is_tiny(data_roots[0] / "tiny-imagenet-200"):
            return _tiny_imagenet(name, data_roots[0] / "tiny-imagenet-200")
        why = f" (download failed: {why})" if why else ""
    root = source or (data_roots[0] if data_roots else Path("<data root>"))
    raise UserError(
        f"{name}: no images found{why}; unzip tiny-imagenet-200.zip under {root}/ (train/<wnid>/images/, "
        f"val/val_annotations.txt) or pass --source DIR with one folder of images per class"
    )


# ---------------------------------------------------------------------------------------------- offline pools


def load_sklearn_digits(name: str, seed: int, **_) -> RawDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16), upsampled to 28x28 like MNIST."""
    from sklearn.datasets import load_digits  # only this pool needs scikit-learn's import time

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    images = convert(images, 28, None)
    return raw_dataset(name, *split_stratified(images, digits.target, seed), list(string.digits), [])


def _photo(photo: str) -> np.ndarray:
    import skimage.data
    from skimage.util import img_as_ubyte

    image = getattr(skimage.data, photo)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    image = img_as_ubyte(image)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def load_skimage_patches(name: str, seed: int, **_) -> RawDataset:
    """32x32 RGB patches of scikit-image's sample photographs; the label is the photo a patch comes from."""
    images, labels = [], []
    for label, photo in enumerate(SKIMAGE_PHOTOS):
        try:
            image = _photo(photo)
        except Exception as e:  # noqa: BLE001 - a build of scikit-image without its sample data
            raise UserError(f"{name}: scikit-image cannot load its sample photo {photo!r}: {one_line(e)}") from None
        rows, cols = image.shape[0] // PATCH, image.shape[1] // PATCH
        # Non-overlapping grid, so no pixel is shared between a train and a test patch.
        patches = (
            image[: rows * PATCH, : cols * PATCH]
            .reshape(rows, PATCH, cols, PATCH, 3)
            .transpose(0, 2, 4, 1, 3)
            .reshape(-1, 3, PATCH, PATCH)
        )
        patches = patches[patches.reshape(len(patches), -1).std(axis=1) >= FLAT_PATCH_STD]
        if len(patches) > MAX_PATCHES_PER_PHOTO:  # evenly spaced, so the kept ones still cover the photo
            patches = patches[np.linspace(0, len(patches) - 1, MAX_PATCHES_PER_PHOTO).round().astype(int)]
        images.append(patches)
        labels.append(np.full(len(patches), label))
    return raw_dataset(
        name, *split_stratified(np.concatenate(images), np.concatenate(labels), seed), SKIMAGE_PHOTOS, []
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], shaped to broadcast against (n, 1, H, W)."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return axis[None, None, None, :], axis[None, None, :, None]


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random((n, 3, 1, 1), dtype=np.float32)


def _two_tone(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Paint a [0, 1] mask (n, 1, H, W) with a random foreground over a random background colour."""
    n = len(mask)
    return _colours(rng, n) * mask + _colours(rng, n) * (1 - mask)


def _noise_uniform(rng, n, size):
    return rng.random((n, 3, size, size), dtype=np.float32)


def _noise_gaussian_blur(rng, n, size):
    # Low-passed white noise: a Gaussian filter applied in Fourier space, one random width per image.
    noise = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    sigma = rng.uniform(0.7, 3.0, (n, 1, 1, 1))
    gain = np.exp(-2 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    blurred = np.fft.irfft2(np.fft.rfft2(noise) * gain, s=(size, size))
    low, high = blurred.min(axis=(1, 2, 3), keepdims=True), blurred.max(axis=(1, 2, 3), keepdims=True)
    return ((blurred - low) / (high - low + 1e-8)).astype(np.float32)


def _rotated(rng, n, size, cx=0.0, cy=0.0):
    """Pixel coordinates relative to (cx, cy), turned by a random angle per image."""
    x, y = _grid(size)
    x, y = x - cx, y - cy
    angle = rng.uniform(0, np.pi, (n, 1, 1, 1)).astype(np.float32)
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def _stripes(rng, n, size):
    u, _ = _rotated(rng, n, size)
    frequency = rng.uniform(2, 8, (n, 1, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1)).astype(np.float32)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * u + phase)
    hard = rng.random((n, 1, 1, 1)) < 0.5  # half square waves, half sine gratings
    return _two_tone(rng, np.where(hard, wave > 0.5, wave).astype(np.float32))


def _checkerboard(rng, n, size):
    u, v = _rotated(rng, n, size)
    squares = rng.integers(2, 9, (n, 1, 1, 1)).astype(np.float32)
    mask = (np.floor(u * squares) + np.floor(v * squares)) % 2
    return _two_tone(rng, mask.astype(np.float32))


def _blobs(rng, n, size, k=5):
    x, y = _grid(size)
    cx, cy = rng.random((n, k, 1, 1), dtype=np.float32), rng.random((n, k, 1, 1), dtype=np.float32)
    sigma = rng.uniform(0.05, 0.2, (n, k, 1, 1)).astype(np.float32)
    bumps = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))  # (n, k, H, W)
    colours = rng.random((n, k, 3), dtype=np.float32)
    image = _colours(rng, n) * 0.5 + np.einsum("nkhw,nkc->nchw", bumps, colours)
    return np.clip(image, 0, 1)


def _strokes(rng, n, size, k=3):
    x, y = _grid(size)
    image = np.broadcast_to(_colours(rng, n), (n, 3, size, size)).copy()
    for _ in range(k):
        a, b = rng.random((2, n, 2, 1, 1), dtype=np.float32)
        width = rng.uniform(0.5, 2.5, (n, 1, 1, 1)).astype(np.float32) / size
        # Distance of every pixel to the segment a-b: project onto it, clamp to its ends.
        dx, dy = b[:, :1] - a[:, :1], b[:, 1:] - a[:, 1:]
        t = np.clip(((x - a[:, :1]) * dx + (y - a[:, 1:]) * dy) / (dx**2 + dy**2 + 1e-8), 0, 1)
        distance = np.hypot(x - a[:, :1] - t * dx, y - a[:, 1:] - t * dy)
        ink = np.clip((width - distance) * size + 0.5, 0, 1)  # one pixel of anti-aliased edge
        image = image * (1 - ink) + _colours(rng, n) * ink
    return image


def _shapes(rng, n, size):
    x, y = _grid(size)
    cx, cy = rng.uniform(0.3, 0.7, (2, n, 1, 1, 1)).astype(np.float32)
    radius = rng.uniform(0.12, 0.35, (n, 1, 1, 1)).astype(np.float32)
    circle = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
    u, v = _rotated(rng, n, size, cx, cy)
    rectangle = (np.abs(u) < radius) & (np.abs(v) < radius * rng.uniform(0.4, 1.0, (n, 1, 1, 1)))
    # Triangle: corners on the circle, about 120 degrees apart; a pixel is inside when it lies on the
    # same side of all three edges.
    turn = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1)) + np.arange(3).reshape(3, 1, 1, 1, 1) * 2 * np.pi / 3
    turn = (turn + rng.uniform(-0.4, 0.4, turn.shape)).astype(np.float32)
    px, py = cx + radius * np.cos(turn), cy + radius * np.sin(turn)  # (3, n, 1, 1, 1)
    sides = np.stack(
        [(px[j] - px[i]) * (y - py[i]) - (py[j] - py[i]) * (x - px[i]) for i, j in ((0, 1), (1, 2), (2, 0))]
    )
    triangle = (sides >= 0).all(axis=0) | (sides <= 0).all(axis=0)
    kind = rng.integers(0, 3, (n, 1, 1, 1))
    mask = np.where(kind == 0, circle, np.where(kind == 1, rectangle, triangle))
    return _two_tone(rng, mask.astype(np.float32))


def _gradients(rng, n, size):
    x, y = _grid(size)
    u, _ = _rotated(rng, n, size)
    linear = (u - u.min(axis=(2, 3), keepdims=True)) / (np.ptp(u, axis=(2, 3), keepdims=True) + 1e-8)
    cx, cy = rng.random((2, n, 1, 1, 1), dtype=np.float32)
    radial = np.clip(np.hypot(x - cx, y - cy) / rng.uniform(0.4, 1.2, (n, 1, 1, 1)), 0, 1)
    mask = np.where(rng.random((n, 1, 1, 1)) < 0.5, linear, radial)
    return _two_tone(rng, mask.astype(np.float32))


# Procedural families: the label is the family, so the pool is also a (synthetic) classification task.
GENERATORS = {
    "noise-uniform": _noise_uniform,
    "noise-gaussian-blur": _noise_gaussian_blur,
    "stripes": _stripes,
    "checkerboard": _checkerboard,
    "blobs": _blobs,
    "strokes": _strokes,
    "shapes": _shapes,
    "gradients": _gradients,
}


def load_generated(name: str, seed: int, **_) -> RawDataset:
    """GENERATED_TRAIN + GENERATED_TEST procedural RGB images, equal per family, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    per_train, per_test = GENERATED_TRAIN // len(GENERATORS), GENERATED_TEST // len(GENERATORS)
    parts = []
    for label, generate in enumerate(GENERATORS.values()):
        images = np.round(generate(rng, per_train + per_test, GENERATED_SIZE) * 255).astype(np.uint8)
        parts.append((images, np.full(len(images), label)))
    train_x = np.concatenate([x[:per_train] for x, _ in parts])
    train_y = np.concatenate([y[:per_train] for _, y in parts])
    test_x = np.concatenate([x[per_train:] for x, _ in parts])
    test_y = np.concatenate([y[per_train:] for _, y in parts])
    train_order, test_order = rng.permutation(len(train_y)), rng.permutation(len(test_y))
    return raw_dataset(
        name, train_x[train_order], train_y[train_order], test_x[test_order], test_y[test_order], list(GENERATORS), []
    )


def load_near(
    name: str, source: Path | None, data_roots: list[Path], download: bool, seed: int, limit: int | None = None
) -> RawDataset:
    """A near-distribution family; `limit` makes only that many train images (limit // 5 test)."""
    from stages.data import near  # imports matplotlib and the family generators: only when asked for

    return near.load(name, source, data_roots, download, seed, limit)


# ---------------------------------------------------------------------------------------------- registry


DATASETS: dict[str, Callable[..., RawDataset]] = {
    "mnist": partial(load_mnist_like, "mnist", tvd.MNIST),
    "fashionmnist": partial(load_mnist_like, "fashionmnist", tvd.FashionMNIST),
    "kmnist": partial(load_mnist_like, "kmnist", tvd.KMNIST),
    "emnist-letters": partial(load_emnist, "emnist-letters", "letters"),
    "emnist-digits": partial(load_emnist, "emnist-digits", "digits"),
    "cifar10": partial(load_cifar, "cifar10", tvd.CIFAR10),
    "cifar100": partial(load_cifar, "cifar100", tvd.CIFAR100),
    "svhn": partial(load_svhn, "svhn"),
    "tinyimagenet": partial(load_tinyimagenet, "tinyimagenet"),
    "sklearn-digits": partial(load_sklearn_digits, "sklearn-digits"),
    "skimage-patches": partial(load_skimage_patches, "skimage-patches"),
    "generated": partial(load_generated, "generated"),
    **{name: partial(load_near, name) for name in NEAR_DATASETS},
}


def load(
    name: str, source: Path | None, data_roots: list[Path], download: bool, seed: int, limit: int | None = None
) -> RawDataset:
    """Read dataset `name` into memory; every failure is a one-line UserError saying what to do. Generated families
    make only `limit` train images when given (others are cut by `prepare`)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if source is not None:
        source = Path(source).expanduser()
        if name in OFFLINE_DATASETS:
            raise UserError(f"{name} is built in and reads no files; drop --source")
        if not source.is_dir():
            raise UserError(f"{name}: --source {source} is not a folder")
    sized = {"limit": limit} if name in NEAR_DATASETS else {}
    raw = DATASETS[name](
        source=source, data_roots=[Path(r).expanduser() for r in data_roots], download=download, seed=seed, **sized
    )
    for split, images, labels in (
        ("train", raw.train_images, raw.train_labels),
        ("test", raw.test_images, raw.test_labels),
    ):
        if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) != len(labels):
            raise UserError(f"{name}: {split} has images {images.shape} and {len(labels)} labels; files inconsistent")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(raw.classes)):
            raise UserError(f"{name}: {split} labels outside 0..{len(raw.classes) - 1}; files corrupt or mislabelled")
    return raw


LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R BT.601, as PIL's convert("L")


def convert(images: np.ndarray, size: int | None, channels: int | None, chunk: int = 4096) -> np.ndarray:
    """Resize uint8 NCHW images to size x size (bilinear, antialiased when shrinking) and/or to 1 or 3 channels."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, 1|3, H, W) images, got {images.dtype} {images.shape}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    n, c, h, w = images.shape
    out_c = channels or c
    out_h, out_w = (size, size) if size else (h, w)
    if (out_c, out_h, out_w) == (c, h, w):
        return images
    out = np.empty((n, out_c, out_h, out_w), np.uint8)
    for start in range(0, n, chunk):  # chunks bound the float32 copy (60k x 3 x 64 x 64 would be 3 GB)
        x = torch.from_numpy(images[start : start + chunk]).float()
        if c == 3 and out_c == 1:  # before resizing: a third of the pixels to interpolate
            x = (x * LUMA).sum(dim=1, keepdim=True)
        if (out_h, out_w) != (h, w):
            x = F.interpolate(
                x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=out_h < h or out_w < w
            )
        if c == 1 and out_c == 3:
            x = x.expand(-1, 3, -1, -1)
        out[start : start + len(x)] = x.round().clamp(0, 255).to(torch.uint8).numpy()
    return out
