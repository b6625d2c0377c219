"""Confidence-aware KnockoffNets: a thief that sees which answers carry no information and leaves them out.

A defense like InI answers the images it takes for outliers with near-uniform probabilities; the thief scores every
answer by its certainty (1 - H(p) / log K, or the rescaled top probability: 0 for a uniform answer, 1 for a one-hot
one) and trains only on those above a cut, optionally weighted by it. The cuts use the answers alone, never ground
truth: a fixed certainty (`min_score`) and a quantile of the answers' certainty (`keep`). The two-phase variant
(`explore` < 1) spends that share of the budget on random pool images, then the rest on the unqueried pool images
nearest the confidently answered ones (in the feature space of the surrogate trained on phase 1, or in pixel
space), or on shifted copies of them.

The default cut, 0.02 (entropy above 0.98 log K), separates InI's answers and costs an undefended victim's thief
almost nothing (measured on MNIST LeNet-5 victims, 10,000 FashionMNIST images: 99.7% of the faithful preset's and
99.5% of the broad preset's answers score below it, 80% of both at 0.001-0.002, against 0.15% of the undefended
victim's; on MNIST test digits 90% of InI's answers score above 0.8). A cut at 0.1 drops 4.6% of the undefended
victim's answers as well.

Soft labels only: with top-1 labels no confidence is visible, and the agreement of shifted views does not stand in
for it against InI, whose outlier label is stable (measured, faithful MNIST victim, 4 views shifted by up to 2 px:
one label in all 4 views for 96% of FashionMNIST images, more than for MNIST test digits, 79%).
"""

from __future__ import annotations

import math

import torch

from models.params import Param
from stages.attacks._thief import Attack, Query, Thief, ask, train_surrogate
from stages.attacks.adaptive import shift_flip
from stages.attacks.knockoff import Knockoff
from stages.data import prepared as _data

FEATURES, PIXELS, SHIFTS = 0, 1, 2  # values of `near`
CHUNK = 2048  # images per distance block and per feature pass
STATE = ("phase", "order", "targets", "unasked", "shifted")  # what a checkpoint keeps of the attack


