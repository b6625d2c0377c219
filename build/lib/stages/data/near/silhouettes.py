"""`silhouettes`: closed shapes of object classes FashionMNIST does not have (Fourier-contour blobs, star polygons,
and animals, tools, vehicles, vessels, leaves and buildings composed of primitives), filled with grey textures like
FashionMNIST's and framed as it frames its products. The label is the shape class.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from stages.data.near import _frame

CANVAS = 112  # drawing size, 4x the frame
CLASSES = ["blob", "star", "animal", "tool", "vehicle", "vessel", "leaf", "building"]
# Textures: a grey level, a gradient across the object, a fine pattern, a rim. Measured on FashionMNIST's train
# split: the mean grey of an object's pixels (above 0.05) is 0.50-0.68 per class and the mean image 0.29.
LEVEL = (0.35, 0.95)
GRADIENT = 0.25  # largest change of grey across the object
PATTERNS = ("plain", "stripes", "noise", "knit", "seams")


def _polygon(pen: ImageDraw.ImageDraw, points: np.ndarray, fill: int = 255) -> None:
    pen.polygon([tuple(p) for p in points * CANVAS], fill=fill)


def _ellipse(pen: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: int = 255) -> None:
    pen.ellipse([(cx - rx) * CANVAS, (cy - ry) * CANVAS, (cx + rx) * CANVAS, (cy + ry) * CANVAS], fill=fill)


def _bar(
    pen: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], width: float, fill: int = 255
) -> None:
    pen.line(
        [a[0] * CANVAS, a[1] * CANVAS, b[0] * CANVAS, b[1] * CANVAS], fill=fill, width=max(1, round(width * CANVAS))
    )


def _blob(pen, rng):
    theta = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 7):  # Fourier contour: low harmonics bend the outline, higher ones add lobes
        radius += rng.uniform(0, 0.35 / k**0.7) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = 0.4 * radius / radius.max()
    aspect = np.exp(rng.uniform(-0.5, 0.5))
    _polygon(pen, np.stack([0.5 + radius * np.cos(theta) * aspect, 0.5 + radius * np.sin(theta) / aspect], 1))


def _star(pen, rng):
    n = int(rng.integers(4, 10))
    theta = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) + rng.uniform(0, np.pi)
    radius = np.where(np.arange(2 * n) % 2 == 0, 0.45, 0.45 * rng.uniform(0.3, 0.7))
    _polygon(pen, np.stack([0.5 + radius * np.cos(theta), 0.5 + radius * np.sin(theta)], 1))


def _animal(pen, rng):
    """A quadruped from the side: body, four legs, neck and head, ears and a tail."""
    length, height = rng.uniform(0.35, 0.5), rng.uniform(0.12, 0.2)
    cx, cy = 0.5, 0.45
    _ellipse(pen, cx, cy, length / 2, height / 2)
    leg = rng.uniform(0.15, 0.28)
    for x in (cx - length * 0.38, cx - length * 0.25, cx + length * 0.25, cx + length * 0.38):
        _bar(pen, (x, cy), (x + rng.normal(0, 0.02), cy + height / 2 + leg), rng.uniform(0.025, 0.045))
    side = 1 if rng.random() < 0.5 else -1
    head = (cx + side * (length / 2 + 0.06), cy - height / 2 - rng.uniform(0.05, 0.15))
    _bar(pen, (cx + side * length * 0.4, cy), head, rng.uniform(0.05, 0.08))
    _ellipse(pen, head[0] + side * 0.03, head[1], rng.uniform(0.05, 0.08), rng.uniform(0.04, 0.06))
    _polygon(
        pen, np.array([[head[0] - 0.02, head[1] - 0.03], [head[0], head[1] - 0.1], [head[0] + 0.02, head[1] - 0.03]])
    )
    tail = (cx - side * (length / 2 + rng.uniform(0.05, 0.15)), cy - rng.uniform(-0.05, 0.2))
    _bar(pen, (cx - side * length * 0.45, cy), tail, rng.uniform(0.015, 0.03))


def _tool(pen, rng):
    """A hammer, a wrench, a spoon or an axe, on a slanted handle."""
    angle = rng.uniform(-0.6, 0.6)
    direction = np.array([np.sin(angle), -np.cos(angle)])
    across = np.array([-direction[1], direction[0]])
    base = np.array([0.5, 0.5]) - direction * 0.4
    top = base + direction * rng.uniform(0.6, 0.8)
    _bar(pen, tuple(base), tuple(top), rng.uniform(0.04, 0.07))
    kind = rng.integers(4)
    if kind == 0:  # hammer: a block across the top
        half = across * rng.uniform(0.15, 0.25)
        _bar(pen, tuple(top - half), tuple(top + half), rng.uniform(0.08, 0.12))
    elif kind == 1:  # wrench: an open ring
        r = rng.uniform(0.08, 0.12)
        _ellipse(pen, *top, r, r)
        _ellipse(pen, *(top + direction * r * 0.6), r * 0.5, r * 0.5, fill=0)
    elif kind == 2:  # spoon: an oval bowl
        _ellipse(pen, *(top + direction * 0.05), rng.uniform(0.06, 0.1), rng.uniform(0.1, 0.14))
    else:  # axe: a wedge to one side
        edge = across * rng.uniform(0.18, 0.25)
        _polygon(
            pen,
            np.stack(
                [
                    top - direction * 0.05,
                    top + edge - direction * 0.12,
                    top + edge + direction * 0.08,
                    top + direction * 0.05,
                ]
            ),
        )


def _vehicle(pen, rng):
    """A body, a cabin and two (or three) wheels."""
    length, height = rng.uniform(0.6, 0.85), rng.uniform(0.15, 0.25)
    left, bottom = 0.5 - length / 2, 0.6
    pen.rounded_rectangle(
        [left * CANVAS, (bottom - height) * CANVAS, (left + length) * CANVAS, bottom * CANVAS],
        radius=int(rng.uniform(0.02, 0.06) * CANVAS),
        fill=255,
    )
    cabin = rng.uniform(0.3, 0.6) * length
    start = left + rng.uniform(0.05, 0.6) * (length - cabin)
    rise = rng.uniform(0.08, 0.18)
    _polygon(
        pen,
        np.array(
            [
                [start, bottom - height],
                [start + 0.2 * cabin, bottom - height - rise],
                [start + 0.8 * cabin, bottom - height - rise],
                [start + cabin, bottom - height],
            ]
        ),
    )
    wheel = rng.uniform(0.06, 0.1)
    for x in np.linspace(left + 0.15 * length, left + 0.85 * length, int(rng.integers(2, 4))):
        _ellipse(pen, x, bottom, wheel, wheel)


def _vessel(pen, rng):
    """A bottle, vase or cup: a profile of revolution, maybe with a handle (a ring behind the body)."""
    ys = np.linspace(0.1, 0.9, 40)
    knots = rng.uniform(0.05, 0.3, 5)
    knots[0] = rng.uniform(0.04, 0.1)  # a neck or rim
    width = np.interp(ys, np.linspace(0.1, 0.9, 5), knots)
    if rng.random() < 0.4:
        r = rng.uniform(0.08, 0.14)
        x = 0.5 + width.max()
        _ellipse(pen, x, 0.5, r, r * 1.4)
        _ellipse(pen, x, 0.5, r * 0.55, r * 0.9, fill=0)
    _polygon(pen, np.concatenate([np.stack([0.5 - width, ys], 1), np.stack([0.5 + width, ys], 1)[::-1]]))


def _leaf(pen, rng):
    """Two arcs meeting at the tips, on a stem, turned."""
    t = np.linspace(0, 1, 40)
    half = rng.uniform(0.12, 0.3) * np.sin(np.pi * t) ** rng.uniform(0.6, 1.2)
    x = 0.1 + 0.75 * t
    outline = np.concatenate([np.stack([x, 0.5 - half], 1), np.stack([x, 0.5 + half * rng.uniform(0.6, 1.0)], 1)[::-1]])
    angle = rng.uniform(0, 2 * np.pi)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    outline = (outline - 0.5) @ turn.T + 0.5
    _polygon(pen, outline)
    stem = (np.array([[0.1, 0.5], [-0.05, 0.5 + rng.uniform(-0.05, 0.05)]]) - 0.5) @ turn.T + 0.5
    _bar(pen, tuple(stem[0]), tuple(stem[1]), rng.uniform(0.015, 0.03))


def _building(pen, rng):
    """A house or a tower: walls, a roof (pitched or flat), maybe a chimney or a second block."""
    width, height = rng.uniform(0.35, 0.7), rng.uniform(0.3, 0.6)
    left, bottom = 0.5 - width / 2, 0.9
    pen.rectangle([left * CANVAS, (bottom - height) * CANVAS, (left + width) * CANVAS, bottom * CANVAS], fill=255)
    if rng.random() < 0.7:
        overhang = rng.uniform(0, 0.06)
        _polygon(
            pen,
            np.array(
                [
                    [left - overhang, bottom - height],
                    [0.5 + rng.normal(0, 0.05), bottom - height - rng.uniform(0.15, 0.3)],
                    [left + width + overhang, bottom - height],
                ]
            ),
        )
    if rng.random() < 0.5:
        x = left + rng.uniform(0.1, 0.8) * width
        pen.rectangle(
            [x * CANVAS, (bottom - height - 0.15) * CANVAS, (x + 0.06) * CANVAS, (bottom - height + 0.05) * CANVAS],
            fill=255,
        )
    if rng.random() < 0.4:  # a second, lower block beside it
        w2, h2 = rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.3)
        pen.rectangle(
            [(left + width) * CANVAS, (bottom - h2) * CANVAS, (left + width + w2) * CANVAS, bottom * CANVAS], fill=255
        )


SHAPES = [_blob, _star, _animal, _tool, _vehicle, _vessel, _leaf, _building]


def texture(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey texture of a 28 x 28 object mask (coverage in [0, 1]): level, gradient, pattern, rim; float in [0, 1]."""
    size = mask.shape[0]
    y, x = np.mgrid[:size, :size] / (size - 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    grey = rng.uniform(*LEVEL) + rng.uniform(-GRADIENT, GRADIENT) * (x * np.cos(angle) + y * np.sin(angle))
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    if pattern == "stripes":
        period = rng.uniform(2.0, 5.0)
        grey = grey + rng.uniform(0.05, 0.2) * np.sign(
            np.sin(2 * np.pi * (x * np.cos(angle) - y * np.sin(angle)) * size / period)
        )
    elif pattern == "noise":
        grey = grey + rng.normal(0, rng.uniform(0.04, 0.12), mask.shape)
    elif pattern == "knit":
        grey = grey + rng.uniform(0.04, 0.12) * np.sin(np.pi * np.arange(size))[None, :] * np.cos(np.pi * y * size)
    elif pattern == "seams":
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                grey[:, rng.integers(4, size - 4)] -= rng.uniform(0.15, 0.35)
            else:
                grey[rng.integers(4, size - 4), :] -= rng.uniform(0.15, 0.35)
    from scipy.ndimage import binary_erosion

    inside = mask > 0.5
    rim = inside & ~binary_erosion(inside, iterations=1)
    grey = np.where(rim, grey + rng.uniform(-0.3, 0.2), grey)
    return np.clip(grey, 0.05, 1.0) * mask


def image(kind: int, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (CANVAS, CANVAS))
    SHAPES[kind](ImageDraw.Draw(canvas), rng)
    mask = np.asarray(canvas, np.float32) / 255.0
    if _frame.blank(mask):  # every shape draws inside the canvas; a blank one is a bug, not a sample
        raise AssertionError(f"silhouette {CLASSES[kind]} drew nothing")
    framed = _frame.fashion_like(mask).astype(np.float32) / 255.0
    return np.round(texture(framed, rng) * 255).astype(np.uint8)


def load_silhouettes(name: str, seed: int, n_train: int, n_test: int, **_):
    raw = _frame.drawn_family(name, CLASSES, image, seed, n_train, n_test)
    raw.attrs["generator"] = (
        "closed shapes (label: " + ", ".join(CLASSES) + "): Fourier-contour blobs, star polygons and compositions "
        f"of ellipses, bars and polygons drawn at {CANVAS}x{CANVAS}, framed as FashionMNIST (longest side 28, "
        f"centred) and filled with a grey texture (level {LEVEL[0]:g}-{LEVEL[1]:g}, gradient up to {GRADIENT:g}, "
        f"pattern {'/'.join(PATTERNS)}, a brighter or darker rim)"
    )
    return raw
