"""`digits-transformed`: MNIST digits changed until they no longer denote a digit (turned, mirrored, recombined
from two digits' halves, strokes erased or added), framed again as MNIST; the label is the transform. Train images
come from MNIST's train split and test images from its test split, read as `prepare --dataset mnist` reads them.
"""

from __future__ import annotations

import numpy as np
import torchvision.datasets as tvd

from stages.data.near import _frame, strokes
from stages.data.near._lookalike import QUANTILE, Lookalike

KINDS = ["rotate-90", "rotate-180", "rotate-270", "mirror", "flip", "halves", "erase", "add"]
# Digits that still read as a digit after the transform, so never drawn for it: on its side 0 is an oval, a slanted
# 1 a slanted bar and a slanted 8 a slanted 8 again; 0, 1, 8 are symmetric under a half turn, and 6 and 9 turn into
# each other; 0, 1, 8 mirror onto themselves, and 0, 1, 3, 8 flip (upside down) onto themselves.
EXCLUDED = {
    "rotate-90": (0, 1, 8),
    "rotate-180": (0, 1, 6, 8, 9),
    "rotate-270": (0, 1, 8),
    "mirror": (0, 1, 8),
    "flip": (0, 1, 3, 8),
}
# halves: the top (or left) half of one digit joined to the bottom (right) half of a digit of another class; a
# pair is drawn again while the half brought in correlates above this with the half it replaces (7 over 1, 3 over
# 5: the joined image would still read as the first digit).
HALF_MATCH = 0.6
ERASED = (0.3, 0.6)  # erase: share of the ink one eraser stroke removes
ERASER_WIDTH = (5.0, 9.0)  # pixels on the 28 x 28 digit
ADDED = (1, 2)  # add: pen strokes drawn across the digit
CHANGED = 0.85  # erase, add: drawn again while the result still correlates above this with the digit
TRIES = 20
ROUNDS = 5  # redraws of images that still look like a real digit (see _lookalike)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _halves(digits: np.ndarray, by_class: list[np.ndarray], label: int, i: int, rng: np.random.Generator) -> np.ndarray:
    across = rng.random() < 0.5  # left and right instead of top and bottom
    cut = int(_frame.MNIST_CENTRE)  # both digits have their centre of mass on this row and column
    first = digits[i].T if across else digits[i]
    others = [c for c in range(len(by_class)) if c != label and len(by_class[c])]
    for _ in range(TRIES):
        j = int(rng.choice(by_class[others[rng.integers(len(others))]]))
        second = digits[j].T if across else digits[j]
        if _correlation(first[cut:], second[cut:]) <= HALF_MATCH:
            break
    joined = np.concatenate([first[:cut], second[cut:]])
    return joined.T if across else joined


def _ink_box(image: np.ndarray) -> np.ndarray:
    """(top, left, bottom, right) of the ink."""
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], float)


