"""Prepare a dataset: read it from raw files (or torchvision's download) and write one self-describing HDF5.

Output `dataset/1`: uint8 images (N, C, H, W) and int64 labels in groups train / val / test (val carved from
train with the seed), class names, and the normalisation constants the victim will embed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.data import prepared as _data


def run(
    dataset: Annotated[str, typer.Option(help=f"Dataset: {', '.join(_data.names())}.")] = "mnist",
    out: Annotated[Optional[Path], typer.Option(help="Output HDF5 [default: artifacts/data/<dataset>.h5].")] = None,
    source: Annotated[Optional[Path], typer.Option(help="Folder holding the raw files (gzipped or not).")] = None,
    data_root: Annotated[Path, typer.Option(help="torchvision-style data root searched first.")] = _data.DATA_ROOT,
    download: Annotated[bool, typer.Option(help="Let torchvision download what is not found offline.")] = True,
    val_size: Annotated[
        Optional[int],
        typer.Option(min=0, help="Validation images carved from train [default: 5000 for >=50k-image sets, else 10%]."),
    ] = None,
    size: Annotated[Optional[int], typer.Option(min=8, max=512, help="Resize images to size x size.")] = None,
    channels: Annotated[
        Optional[int], typer.Option(min=1, max=3, help="Convert to 1 (gray) or 3 (RGB) channels.")
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option(min=1, help="Keep only the first N train and N/5 test images (smoke runs).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the val split (and of generated pools).")] = 0,
) -> Path:
    """Read a dataset and write it as one self-describing HDF5 file with train/val/test splits."""
    return _data.prepare(
        dataset,
        out,
        source=source,
        data_root=data_root,
        download=download,
        val_size=val_size,
        size=size,
        channels=channels,
        limit=limit,
        seed=seed,
    )
