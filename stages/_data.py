"""Prepared datasets as in-memory tensors: resolve a name or path, validate, convert, batch, augment."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from stages._artifacts import UserError, attr_json, check_memory, open_artifact, sha256

SPLITS = ("train", "val", "test")


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


def resolve(dataset: str, auto_prepare: bool = True) -> Path:
    """A dataset argument is a prepared HDF5 path or a dataset name (prepared on first use)."""
    from stages import _sources, prepare

    path = Path(dataset)
    if path.suffix in (".h5", ".hdf5") or path.exists():
        return path
    if dataset not in _sources.DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: give a prepared .h5 file or one of {', '.join(_sources.DATASETS)}")
    path = prepare.default_path(dataset)
    if not path.exists():
        if not auto_prepare:
            raise UserError(f"{path} not found: run `python cli.py prepare --dataset {dataset}` first")
        print(f"{path} not found: preparing {dataset} first", file=sys.stderr)
        prepare.run(dataset=dataset, out=path)
    return path


def refuse_evaluation_only(dataset: str, flag: str) -> None:
    """Sets marked evaluation-only (rendered Latin letters, EMNIST: the pools a digit thief would most likely use) are
    measured against and never trained on; `dataset` is a name or a prepared file (judged by its name and mark)."""
    from stages import _sources

    name, marked = dataset, False
    path = Path(dataset)
    if path.suffix in (".h5", ".hdf5") or path.exists():
        try:
            with open_artifact(path, "dataset") as f:
                name, marked = str(f.attrs.get("name", "")), bool(f.attrs.get("evaluation_only", False))
        except UserError:
            return  # not a readable dataset: loading it reports why
    if marked or name in _sources.EVALUATION_ONLY:
        raise UserError(f"{flag} {dataset}: {name} is an evaluation-only set (a digit thief's likeliest pool); "
                        "no recipe may train on it")


def load(dataset: str | Path, splits: tuple[str, ...] = SPLITS) -> Dataset:
    path = resolve(str(dataset))
    with open_artifact(path, "dataset") as f:
        for split in splits:
            group = f.get(split)
            if not isinstance(group, h5py.Group) or not all(isinstance(group.get(k), h5py.Dataset) for k in ("images", "labels")):
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
        check_memory(sum(f[s]["images"].size * f[s]["images"].dtype.itemsize + 8 * f[s]["labels"].size for s in splits),
                     f"reading {path}")
        loaded = {}
        for split in splits:
            images, labels = f[split]["images"], f[split]["labels"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
                raise UserError(f"{path}: {split}/images must be uint8 (N, 1|3, H, W), got {images.dtype} {images.shape}")
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
    from stages._sources import convert

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
