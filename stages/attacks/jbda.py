"""Jacobian-based dataset augmentation (JBDA, Papernot et al., 2017) and its targeted random variant JBDA-TR
(PRADA, Juuti et al., 2019): from a few seed images, grow the transfer set round by round along the sign of the
surrogate's input gradient; every round labels the set with the victim and retrains the surrogate.

Official schedule: 150 seeds, 6 rounds of 10 epochs, lambda 0.1, whole set re-labelled each round (9,450 queries).
"""

from __future__ import annotations

import torch

from models.params import Param
from stages.attacks._thief import Attack, Query, Thief, ask, train_surrogate


class JBDA(Attack):
    PARAMS = {
        "seeds": Param(150, 1, 1e9, True, "seed images (from --pool, else the victim's train split)"),
        "rounds": Param(6, 1, 30, True, "augmentation rounds"),
        "step": Param(0.1, 0.0, 1.0, False, "lambda: size of the sign-gradient step"),
        "relabel": Param(1, 0, 1, True, "1: query the whole set every round (official); 0: only new images"),
        "jitter": Param(
            0.0, 0.0, 1.0, False, "each pixel's step scaled by a uniform draw in [1 - jitter, 1 + jitter] (0: official)"
        ),
        "sparse": Param(1.0, 0.01, 1.0, False, "share of pixels stepped, those of largest |gradient| (1: official)"),
    }
    POOL = "seeds"
    LABELS = ("soft", "hard")
    UINT8_QUERIES = False  # augmented images leave the 8-bit grid
    DEFAULT_EPOCHS = 10  # per round
    TARGETED = False
    seeds: int
    rounds: int
    step: float
    relabel: int
    jitter: float
    sparse: float

    def planned_epochs(self, epochs: int) -> int:
        return epochs * self.rounds

    def run(self, query: Query, thief: Thief) -> None:
        """Checkpoints after each round's queries (the set, its answers, the round) and after every epoch."""
        seeds = min(self.seeds, len(thief.pool))
        capacity = seeds * 2 ** (self.rounds - 1)
        images = torch.empty(capacity, *thief.input_shape)  # preallocated: each round doubles the filled part
        soft = query.label == "soft"
        targets = torch.empty(
            (capacity, thief.num_classes) if soft else (capacity,), dtype=torch.float32 if soft else torch.long
        )
        state = thief.resume()
        if state:
            first_round, size, labelled = int(state["round"]), int(state["size"]), int(state["labelled"])
            images[:size], targets[:labelled] = state["images"], state["targets"]
        else:
            pick = torch.randperm(len(thief.pool), generator=thief.rng)[:seeds]
            images[:seeds] = thief.pool[pick].float() / 255.0
            first_round, size, labelled = 0, seeds, 0
        for r in range(first_round, self.rounds):
            if not state:  # a resumed round had its queries answered before the interruption
                first = 0 if self.relabel else labelled
                done = first
                for start, answers in ask(query, images[first:size], thief.query_batch):
                    targets[first + start : first + start + len(answers)] = answers.cpu()
                    done = first + start + len(answers)
                labelled = max(labelled, done)
                if labelled == 0:
                    return
            keep = {
                "round": r,
                "size": size,
                "labelled": labelled,
                "images": images[:size],
                "targets": targets[:labelled],
            }
            if not state:
                thief.checkpoint(keep)
            train_surrogate(thief, images[:labelled], targets[:labelled], thief.recipe.epochs, keep, state)
            state = {}
            if labelled < size or query.remaining == 0 or r == self.rounds - 1:
                return
            labels = targets[:size].argmax(1) if soft else targets[:size]
            images[size : 2 * size] = self._augment(thief, images[:size], labels)
            size *= 2

    def _augment(self, thief: Thief, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x + lambda sign(d S(x)_label / dx), clipped to [0, 1], in batches."""
        out = torch.empty_like(x)
        for start in range(0, len(x), 512):
            out[start : start + 512] = self._step(
                thief, x[start : start + 512].to(thief.device), labels[start : start + 512].to(thief.device)
            ).cpu()
        return out

    def _step(self, thief: Thief, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        score = thief.surrogate(x).gather(1, labels[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
        return (x + self.step * self._signs(thief, grad)).clamp(0.0, 1.0).detach()

    def _signs(self, thief: Thief, grad: torch.Tensor) -> torch.Tensor:
        """sign(grad) on the `sparse` share of each image's pixels of largest |grad| (0 elsewhere), each scaled by
        1 + jitter u, u uniform on [-1, 1]: a step whose changed pixels do not all move by one magnitude, nor fill
        the image, the two patterns a monitor could read."""
        signs = grad.sign()
        if self.sparse < 1.0:
            size = grad.abs().flatten(1)
            kept = size >= size.topk(max(1, round(self.sparse * size.shape[1])), dim=1).values[:, -1:]
            signs = signs * kept.view_as(grad)
        if not self.jitter:
            return signs
        u = torch.rand(grad.shape, generator=thief.rng).to(grad.device) * 2.0 - 1.0
        return signs * (1.0 + self.jitter * u)


class JBDATR(JBDA):
    """Targeted random steps: towards a random class other than the victim's label, in 5 sub-steps of lambda/5."""

    TARGETED = True
    SUBSTEPS = 5

    def _step(self, thief: Thief, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        k = thief.num_classes
        offset = torch.randint(1, k, labels.shape, generator=thief.rng).to(labels.device) if k > 1 else 0
        target = (labels + offset) % k
        for _ in range(self.SUBSTEPS):
            x = x.clone().requires_grad_(True)
            score = torch.log_softmax(thief.surrogate(x), 1).gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(score, x)
            x = (x + self.step / self.SUBSTEPS * self._signs(thief, grad)).clamp(0.0, 1.0).detach()
        return x