def certainty(probs: torch.Tensor, entropy: bool = True) -> torch.Tensor:
    """Per answer, in [0, 1]: 0 for a uniform answer, 1 for a one-hot one (1 - H(p) / log K, or the top probability
    rescaled from [1/K, 1])."""
    k = probs.shape[1]
    if k < 2:
        return torch.ones(len(probs))
    if entropy:
        return (1.0 + (probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(k)).clamp(0.0, 1.0)
    return ((probs.max(1).values - 1.0 / k) / (1.0 - 1.0 / k)).clamp(0.0, 1.0)


def confident(scores: torch.Tensor, min_score: float, keep: float = 1.0) -> torch.Tensor:
    """The answers kept: certainty at least `min_score`, and among the `keep` share of highest certainty."""
    mask = scores >= min_score
    if keep < 1.0 and len(scores):
        mask &= scores >= torch.quantile(scores, 1.0 - keep)
    return mask


def nearest_first(candidates: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Candidate indices in the order a thief takes them near its anchors: every candidate belongs to its nearest
    anchor; each anchor's nearest candidate comes first, then each anchor's second, and so on (ties by distance),
    so the new queries spread over all the anchors rather than crowd around a few."""
    dist = torch.empty(len(candidates))
    owner = torch.empty(len(candidates), dtype=torch.long)
    for start in range(0, len(candidates), CHUNK):
        d = torch.cdist(candidates[start : start + CHUNK], anchors)
        dist[start : start + CHUNK], owner[start : start + CHUNK] = d.min(1)
    by_owner = torch.argsort(dist, stable=True)
    by_owner = by_owner[torch.argsort(owner[by_owner], stable=True)]  # grouped by anchor, nearest first
    counts = torch.bincount(owner, minlength=len(anchors))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(len(candidates), dtype=torch.long)
    rank[by_owner] = torch.arange(len(candidates)) - starts.repeat_interleave(counts)
    order = torch.argsort(dist, stable=True)
    return order[torch.argsort(rank[order], stable=True)]


def ask_all(query: Query, thief: Thief, images: torch.Tensor) -> torch.Tensor:
    """The victim's probabilities for `images`, as many as the budget allows."""
    targets = torch.empty(len(images), thief.num_classes)
    filled = 0
    for start, answers in ask(query, images, thief.query_batch):
        targets[start : start + len(answers)] = answers.cpu()
        filled = start + len(answers)
    return targets[:filled]


class KnockoffConfident(Attack):
    PARAMS = {
        "entropy": Param(1, 0, 1, True, "certainty score: 1: one minus entropy over log K; 0: top probability"),
        "min_score": Param(
            0.02, 0.0, 1.0, False, "answers of lower certainty are left out (0.02: entropy above 0.98 log K)"
        ),
        "keep": Param(1.0, 0.01, 1.0, False, "keep at most this share of the answers, the most certain"),
        "weighted": Param(0, 0, 1, True, "1: weight each kept answer's loss by its certainty"),
        "explore": Param(
            1.0,
            0.01,
            1.0,
            False,
            "share of the budget spent on random pool images; the rest goes near the confident ones (1: one phase)",
        ),
        "near": Param(
            0,
            0,
            2,
            True,
            "phase 2 queries 0: the nearest pool images in the surrogate's feature space; "
            "1: in pixel space; 2: shifted copies of the confident images",
        ),
        "shift": Param(2, 0, 16, True, "largest translation in pixels of near=2"),
    }
    POOL = "required"
    LABELS = ("soft",)  # top-1 labels show no confidence (module docstring)
    UINT8_QUERIES = True  # pool images and their integer shifts
    DEFAULT_EPOCHS = 50
    OPTIMIZER, SCHEDULE = Knockoff.OPTIMIZER, Knockoff.SCHEDULE  # the calibrated thief's recipe

    def _two_phase(self) -> bool:
        return self.explore < 1.0

    def planned_epochs(self, epochs: int) -> int:
        return 2 * epochs if self._two_phase() and self.near == FEATURES else epochs

    def run(self, query: Query, thief: Thief) -> None:
        """Checkpoints after each phase's queries (pool indices, shifted copies, answers) and after every epoch."""
        state = thief.resume()
        if not state:
            n = min(query.remaining, len(thief.pool))
            first = max(1, round(self.explore * n)) if self._two_phase() else n
            order = torch.randperm(len(thief.pool), generator=thief.rng)
            state = {"phase": 1, **self._ask(query, thief, order[:first])}
            if self._two_phase():
                state["unasked"] = order[first:]
            thief.checkpoint(state)
        if state["phase"] == 1 and self._two_phase():
            if self.near == FEATURES:
                self._train(thief, state)
            state = self._second_phase(query, thief, state)
            thief.checkpoint(state)
        self._train(thief, state)

    def _ask(self, query: Query, thief: Thief, order: torch.Tensor) -> dict[str, torch.Tensor]:
        targets = ask_all(query, thief, thief.pool[order])
        return {"order": order[: len(targets)], "targets": targets}

    def _train(self, thief: Thief, state: dict) -> None:
        images = thief.pool[state["order"]]
        if "shifted" in state:
            images = torch.cat([images, state["shifted"]])
        scores = certainty(state["targets"], bool(self.entropy))
        kept = confident(scores, self.min_score, self.keep)
        weights = None
        if self.weighted and kept.any():
            weights = scores[kept] / scores[kept].mean()  # mean 1: the learning rate means what it meant
        keep = {key: state[key] for key in STATE if key in state}
        train_surrogate(thief, images[kept], state["targets"][kept], thief.recipe.epochs, keep, state, weights)

    def _second_phase(self, query: Query, thief: Thief, state: dict) -> dict[str, torch.Tensor]:
        """Phase 2: the rest of the budget near the confidently answered phase-1 images (random if there are none)."""
        targets = state["targets"]
        anchors = state["order"][confident(certainty(targets, bool(self.entropy)), self.min_score, self.keep)]
        unasked = state["unasked"]
        if self.near == SHIFTS and len(anchors):
            picks = anchors[torch.arange(query.remaining) % len(anchors)]  # round robin over the anchors
            shifted = shift_flip(thief.pool[picks], thief.rng, self.shift, thief.input_shape[0] == 3)
            answers = ask_all(query, thief, shifted)
            return {
                "phase": 2,
                "order": state["order"],
                "shifted": shifted[: len(answers)],
                "targets": torch.cat([targets, answers]),
            }
        if len(anchors) and len(unasked):
            unasked = unasked[nearest_first(self._embed(thief, unasked), self._embed(thief, anchors))]
        more = self._ask(query, thief, unasked[: query.remaining])
        return {
            "phase": 2,
            "order": torch.cat([state["order"], more["order"]]),
            "targets": torch.cat([targets, more["targets"]]),
        }

    @torch.no_grad()
    def _embed(self, thief: Thief, indices: torch.Tensor) -> torch.Tensor:
        """Pool images as points: the surrogate's penultimate features, or their pixels."""
        if self.near == PIXELS:
            return thief.pool[indices].flatten(1).float()
        model = thief.surrogate.eval()
        out = [
            model.features(_data.to_float(thief.pool[indices[s : s + CHUNK]].to(thief.device))).cpu()
            for s in range(0, len(indices), CHUNK)
        ]
        return torch.cat(out)
