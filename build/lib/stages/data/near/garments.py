"""`garments-recombined` and `garments-transformed`: FashionMNIST products cut and joined across groups (top of a
shirt on the bottom of a sandal), or turned and warped until they are no upright product; framed again as
FashionMNIST frames them; the label is the kind of cut or warp. Train from FashionMNIST train, test from its test.
"""

from __future__ import annotations

import numpy as np
import torchvision.datasets as tvd
from scipy.ndimage import map_coordinates

from stages.data.near import _frame
from stages.data.near._lookalike import QUANTILE, Lookalike

# Classes whose halves look alike, so a product is only joined with pieces of another group: tops and dresses
# (T-shirt/top, pullover, dress, coat, shirt), trousers, shoes (sandal, sneaker, ankle boot), bags.
GROUPS = ((0, 2, 3, 4, 6), (1,), (5, 7, 9), (8,))
CUTS = ["top-bottom", "left-right", "quarters"]
WARPS = ["rotate-90", "rotate-180", "rotate-270", "shear", "perspective", "swirl", "fisheye"]
# Products that still read as upright after the warp, so never drawn for it: a bag has no up (any turn), trousers
# turned upside down are trousers.
EXCLUDED = {"rotate-90": (8,), "rotate-180": (1, 8), "rotate-270": (8,)}
SHEAR = (0.7, 1.2)  # |shear factor|, horizontal or vertical
PERSPECTIVE = 0.45  # corners move up to this share of the size...
TILT = (30.0, 60.0)  # ...and the view turns this many degrees either way (at 0.35 without a turn, most stayed upright)
SWIRL = (2.5, 5.0)  # |turn| in radians at the centre, fading with radius / SWIRL_RADIUS
SWIRL_RADIUS = (6.0, 12.0)  # pixels
FISHEYE = ((0.35, 0.6), (1.8, 2.8))  # exponent of the radius: pincushion or barrel
ROUNDS = 5  # redraws of images that still look like a real product (see _lookalike)


def _group_of(labels: np.ndarray) -> np.ndarray:
    lookup = np.zeros(int(labels.max()) + 1, int)
    for g, members in enumerate(GROUPS):
        lookup[list(members)] = g
    return lookup[labels]


def _cut(
    images: np.ndarray, groups: np.ndarray, by_group: list[np.ndarray], kind: str, rng: np.random.Generator
) -> np.ndarray:
    """Pieces of products of different groups joined along the centre lines of the frame."""
    half = _frame.SIZE // 2
    first = int(rng.integers(len(images)))
    pieces = 4 if kind == "quarters" else 2
    chosen, used = [first], {int(groups[first])}
    while len(chosen) < pieces:
        # every piece from a group not used yet (quarters: the fourth may repeat the first's group)
        free = [g for g in range(len(GROUPS)) if g not in used and len(by_group[g])] or [
            g for g in range(len(GROUPS)) if g != groups[chosen[-1]] and len(by_group[g])
        ]
        g = free[rng.integers(len(free))]
        chosen.append(int(rng.choice(by_group[g])))
        used.add(g)
    x = [images[i] for i in chosen]
    out = x[0].copy()
    if kind == "top-bottom":
        out[half:] = x[1][half:]
    elif kind == "left-right":
        out[:, half:] = x[1][:, half:]
    else:
        out[:half, half:], out[half:, :half], out[half:, half:] = (
            x[1][:half, half:],
            x[2][half:, :half],
            x[3][half:, half:],
        )
    return out


