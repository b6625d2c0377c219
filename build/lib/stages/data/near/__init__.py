"""Near-distribution families for `prepare`: what a thief of a digit or garment classifier would query with
(non-Latin glyphs, digits that no longer denote one, pen strokes; silhouettes, recombined and warped garments), made
offline and deterministically from the seed, framed as MNIST or FashionMNIST frames its images. Each family is one
file (stages/evaluation/family_confidence.py measures how sure a victim is on them). Latin letters are an
evaluation-only family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from stages.data.near import digits, garments, glyphs, silhouettes, strokes

TRAIN, TEST = 20000, 4000  # images per family, unless --limit asks fewer

FAMILIES: dict[str, Callable] = {
    "glyphs": glyphs.load_glyphs,
    "digits-transformed": digits.load_digits_transformed,
    "pen-strokes": strokes.load_pen_strokes,
    "latin-letters": glyphs.load_latin_letters,
    "silhouettes": silhouettes.load_silhouettes,
    "garments-recombined": garments.load_garments_recombined,
    "garments-transformed": garments.load_garments_transformed,
}


def load(
    name: str, source: Optional[Path], data_roots: list[Path], download: bool, seed: int, limit: Optional[int] = None
):
    """Family `name` as a RawDataset: TRAIN and TEST images, or `limit` and limit // 5 (at least 1) with --limit."""
    n_train = TRAIN if limit is None else min(limit, TRAIN)
    n_test = TEST if limit is None else min(max(1, limit // 5), TEST)
    return FAMILIES[name](
        name=name, seed=seed, n_train=n_train, n_test=n_test, source=source, data_roots=data_roots, download=download
    )
