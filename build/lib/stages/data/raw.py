"""Raw files to a RawDataset: where `prepare` looks for torchvision's files (--source, the data roots in
torchvision's layout, Debian's dataset folders), the one download it may make, and the IDX family (MNIST,
FashionMNIST, KMNIST) that the near-distribution families derive from too.
"""

from __future__ import annotations

import contextlib
import gzip
import pickle
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from models.params import UserError


@dataclass
class RawDataset:
    name: str
    train_images: np.ndarray  # uint8, (N, C, H, W)
    train_labels: np.ndarray  # int64, (N,)
    test_images: np.ndarray  # uint8, (M, C, H, W)
    test_labels: np.ndarray  # int64, (M,)
    classes: list[str]
    files: list[Path]  # the input files actually read (hashed for provenance); empty for built-in data
    attrs: dict = field(default_factory=dict)  # root attributes a generated set adds to its artifact (its generator)


# Debian packages that install raw files system-wide (dataset-fashion-mnist: the gzipped IDX files).
DEBIAN_DIRS = {"fashionmnist": [Path("/usr/share/datasets/fashion-mnist")]}

# A download that cannot connect must fail, not hang: torchvision's urlopen calls set no timeout.
DOWNLOAD_TIMEOUT_S = 60

# Split of the sources that ship without one (image folders, the pools): test share, stratified by class.
TEST_FRACTION = 0.2

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# ---------------------------------------------------------------------------------------------- helpers


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def reading(name: str, path: Path) -> Iterator[None]:
    """A truncated or foreign file surfaces as one line naming it, whatever the parser raised."""
    try:
        yield
    except UserError:
        raise
    except (
        AssertionError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OSError,
        EOFError,
        pickle.UnpicklingError,
        NotImplementedError,
    ) as e:
        raise UserError(f"{name}: cannot read {path}: {one_line(e)}") from None


def find_files(names: list[str], dirs: list[Path], gzipped: bool) -> dict[str, Path] | None:
    """The first folder holding every file (plain or, if `gzipped`, also .gz; plain preferred), as name -> path."""
    for folder in dirs:
        found = {}
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz")[: 2 if gzipped else 1]:
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(names):
            return found
    return None


def search_dirs(source: Path | None, data_roots: list[Path], layouts: list[str], debian: list[Path]) -> list[Path]:
    """--source alone when given (the dir holding the files, or a root in torchvision's layout); else the roots."""
    if source is not None:
        return [source] + [source / layout for layout in layouts]
    return [root / layout for root in data_roots for layout in layouts] + debian


def download_into(name: str, data_roots: list[Path], fetch: Callable[[Path], object]) -> str:
    """Run a torchvision download into data_roots[0]; return '' on success, else why it failed (one line)."""
    if not data_roots:
        return "no data root to download into"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        fetch(data_roots[0])
    # Network, HTTP, checksum and disk errors all mean the same to the user: put the files there yourself.
    except Exception as e:  # noqa: BLE001
        return one_line(e)
    finally:
        socket.setdefaulttimeout(previous)
    return ""


def locate(
    name: str,
    names: list[str],
    source: Path | None,
    data_roots: list[Path],
    download: bool,
    layout: str,
    fetch: Callable[[Path], object] | None,
    extra_layouts: tuple[str, ...] = (),
    gzipped: bool = False,
) -> dict[str, Path]:
    """Search order: --source, each data root, Debian's folders, then torchvision's download if allowed."""
    layouts = [layout, *extra_layouts]
    found = find_files(names, search_dirs(source, data_roots, layouts, DEBIAN_DIRS.get(name, [])), gzipped)
    if found:
        return found
    why = ""
    if source is None and download and fetch is not None:
        why = download_into(name, data_roots, fetch)
        found = find_files(names, [root / layout_ for root in data_roots[:1] for layout_ in layouts], gzipped)
        if found:
            return found
        why = f" (download failed: {why})" if why else " (download gave no files)"
    wanted = ", ".join(f"{n}(.gz)" if gzipped else n for n in names)
    if source is not None:
        raise UserError(f"{name}: no raw files found in {source}; put {wanted} there or under {source / layout}/")
    root = data_roots[0] if data_roots else Path("<data root>")
    hint = "" if download else " or allow --download"
    raise UserError(f"{name}: no raw files found{why}; put {wanted} under {root / layout}/ or pass --source DIR{hint}")


def read_idx(name: str, path: Path, reader: Callable[[str], torch.Tensor]) -> np.ndarray:
    # torchvision's IDX readers open() the path as is (0.29.1), so gzipped files are inflated to a temp dir first.
    with reading(name, path):
        if path.suffix != ".gz":
            return reader(str(path)).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / path.stem
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return reader(str(plain)).numpy()


def split_stratified(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified train/test split: TEST_FRACTION of every class goes to test, in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[: int(round(len(members) * TEST_FRACTION))])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test)] = True
    train_idx = rng.permutation(np.flatnonzero(~is_test))
    test_idx = rng.permutation(np.flatnonzero(is_test))
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def raw_dataset(name, train_x, train_y, test_x, test_y, classes, files) -> RawDataset:
    return RawDataset(
        name,
        np.ascontiguousarray(train_x, np.uint8),
        np.asarray(train_y, np.int64),
        np.ascontiguousarray(test_x, np.uint8),
        np.asarray(test_y, np.int64),
        list(classes),
        list(files),
    )


# ---------------------------------------------------------------------------------------------- IDX family


def load_mnist_like(
    name: str, dataset_cls: type, source: Path | None, data_roots: list[Path], download: bool, seed: int
) -> RawDataset:
    """MNIST, Fashion-MNIST, KMNIST: four IDX files under <root>/<ClassName>/raw/."""
    layout = f"{dataset_cls.__name__}/raw"
    fetch = lambda root: dataset_cls(str(root), train=True, download=True)  # noqa: E731
    files = locate(name, list(IDX_FILES), source, data_roots, download, layout, fetch, gzipped=True)
    train_x, train_y, test_x, test_y = (
        read_idx(name, files[n], read_image_file if "images" in n else read_label_file) for n in IDX_FILES
    )
    return raw_dataset(name, train_x[:, None], train_y, test_x[:, None], test_y, dataset_cls.classes, files.values())