def _warp_coordinates(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """For each output pixel of a size x size canvas, where to read the input (rows, cols), about the centre."""
    y, x = np.mgrid[:size, :size].astype(np.float64)
    c = (size - 1) / 2
    dy, dx = y - c, x - c
    if kind == "shear":
        s = rng.uniform(*SHEAR) * rng.choice([-1, 1])
        if rng.random() < 0.5:
            dx = dx + s * dy
        else:
            dy = dy + s * dx
    elif kind == "perspective":
        # The homography taking the corners to randomly moved corners, applied inversely.
        src = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * c
        angle = np.deg2rad(rng.uniform(*TILT) * rng.choice([-1, 1]))
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        dst = src @ turn.T + rng.uniform(-PERSPECTIVE, PERSPECTIVE, (4, 2)) * 2 * c
        a = []
        for (u, v), (p, q) in zip(dst, src, strict=False):  # maps output (u, v) to input (p, q)
            a.append([u, v, 1, 0, 0, 0, -p * u, -p * v, -p])
            a.append([0, 0, 0, u, v, 1, -q * u, -q * v, -q])
        h = np.linalg.svd(np.asarray(a))[2][-1].reshape(3, 3)
        w = h[2, 0] * dx + h[2, 1] * dy + h[2, 2]
        dx, dy = (h[0, 0] * dx + h[0, 1] * dy + h[0, 2]) / w, (h[1, 0] * dx + h[1, 1] * dy + h[1, 2]) / w
    elif kind == "swirl":
        r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
        theta = theta + rng.uniform(*SWIRL) * rng.choice([-1, 1]) * np.exp(-r / rng.uniform(*SWIRL_RADIUS))
        dx, dy = r * np.cos(theta), r * np.sin(theta)
    elif kind == "fisheye":
        r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
        power = rng.uniform(*FISHEYE[rng.integers(2)])
        r = c * (r / c) ** power
        dx, dy = r * np.cos(theta), r * np.sin(theta)
    return np.stack([dy + c, dx + c])


def _warp(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind.startswith("rotate"):
        return np.rot90(image, -int(kind.split("-")[1]) // 90)  # clockwise
    pad = _frame.SIZE // 2  # room for the warped product before it is framed again
    canvas = np.pad(image, pad)
    return map_coordinates(canvas, _warp_coordinates(kind, len(canvas), rng), order=1, cval=0.0)


def _one(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    by_group: list[np.ndarray],
    allowed: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    if name in CUTS:
        out = _cut(images, groups, by_group, name, rng)
    else:
        out = _warp(images[int(rng.choice(allowed[name]))], name, rng)
    if _frame.blank(out):  # a warp that pushed everything off the canvas: keep the product turned instead
        out = np.rot90(images[int(rng.choice(allowed["rotate-180"]))], 2)
    return _frame.fashion_like(np.ascontiguousarray(out))


def derive(
    kinds_list: list[str],
    images: np.ndarray,
    labels: np.ndarray,
    n: int,
    rng: np.random.Generator,
    lookalike: Lookalike,
) -> tuple[np.ndarray, np.ndarray, int]:
    """n images of the kinds in equal shares; one that still looks like a real product is drawn again (same kind)
    up to ROUNDS times. Also returns how many were."""
    groups = _group_of(labels)
    by_group = [np.flatnonzero(groups == g) for g in range(len(GROUPS))]
    allowed = {k: np.flatnonzero(~np.isin(labels, EXCLUDED.get(k, ()))) for k in WARPS}
    kinds = rng.integers(len(kinds_list), size=n)
    out, redrawn = lookalike.draw(
        n, lambda k: _one(kinds_list[kinds[k]], images, labels, groups, by_group, allowed, rng), ROUNDS
    )
    return out, kinds, redrawn


def _load(name: str, kinds: list[str], seed: int, n_train: int, n_test: int, source, data_roots, download):
    from stages.data import raw as _raw_files

    fashion = _raw_files.load_mnist_like("fashionmnist", tvd.FashionMNIST, source, list(data_roots), download, seed)
    lookalike = Lookalike(fashion.train_images[:, 0], np.random.default_rng([seed, 0]))
    train = (fashion.train_images[:, 0] / np.float32(255), fashion.train_labels)
    test = (fashion.test_images[:, 0] / np.float32(255), fashion.test_labels)
    train_x, train_y, train_redrawn = derive(kinds, *train, n_train, np.random.default_rng([seed, 1]), lookalike)
    test_x, test_y, test_redrawn = derive(kinds, *test, n_test, np.random.default_rng([seed, 2]), lookalike)
    raw = _raw_files.raw_dataset(name, train_x, train_y, test_x, test_y, kinds, fashion.files)
    raw.attrs["redrawn_as_products"] = train_redrawn + test_redrawn
    check = (
        f"an image nearer to a real FashionMNIST product than {QUANTILE:.0%} of real products are to their "
        f"nearest other (threshold {lookalike.threshold:.3f} on 14x14 pixels) drawn again, up to {ROUNDS} times"
    )
    return raw, check


def load_garments_recombined(
    name: str, seed: int, n_train: int, n_test: int, source=None, data_roots=(), download=False, **_
):
    raw, check = _load(name, CUTS, seed, n_train, n_test, source, data_roots, download)
    raw.attrs["generator"] = (
        "FashionMNIST products (train from FashionMNIST train, test from its test) cut along the frame's centre "
        "lines and joined (label: top-bottom, left-right, quarters from four products) only across the groups "
        + " / ".join("+".join(map(str, g)) for g in GROUPS)
        + ", framed again as FashionMNIST; "
        + check
    )
    return raw


def load_garments_transformed(
    name: str, seed: int, n_train: int, n_test: int, source=None, data_roots=(), download=False, **_
):
    raw, check = _load(name, WARPS, seed, n_train, n_test, source, data_roots, download)
    excluded = "; ".join(f"{kind} never on {', '.join(map(str, c))}" for kind, c in EXCLUDED.items())
    raw.attrs["generator"] = (
        "FashionMNIST products (train from FashionMNIST train, test from its test) turned a quarter (clockwise), "
        f"half or three quarters, sheared by {SHEAR[0]:g}-{SHEAR[1]:g}, put in perspective (turned "
        f"{TILT[0]:g}-{TILT[1]:g} deg, corners moved "
        f"up to {PERSPECTIVE:.0%}), swirled ({SWIRL[0]:g}-{SWIRL[1]:g} rad at the centre) or fisheyed (radius "
        f"to the power "
        f"{FISHEYE[0][0]:g}-{FISHEYE[0][1]:g} or {FISHEYE[1][0]:g}-{FISHEYE[1][1]:g}), framed again as FashionMNIST "
        f"(label: the warp); excluded as still upright products: {excluded}; " + check
    )
    return raw