def _crossing(rng: np.random.Generator, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A gently curved pen stroke across the box, from a point on one side to a point on another: (x, y) pixel
    points and pen pressure."""
    top, left, bottom, right = box
    sides = rng.choice(4, 2, replace=False)

    def on(side: int) -> np.ndarray:
        u = rng.uniform(0.1, 0.9)
        return np.array(
            [
                (left + u * (right - left), left, left + u * (right - left), right)[side],
                (top, top + u * (bottom - top), bottom, top + u * (bottom - top))[side],
            ]
        )

    start, end = on(sides[0]), on(sides[1])
    spread = 0.25 * max(bottom - top, right - left)
    c1 = start + (end - start) / 3 + rng.normal(0, spread, 2)
    c2 = start + 2 * (end - start) / 3 + rng.normal(0, spread, 2)
    points = strokes.bezier(np.stack([start, c1, c2, end]))
    return points, strokes.pressure(rng, len(points))


def _pen_mask(rng: np.random.Generator, box: np.ndarray, width: float, count: int) -> np.ndarray:
    """`count` strokes across `box` drawn at 2x with peak width `width` (pixels of 28 x 28), then reduced."""
    scale = 2
    mask = strokes.draw(
        [_crossing(rng, box) for _ in range(count)],
        width * scale,
        scale,
        np.zeros(2),
        (_frame.SIZE * scale, _frame.SIZE * scale),
    )
    return np.clip(_frame.resize(mask, _frame.SIZE), 0.0, 1.0)


def _erase(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = digit
    for _ in range(TRIES):
        out = digit * (1 - _pen_mask(rng, _ink_box(digit), rng.uniform(*ERASER_WIDTH), 1))
        if ERASED[0] <= 1 - out.sum() / digit.sum() <= ERASED[1] and _correlation(out, digit) <= CHANGED:
            break
    return out


def _add(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = digit
    for _ in range(TRIES):
        pen = _pen_mask(rng, _ink_box(digit), rng.uniform(*strokes.WIDTH) / 4, int(rng.choice(ADDED)))
        out = np.maximum(digit, pen)
        if _correlation(out, digit) <= CHANGED:
            break
    return out


def _one(
    name: str, digits: np.ndarray, labels: np.ndarray, i: int, by_class: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    digit = digits[i]
    if name.startswith("rotate"):
        image = np.rot90(digit, -int(name.split("-")[1]) // 90)  # clockwise
    elif name == "mirror":
        image = digit[:, ::-1]
    elif name == "flip":
        image = digit[::-1]
    elif name == "halves":
        image = _halves(digits, by_class, int(labels[i]), i, rng)
    elif name == "erase":
        image = _erase(digit, rng)
    else:
        image = _add(digit, rng)
    return _frame.mnist_like(np.ascontiguousarray(image))


def transform(
    digits: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, lookalike: Lookalike
) -> tuple[np.ndarray, np.ndarray, int]:
    """n images from `digits` (float (N, 28, 28) in [0, 1]), the kinds in equal shares; an image that still looks
    like a real digit is drawn again (same kind, another digit), up to ROUNDS times. Also returns how many were."""
    kinds = rng.integers(len(KINDS), size=n)
    allowed = {kind: np.flatnonzero(~np.isin(labels, EXCLUDED.get(kind, ()))) for kind in KINDS}
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]

    def make(k: int) -> np.ndarray:
        kind = KINDS[kinds[k]]
        return _one(kind, digits, labels, int(rng.choice(allowed[kind])), by_class, rng)

    out, redrawn = lookalike.draw(n, make, ROUNDS)
    return out, kinds, redrawn


def load_digits_transformed(
    name: str, seed: int, n_train: int, n_test: int, source=None, data_roots=(), download=False, **_
):
    from stages.data import raw as _raw_files

    mnist = _raw_files.load_mnist_like("mnist", tvd.MNIST, source, list(data_roots), download, seed)
    train = (mnist.train_images[:, 0] / np.float32(255), mnist.train_labels)
    test = (mnist.test_images[:, 0] / np.float32(255), mnist.test_labels)
    lookalike = Lookalike(mnist.train_images[:, 0], np.random.default_rng([seed, 0]))
    train_x, train_y, train_redrawn = transform(*train, n_train, np.random.default_rng([seed, 1]), lookalike)
    test_x, test_y, test_redrawn = transform(*test, n_test, np.random.default_rng([seed, 2]), lookalike)
    raw = _raw_files.raw_dataset(name, train_x, train_y, test_x, test_y, KINDS, mnist.files)
    excluded = "; ".join(f"{kind} never on {', '.join(map(str, digits))}" for kind, digits in EXCLUDED.items())
    raw.attrs["generator"] = (
        "MNIST digits (train split from MNIST train, test from MNIST test) turned a quarter (clockwise), half or "
        "three quarters, mirrored, flipped upside down, recombined from the halves (top/bottom or left/right) of two "
        f"digits of different classes (the new half correlating at most {HALF_MATCH:g} with the one it replaces), "
        f"with {ERASED[0]:.0%}-{ERASED[1]:.0%} of the ink erased by one eraser stroke, or with 1-2 pen strokes added "
        f"(erase, add: correlation with the digit at most {CHANGED:g}), framed again as MNIST; label: the transform; "
        f"excluded as still digits: {excluded}; an image nearer to a real MNIST digit than {QUANTILE:.0%} of real "
        f"digits are to their nearest other (threshold {lookalike.threshold:.3f} on 14x14 pixels) drawn again, "
        f"up to {ROUNDS} "
        "times"
    )
    raw.attrs["redrawn_as_digits"] = train_redrawn + test_redrawn
    return raw
