"""Prepared datasets: written from raw files by `prepare` (or on first use of a dataset name), read back as
in-memory tensors, validated, converted to a victim's input shape, batched and augmented."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from models.params import UserError
from stages.core.artifacts import attr_json, check_memory, open_artifact, prepare_output, sha256, write_artifact

SPLITS = ("train", "val", "test")
DATA_ROOT = Path("data")  # torchvision-style root searched first for raw files, and where downloads go

# Normalisation constants of the paper's code; other datasets get theirs measured on the train split.
MNIST_FAMILY = ((0.1307,), (0.3081,))
CIFAR_FAMILY = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
KNOWN_NORMALISATION = {
    "mnist": MNIST_FAMILY,
    "fashionmnist": MNIST_FAMILY,
    "kmnist": MNIST_FAMILY,
    "emnist-letters": MNIST_FAMILY,
    "emnist-digits": MNIST_FAMILY,
    "cifar10": CIFAR_FAMILY,
    "cifar100": CIFAR_FAMILY,
}

console = Console(stderr=True)


@dataclass
class Dataset:
    path: Path
    sha256: str
    name: str
    classes: list[str]
    mean: list[float]
    std: list[float]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # uint8 (N, C, H, W), int64 (N,)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(next(iter(self.splits.values()))[0].shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------- writing


def names() -> tuple[str, ...]:
    """Every dataset name `prepare` knows."""
    from stages.data import readers

    return tuple(readers.DATASETS)


def default_path(dataset: str) -> Path:
    return Path("artifacts") / "data" / f"{dataset}.h5"


def default_data_roots(data_root: Path) -> list[Path]:
    """Where raw files are looked for: the given root, then $INI_DATA_ROOT (a machine's offline copy)."""
    roots = [data_root]
    if os.environ.get("INI_DATA_ROOT"):
        roots.append(Path(os.environ["INI_DATA_ROOT"]))
    return roots


def _normalisation(name: str, images: np.ndarray) -> tuple[list[float], list[float]]:
    channels = images.shape[1]
    if name in KNOWN_NORMALISATION:
        mean, std = KNOWN_NORMALISATION[name]
        if len(mean) == channels:
            return list(mean), list(std)
        # Converted gray<->RGB: the luminance-matched constant per channel.
        m, s = float(np.mean(mean)), float(np.mean(std))
        return [m] * channels, [s] * channels
    sample = images[: min(len(images), 20000)].astype(np.float64) / 255.0
    mean = sample.mean(axis=(0, 2, 3))
    std = np.maximum(sample.std(axis=(0, 2, 3)), 1e-3)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def prepare(
    dataset: str,
    out: Optional[Path] = None,
    *,
    source: Optional[Path] = None,
    data_root: Path = DATA_ROOT,
    download: bool = True,
    val_size: Optional[int] = None,
    size: Optional[int] = None,
    channels: Optional[int] = None,
    limit: Optional[int] = None,
    seed: int = 0,
) -> Path:
    """Read `dataset` from raw files (or torchvision's download) and write it as one `dataset/1` file with train /
    val / test splits (val carved from train with `seed`); print a table of the splits. `prepare`'s flags."""
    from stages.data import readers

    started = time.time()
    if dataset not in readers.DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(readers.DATASETS)}")
    if channels == 2:
        raise UserError("--channels must be 1 (gray) or 3 (RGB)")
    out = prepare_output(out or default_path(dataset))
    raw = readers.load(dataset, source, default_data_roots(data_root), download, seed, limit)

    train_x, train_y, test_x, test_y = raw.train_images, raw.train_labels, raw.test_images, raw.test_labels
    if limit is not None:
        train_x, train_y = train_x[:limit], train_y[:limit]
        test_x, test_y = test_x[: max(1, limit // 5)], test_y[: max(1, limit // 5)]
    shape = (channels or train_x.shape[1], size or train_x.shape[2], size or train_x.shape[3])
    # The converted arrays plus the split copies taken from them below.
    check_memory(
        2 * (len(train_x) + len(test_x)) * int(np.prod(shape)),
        f"preparing {len(train_x) + len(test_x):,} {dataset} images of {'x'.join(map(str, shape))}",
    )
    if size is not None or channels is not None:
        train_x = readers.convert(train_x, size, channels)
        test_x = readers.convert(test_x, size, channels)

    n_val = val_size if val_size is not None else (5000 if len(train_x) >= 50000 else len(train_x) // 10)
    if n_val >= len(train_x):
        raise UserError(f"--val-size {n_val} leaves no training images (train has {len(train_x)})")
    order = np.random.default_rng(seed).permutation(len(train_x))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    splits = {
        "train": (train_x[train_idx], train_y[train_idx], train_idx),
        "val": (train_x[val_idx], train_y[val_idx], val_idx),
        "test": (test_x, test_y, None),
    }
    mean, std = _normalisation(dataset, splits["train"][0])

    params = dict(
        dataset=dataset,
        source=source,
        data_root=data_root,
        download=download,
        val_size=n_val,
        size=size,
        channels=channels,
        limit=limit,
        seed=seed,
    )
    with write_artifact(out, "dataset", "prepare", params, raw.files, seed, started) as f:
        f.attrs["name"] = dataset
        f.attrs["classes"] = json.dumps(list(raw.classes))
        f.attrs["num_classes"] = len(raw.classes)
        f.attrs["shape"] = list(train_x.shape[1:])
        f.attrs["mean"] = mean
        f.attrs["std"] = std
        f.attrs["evaluation_only"] = dataset in readers.EVALUATION_ONLY
        for key, value in raw.attrs.items():  # a generated family's generator and its measurements
            f.attrs[key] = value
        for split, (x, y, index) in splits.items():
            group = f.create_group(split)
            group.create_dataset("images", data=np.ascontiguousarray(x, dtype=np.uint8), chunks=True, compression="lzf")
            group.create_dataset("labels", data=y.astype(np.int64))
            if index is not None:  # position in the source's train set: proves val and train are disjoint
                group.create_dataset("index", data=index.astype(np.int64))

    _show(dataset, splits, out)
    return out


def _show(dataset: str, splits: dict, out: Path) -> None:
    table = Table(title=f"prepare {dataset}", title_justify="left")
    for column in ("split", "images", "shape", "classes"):
        table.add_column(column)
    for split, (x, y, _) in splits.items():
        table.add_row(split, f"{len(x):,}", "x".join(map(str, x.shape[1:])), str(len(np.unique(y))))
    console.print(table)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


# ---------------------------------------------------------------------------------------------- reading


def resolve(dataset: str, auto_prepare: bool = True, download: bool = True) -> Path:
    """A dataset argument is a prepared HDF5 path or a dataset name (prepared on first use, downloading what is
    not found offline when `download`)."""
    path = Path(dataset)
    if path.suffix in (".h5", ".hdf5") or path.exists():
        return path
    if dataset not in names():
        raise UserError(f"unknown dataset {dataset!r}: give a prepared .h5 file or one of {', '.join(names())}")
    path = default_path(dataset)
    if not path.exists():
        if not auto_prepare:
            raise UserError(f"{path} not found: run `python cli.py prepare --dataset {dataset}` first")
        print(f"{path} not found: preparing {dataset} first", file=sys.stderr)
        prepare(dataset, path, download=download)
    return path


def refuse_evaluation_only(dataset: str, flag: str) -> None:
    """Sets marked evaluation-only (rendered Latin letters, EMNIST: the pools a digit thief would most likely use) are
    measured against and never trained on; `dataset` is a name or a prepared file (judged by its name and mark)."""
    from stages.data import readers

    name, marked = dataset, False
    path = Path(dataset)
    if path.suffix in (".h5", ".hdf5") or path.exists():
        try:
            with open_artifact(path, "dataset") as f:
                name, marked = str(f.attrs.get("name", "")), bool(f.attrs.get("evaluation_only", False))
        except UserError:
            return  # not a readable dataset: loading it reports why
    if marked or name in readers.EVALUATION_ONLY:
        raise UserError(
            f"{flag} {dataset}: {name} is an evaluation-only set (a digit thief's likeliest pool); "
            "no recipe may train on it"
        )


def load(dataset: str | Path, splits: tuple[str, ...] = SPLITS) -> Dataset:
    path = resolve(str(dataset))
    with open_artifact(path, "dataset") as f:
        for split in splits:
            group = f.get(split)
            if not isinstance(group, h5py.Group) or not all(
                isinstance(group.get(k), h5py.Dataset) for k in ("images", "labels")
            ):
                raise UserError(f"{path}: missing split {split!r} (images and labels)")
        try:
            classes = attr_json(f, "classes")
            name = str(f.attrs["name"])
            mean, std = [float(v) for v in f.attrs["mean"]], [float(v) for v in f.attrs["std"]]
        except (KeyError, TypeError, ValueError) as e:  # a hand-made or damaged file
            raise UserError(f"{path}: dataset attributes missing or malformed ({' '.join(str(e).split())})") from None
        if not isinstance(classes, list) or not classes:
            raise UserError(f"{path}: attribute classes must be a non-empty list of names")
        if len(mean) != len(std) or not np.all(np.isfinite(mean + std)) or min(std, default=0.0) <= 0:
            raise UserError(f"{path}: normalisation constants must be finite with std > 0, got mean {mean} std {std}")
        check_memory(
            sum(f[s]["images"].size * f[s]["images"].dtype.itemsize + 8 * f[s]["labels"].size for s in splits),
            f"reading {path}",
        )
        loaded = {}
        for split in splits:
            images, labels = f[split]["images"], f[split]["labels"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
                raise UserError(
                    f"{path}: {split}/images must be uint8 (N, 1|3, H, W), got {images.dtype} {images.shape}"
                )
            if labels.dtype.kind not in "iu":
                raise UserError(f"{path}: {split}/labels must be integers, got {labels.dtype}")
            if labels.shape != (images.shape[0],):
                raise UserError(f"{path}: {split}/labels shape {labels.shape} does not match {images.shape[0]} images")
            x, y = torch.from_numpy(images[()]), torch.from_numpy(labels[()].astype(np.int64))
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
                raise UserError(f"{path}: {split}/labels outside 0..{len(classes) - 1}")
            loaded[split] = (x, y)
        shapes = {split: list(x.shape[1:]) for split, (x, _) in loaded.items()}
        if len({tuple(v) for v in shapes.values()}) > 1:
            raise UserError(f"{path}: splits differ in image shape {shapes}")
        data = Dataset(path, sha256(path), name, classes, mean, std, loaded)
    if len(data.mean) != data.shape[0]:
        raise UserError(f"{path}: {len(data.mean)} normalisation constants for {data.shape[0]} channels")
    return data


def fit_images(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resize / convert channels of uint8 images so a pool or OOD set matches a victim's input shape."""
    from stages.data.readers import convert

    if tuple(images.shape[1:]) == tuple(shape):
        return images
    channels, height, width = shape
    if height != width:
        raise UserError(f"only square inputs are supported, got {height}x{width}")
    return torch.from_numpy(convert(images.numpy(), height, channels))


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """CIFAR augmentation, batched: random crop with zero padding `pad` and horizontal flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out).contiguous()


def batches(n: int, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False):
    """Index batches over n items, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
