"""Whether a derived image still looks like a real one: its distance to the nearest of REFERENCES real images
(Euclidean, on 14 x 14 average-pooled pixels in [0, 1]), against the distances of CALIBRATION other real images
to their own nearest reference. An image nearer than the QUANTILE of those reads as real, and is drawn again.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

REFERENCES = 5000
CALIBRATION = 1000
# Measured on MNIST: 76% of real test digits fall below this quantile (the references come from train), and of
# digits-transformed's first drafts 54% of the erased digits, 38% of the recombined halves, 26% of the half turns,
# 19% of the digits with strokes added, 10-13% of the mirrored and flipped, 1% of the quarter turns. At the median
# instead, drafts that read as digits by eye passed (erased 7s as 1s, halves joined into a 3 or a 5).
QUANTILE = 0.75
CHUNK = 4096


def _features(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, np.uint8)).float().div_(255).reshape(-1, 1, 28, 28)
    return F.avg_pool2d(x, 2).flatten(1)


class Lookalike:
    def __init__(self, real: np.ndarray, rng: np.random.Generator):
        """`real`: uint8 (N, 28, 28) images of the source set; references and calibration images drawn from it."""
        order = rng.permutation(len(real))
        self.references = _features(real[order[:REFERENCES]])
        self.norms = (self.references**2).sum(1)
        calibration = self.nearest(real[order[REFERENCES : REFERENCES + CALIBRATION]])
        self.threshold = float(np.quantile(calibration, QUANTILE))

    def nearest(self, images: np.ndarray) -> np.ndarray:
        """Distance of each image to its nearest reference."""
        out = []
        for start in range(0, len(images), CHUNK):
            x = _features(images[start : start + CHUNK])
            squared = (x**2).sum(1, keepdim=True) - 2 * x @ self.references.T + self.norms[None]
            out.append(squared.clamp_min(0).min(1).values.sqrt())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """True where an image reads as a real one."""
        return self.nearest(images) < self.threshold

    def draw(self, n: int, make: Callable[[int], np.ndarray], rounds: int) -> tuple[np.ndarray, int]:
        """n images `make(k)` (uint8 28 x 28, k the slot); one that reads as real is made again, up to `rounds`
        times. Also returns how many were."""
        out = np.empty((n, 1, 28, 28), np.uint8)
        todo, redrawn = np.arange(n), 0
        for round_ in range(rounds + 1):
            for k in todo:
                out[k, 0] = make(int(k))
            if round_ == rounds:
                break
            todo = todo[self(out[todo, 0])]
            redrawn += len(todo)
        return out, redrawn
