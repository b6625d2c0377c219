"""A confidence-seeking thief: it learns where the victim answers confidently and sends its queries there.

The budget is split over `rounds`. Round 1 queries random pool images; every later round takes fresh pool images
and moves each by `steps` signed-gradient steps (projected to an L-inf ball of `radius` around it, step
2.5 radius / steps) that raise the surrogate's log-probability of its own top class, then queries them. After each
round the surrogate trains for --epochs on the answers so far, those of certainty (1 - H(p) / log K) below
`min_score` left out.

Why this design: the search costs no queries (the gradient is the surrogate's, not a zeroth-order estimate of the
victim's, which DFME pays m+1 queries per image for), so every query lands in the transfer set; and the surrogate,
distilled from the victim's answers, is confident where the victim was, so its confidence gradient points from
the regions a defense like InI answers uniformly towards those it answers. Soft labels only: the certainty needs
probabilities.
"""

from __future__ import annotations

import torch

from models.params import Param
from stages.attacks._thief import Attack, Query, Thief, train_surrogate
from stages.attacks.knockoff_confident import KnockoffConfident, ask_all, certainty
from stages.data import prepared as _data

MOVE_BATCH = 512  # candidates per gradient pass


class ConfidenceSearch(Attack):
    PARAMS = {
        "rounds": Param(
            4, 1, 30, True, "query rounds, the budget split evenly; the surrogate trains --epochs after each"
        ),
        "steps": Param(10, 0, 1000, True, "gradient steps moving each candidate (0: no search)"),
        "radius": Param(0.25, 0.0, 1.0, False, "largest change of a pixel from its pool image"),
        "min_score": KnockoffConfident.PARAMS["min_score"],  # the same cut
    }
    POOL = "required"
    LABELS = ("soft",)  # the certainty needs probabilities
    UINT8_QUERIES = False  # moved images leave the 8-bit grid
    DEFAULT_EPOCHS = 10  # per round

    def planned_epochs(self, epochs: int) -> int:
        return epochs * self.rounds

    def run(self, query: Query, thief: Thief) -> None:
        """Checkpoints after each round's queries (the pool order, the images asked, the answers) and after every
        epoch."""
        state = thief.resume()
        if state:
            order, first, size = state["order"], int(state["round"]), int(state["size"])
        else:
            order = torch.randperm(len(thief.pool), generator=thief.rng)[: min(query.remaining, len(thief.pool))]
            first, size = 0, 0
        total = len(order)
        images = torch.empty(total, *thief.input_shape)  # preallocated: each round fills the next slice
        targets = torch.empty(total, thief.num_classes)
        if state:
            images[:size], targets[:size] = state["images"], state["targets"]
        for r in range(first, self.rounds):
            end = total * (r + 1) // self.rounds
            if not state:  # a resumed round had its queries answered before the interruption
                candidates = _data.to_float(thief.pool[order[size:end]])
                if r > 0:
                    candidates = self._move(thief, candidates)
                answers = ask_all(query, thief, candidates)
                images[size : size + len(answers)] = candidates[: len(answers)]
                targets[size : size + len(answers)] = answers
                size += len(answers)
            keep = {"round": r, "order": order, "size": size, "images": images[:size], "targets": targets[:size]}
            if not state:
                thief.checkpoint(keep)
            kept = certainty(targets[:size]) >= self.min_score
            train_surrogate(thief, images[:size][kept], targets[:size][kept], thief.recipe.epochs, keep, state)
            state = {}
            if size < end or query.remaining == 0:
                return

    def _move(self, thief: Thief, x: torch.Tensor) -> torch.Tensor:
        """Projected signed-gradient ascent of log S(x)_top, top the surrogate's class at the start."""
        if self.steps == 0 or self.radius == 0:
            return x
        model, alpha = thief.surrogate.eval(), 2.5 * self.radius / self.steps  # Madry et al.'s step for PGD
        out = torch.empty_like(x)
        for start in range(0, len(x), MOVE_BATCH):
            origin = x[start : start + MOVE_BATCH].to(thief.device)
            with torch.no_grad():
                top = model(origin).argmax(1, keepdim=True)
            moved = origin
            for _ in range(self.steps):
                moved = moved.clone().requires_grad_(True)
                score = torch.log_softmax(model(moved), 1).gather(1, top).sum()
                (grad,) = torch.autograd.grad(score, moved)
                step = moved.detach() + alpha * grad.sign()
                moved = torch.min(torch.max(step, origin - self.radius), origin + self.radius).clamp(0.0, 1.0)
            out[start : start + MOVE_BATCH] = moved.cpu()
        return out
