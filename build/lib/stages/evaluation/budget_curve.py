"""Stealing accuracy against queries spent, for the attacks that query first and train after (knockoff, adaptive):
their per-epoch history is all at the full budget, so `steal --budget-curve K` trains K more surrogates, from the
same initialisation with the same recipe, on the first used/2, used/4, ... used/2^K queries of the transfer set (a
random subset of the pool: the queries were drawn in random order). jbda and dfme need none: each of their rounds
or budget slices is a surrogate trained on the queries spent so far. `evaluate` reads either as queries to reach
50 / 80 / 95 % of the victim's benign accuracy.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from stages.attacks import blackbox as _blackbox
from stages.attacks._thief import SurrogateRecipe, Thief, train_surrogate


def prefixes(used: int, points: int) -> list[int]:
    """used/2^K, ..., used/2: geometric, because the accuracy rises fastest over the first queries."""
    sizes = sorted({math.ceil(used / 2**k) for k in range(1, points + 1)})
    return [n for n in sizes if 2 <= n < used]


def measure(
    images,
    answers,
    label: str,
    attack: str,
    sizes: list[int],
    build: Callable[[], torch.nn.Module],
    recipe: SurrogateRecipe,
    num_classes: int,
    input_shape: tuple,
    seed: int,
    device: str,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    log: Callable[[str], None],
) -> dict[str, list[float]]:
    """{queries, stealing_accuracy} of a surrogate trained on the first n queries of the recorded transfer set, for
    each n of `sizes`.

    `images` and `answers` as the black box stores them (uint8 or float images; probabilities or labels);
    adaptive's answers are cut to each view's top-1 label, as that attack keeps only labels."""
    x = torch.from_numpy(images[()])
    y = torch.from_numpy(answers[()])
    if attack == "adaptive" and y.dim() == 2:
        y = y.argmax(1)
    curve: dict[str, list[float]] = {"queries": [], "stealing_accuracy": []}
    for n in sizes:
        surrogate = build()
        thief = Thief(surrogate, recipe, num_classes, tuple(input_shape), torch.Generator().manual_seed(seed), device)
        train_surrogate(thief, x[:n], y[:n], recipe.epochs)
        predicted = _blackbox.predict(surrogate.eval(), test_x, device).argmax(1).cpu()
        accuracy = float((predicted == test_y).float().mean())
        curve["queries"].append(float(n))
        curve["stealing_accuracy"].append(accuracy)
        log(f"budget curve: {n:,} queries -> stealing accuracy {accuracy:.4f}")
    return curve
