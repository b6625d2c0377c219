"""`pen-strokes`: procedural pen strokes framed as MNIST. Each stroke chains two or three cubic Bézier segments
(smooth joins, half of them drawn with a loop) under a pen-pressure profile; one to three strokes cross in an image.
The label is the number of strokes. `draw` also lends strokes to `digits-transformed`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from stages.data.near import _frame

CLASSES = ["1 stroke", "2 strokes", "3 strokes"]
SEGMENTS = (2, 3)  # cubic segments per stroke
LOOP = 0.5  # chance that a segment's control points cross over, drawing a loop
POINTS = 32  # samples per segment
CANVAS = 4 * _frame.MNIST_BOX  # the strokes' longest extent when drawn, 4x the 20-pixel box
WIDTH = (7.0, 12.0)  # peak pen width on that canvas: 1.75 to 3 pixels once framed, as MNIST's strokes
SHIFTS = ((-1, 0.2), (0, 0.6), (1, 0.2))  # pixels, per axis, off the centre of mass


def bezier(p: np.ndarray) -> np.ndarray:
    """POINTS samples of the cubic with control points p (4, 2)."""
    t = np.linspace(0.0, 1.0, POINTS)[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


def stroke(
    rng: np.random.Generator, segments: tuple[int, ...] = SEGMENTS, loop: float = LOOP
) -> tuple[np.ndarray, np.ndarray]:
    """One stroke in the unit square: points (m, 2) and pen pressure (m,) in (0, 1]."""
    start = rng.uniform(0.0, 1.0, 2)
    handle = rng.normal(0.0, 0.35, 2)
    parts = []
    for _ in range(rng.choice(segments)):
        end = rng.uniform(0.0, 1.0, 2)
        c1, c2 = start + handle, end + rng.normal(0.0, 0.35, 2)
        if rng.random() < loop:  # control points on the far sides of the chord: the curve crosses itself
            chord = end - start
            c1, c2 = end + 0.9 * chord + rng.normal(0, 0.15, 2), start - 0.9 * chord + rng.normal(0, 0.15, 2)
        parts.append(bezier(np.stack([start, c1, c2, end])))
        handle, start = end - c2, end  # the next segment leaves in the direction this one arrived: a smooth join
    points = np.concatenate(parts)
    return points, pressure(rng, len(points))


def pressure(rng: np.random.Generator, m: int) -> np.ndarray:
    """Pen pressure along m samples, in (0, 1]: rises from the pen landing, falls as it lifts, wavers between."""
    t = np.linspace(0.0, 1.0, m)
    envelope = np.minimum(1.0, np.minimum(t, 1 - t) / rng.uniform(0.05, 0.2)) ** 0.5
    waver = 1 + 0.2 * np.sin(2 * np.pi * (rng.uniform(0.5, 2.0) * t + rng.random()))
    return np.clip(0.35 + 0.65 * envelope * waver / 1.2, 0.2, 1.0)


def draw(
    strokes: list[tuple[np.ndarray, np.ndarray]], width: float, scale: float, offset: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Strokes (unit coordinates) drawn white on black at `scale` pixels per unit plus `offset`, peak width `width`
    pixels: runs of equal (whole-pixel) width as polylines with round caps (the turns between samples are too
    gentle to need round joints). Float mask of `size` (width, height)."""
    canvas = Image.new("L", size)
    pen = ImageDraw.Draw(canvas)
    for points, pressure in strokes:
        xy = points * scale + offset
        widths = np.maximum(1, np.round(width * pressure)).astype(int)
        starts = np.flatnonzero(np.diff(widths, prepend=-1))
        for start, stop in zip(starts, list(starts[1:]) + [len(xy) - 1], strict=False):
            run = xy[start : stop + 1]
            w = int(widths[start])
            if len(run) > 1:
                pen.line(run.ravel().tolist(), fill=255, width=w)
            for x, y in (run[0], run[-1]):
                pen.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=255)
    return np.asarray(canvas, np.float32) / 255.0


def image(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` strokes framed as MNIST (uint8 28 x 28)."""
    strokes = [stroke(rng) for _ in range(count)]
    points = np.concatenate([p for p, _ in strokes])
    low, high = points.min(0), points.max(0)
    scale = CANVAS / max(float((high - low).max()), 1e-3)
    width = rng.uniform(*WIDTH)
    margin = width + 2
    size = tuple(int(np.ceil(v)) for v in (high - low) * scale + 2 * margin)
    mask = draw(strokes, width, scale, margin - low * scale, size)
    shifts, weights = zip(*SHIFTS, strict=False)
    return _frame.mnist_like(mask, tuple(rng.choice(shifts, 2, p=weights)))


def load_pen_strokes(name: str, seed: int, n_train: int, n_test: int, **_):
    raw = _frame.drawn_family(name, CLASSES, lambda label, rng: image(rng, label + 1), seed, n_train, n_test)
    raw.attrs["generator"] = (
        f"1-3 pen strokes (label: how many), each {'-'.join(map(str, SEGMENTS))} smoothly joined random cubic Bezier "
        f"segments in the unit square, each a loop with probability {LOOP:g}, drawn with a pen-pressure width profile "
        f"(peak {WIDTH[0] / 4:g}-{WIDTH[1] / 4:g} px once framed), framed as MNIST, shift +-1 px"
    )
    return raw
