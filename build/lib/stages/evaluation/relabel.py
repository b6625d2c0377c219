"""The best class relabelling a thief can find from k labelled in-distribution images: the one-to-one map of its
surrogate's classes that agrees most often with the labels on those images (Hungarian assignment on their
confusion matrix), applied to the surrogate's test predictions (docs/method.md, "Metrics"). A surrogate that
learned a systematic relabelling of the victim's classes scores as the classifier it is.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SEED = 0  # the k images are the same for every surrogate of a dataset: differences are the surrogates' own


def draw(n: int, k: int, seed: int = SEED) -> torch.Tensor:
    """k of n indices (all n when k is larger), the same for the same (n, k, seed)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def mapping(predicted: torch.Tensor, reference: torch.Tensor, classes: int) -> torch.Tensor:
    """map[c] for each predicted class c: the one-to-one map under which map[predicted] agrees with `reference` on
    the most images. Among maps that agree equally often, the one that keeps the most classes as they are: the
    diagonal bonus adds under 1 in all, so it never outweighs one agreement."""
    counts = np.zeros((classes, classes))
    np.add.at(counts, (predicted.numpy(), reference.numpy()), 1.0)
    rows, cols = linear_sum_assignment(counts + np.eye(classes) / (classes + 1), maximize=True)
    out = torch.empty(classes, dtype=torch.long)
    out[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return out


def agreement(
    predicted: torch.Tensor, reference: torch.Tensor, seen: torch.Tensor, seen_reference: torch.Tensor, classes: int
) -> float:
    """Share of `predicted` equal to `reference` after the relabelling found on (seen, seen_reference): the
    surrogate's predictions and the labels on the k images. NaN without images to find it on."""
    if not len(seen):
        return float("nan")
    relabel = mapping(seen, seen_reference, classes)
    return float((relabel[predicted] == reference).float().mean())
