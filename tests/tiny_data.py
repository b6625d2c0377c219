"""Hand-made `dataset/1` files: tiny, learnable, and easy to damage on purpose (no raw files needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np

from stages.core.artifacts import write_artifact

SIZES = {"train": 160, "val": 40, "test": 40}


def images_for(labels: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright bar whose row encodes the class, so LeNet-5 learns something in one epoch."""
    c, h, w = shape
    x = rng.integers(0, 60, (len(labels), c, h, w), dtype=np.uint8)
    rows = (labels * (h - 2) // max(1, int(labels.max(initial=0)) + 1)).astype(int)
    for i, row in enumerate(rows):
        x[i, :, row : row + 2, :] = 255
    return x


def write_dataset(
    path: Path,
    name: str = "synth",
    shape: tuple[int, int, int] = (1, 28, 28),
    classes: int = 10,
    seed: int = 0,
    edit: Optional[Callable[[h5py.File], None]] = None,
    sizes: Optional[dict[str, int]] = None,
) -> Path:
    """A valid dataset artifact, then `edit(f)` on it opened read-write (to damage it on purpose)."""
    rng = np.random.default_rng(seed)
    params = dict(dataset=name, shape=list(shape), classes=classes, seed=seed)
    with write_artifact(path, "dataset", "test", params, seed=seed) as f:
        f.attrs["name"] = name
        f.attrs["classes"] = json.dumps([str(i) for i in range(classes)])
        f.attrs["num_classes"] = classes
        f.attrs["shape"] = list(shape)
        f.attrs["mean"] = [0.2] * shape[0]
        f.attrs["std"] = [0.3] * shape[0]
        for split, n in (sizes or SIZES).items():
            labels = np.arange(n) % classes
            group = f.create_group(split)
            group.create_dataset("images", data=images_for(labels, shape, rng))
            group.create_dataset("labels", data=labels.astype(np.int64))
    if edit is not None:
        with h5py.File(path, "r+") as f:
            edit(f)
    return path


def replace(f: h5py.File, name: str, data) -> None:
    """Swap one dataset of an open file for `data` (HDF5 datasets cannot change dtype in place)."""
    del f[name]
    f.create_dataset(name, data=data)
