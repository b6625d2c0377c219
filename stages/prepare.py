"""Prepare a dataset: read it from raw files (or torchvision's download) and write one self-describing HDF5.

Output `dataset/1`: uint8 images (N, C, H, W) and int64 labels in groups train / val / test (val carved from
train with the seed), class names, and the normalisation constants the victim will embed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from stages import _sources
from stages._artifacts import UserError, check_memory, prepare_output, write_artifact

console = Console(stderr=True)

# Constants of the official code (INI_SPEC §1); other datasets get theirs measured on the train split.
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


def default_data_roots(data_root: Path) -> list[Path]:
    """Where raw files are looked for: the given root, $INI_DATA_ROOT, then the workplace's shared data folder."""
    roots = [data_root]
    if os.environ.get("INI_DATA_ROOT"):
        roots.append(Path(os.environ["INI_DATA_ROOT"]))
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return roots


def default_path(dataset: str) -> Path:
    return Path("artifacts") / "data" / f"{dataset}.h5"


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


def run(
    dataset: Annotated[str, typer.Option(help=f"Dataset: {', '.join(_sources.DATASETS)}.")] = "mnist",
    out: Annotated[Optional[Path], typer.Option(help="Output HDF5 [default: artifacts/data/<dataset>.h5].")] = None,
    source: Annotated[Optional[Path], typer.Option(help="Folder holding the raw files (gzipped or not).")] = None,
    data_root: Annotated[Path, typer.Option(help="torchvision-style data root searched first.")] = Path("data"),
    download: Annotated[bool, typer.Option(help="Let torchvision download what is not found offline.")] = True,
    val_size: Annotated[Optional[int], typer.Option(min=0, help="Validation images carved from train [default: 5000 for >=50k-image sets, else 10%].")] = None,
    size: Annotated[Optional[int], typer.Option(min=8, max=512, help="Resize images to size x size.")] = None,
    channels: Annotated[Optional[int], typer.Option(min=1, max=3, help="Convert to 1 (gray) or 3 (RGB) channels.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Keep only the first N train and N/5 test images (smoke runs).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the val split (and of generated pools).")] = 0,
) -> Path:
    """Read a dataset and write it as one self-describing HDF5 file with train/val/test splits."""
    started = time.time()
    if dataset not in _sources.DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(_sources.DATASETS)}")
    if channels == 2:
        raise UserError("--channels must be 1 (gray) or 3 (RGB)")
    out = prepare_output(out or default_path(dataset))
    raw = _sources.load(dataset, source, default_data_roots(data_root), download, seed, limit)

    train_x, train_y, test_x, test_y = raw.train_images, raw.train_labels, raw.test_images, raw.test_labels
    if limit is not None:
        train_x, train_y = train_x[:limit], train_y[:limit]
        test_x, test_y = test_x[: max(1, limit // 5)], test_y[: max(1, limit // 5)]
    shape = (channels or train_x.shape[1], size or train_x.shape[2], size or train_x.shape[3])
    # The converted arrays plus the split copies taken from them below.
    check_memory(2 * (len(train_x) + len(test_x)) * int(np.prod(shape)),
                 f"preparing {len(train_x) + len(test_x):,} {dataset} images of {'x'.join(map(str, shape))}")
    if size is not None or channels is not None:
        train_x = _sources.convert(train_x, size, channels)
        test_x = _sources.convert(test_x, size, channels)

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

    params = dict(dataset=dataset, source=source, data_root=data_root, download=download, val_size=n_val,
                  size=size, channels=channels, limit=limit, seed=seed)
    with write_artifact(out, "dataset", "prepare", params, raw.files, seed, started) as f:
        f.attrs["name"] = dataset
        f.attrs["classes"] = json.dumps(list(raw.classes))
        f.attrs["num_classes"] = len(raw.classes)
        f.attrs["shape"] = list(train_x.shape[1:])
        f.attrs["mean"] = mean
        f.attrs["std"] = std
        f.attrs["evaluation_only"] = dataset in _sources.EVALUATION_ONLY
        for key, value in raw.attrs.items():  # a generated family's generator and its measurements
            f.attrs[key] = value
        for split, (x, y, index) in splits.items():
            group = f.create_group(split)
            group.create_dataset("images", data=np.ascontiguousarray(x, dtype=np.uint8), chunks=True, compression="lzf")
            group.create_dataset("labels", data=y.astype(np.int64))
            if index is not None:  # position in the source's train set: proves val and train are disjoint
                group.create_dataset("index", data=index.astype(np.int64))

    table = Table(title=f"prepare {dataset}", title_justify="left")
    for column in ("split", "images", "shape", "classes"):
        table.add_column(column)
    for split, (x, y, _) in splits.items():
        table.add_row(split, f"{len(x):,}", "x".join(map(str, x.shape[1:])), str(len(np.unique(y))))
    console.print(table)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out
