"""A thief with a small labelled seed: KnockoffNets on the pool plus cross-entropy on k labelled in-distribution
images it already holds (drawn with the thief's --seed from the victim's train split, as jbda draws its seeds).

The labelled images are never sent to the victim and spend no budget; every training step adds `seed_weight` x
the cross-entropy of a batch of them (min(k, --batch-size) images, drawn with replacement each step) to the
distillation loss on the pool answers. A defense that answers outliers uninformatively cannot poison what the
seed teaches. JBDA grown from such a seed is `jbda` without --pool and `--attack-param seeds=K` (it queries them).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.params import Param
from stages.attacks._thief import Query, Thief, train_surrogate
from stages.attacks.knockoff import Knockoff
from stages.data import prepared as _data


class Seeded(Knockoff):
    PARAMS = {
        "seeds": Param(
            100, 1, 1e9, True, "k: labelled images of the victim's train split the thief holds (not queries)"
        ),
        "seed_weight": Param(1.0, 0.0, 1e3, False, "weight of their cross-entropy beside the distillation loss"),
    }
    LABELLED = True  # steal hands it the victim's train split (thief.labelled)

    def run(self, query: Query, thief: Thief) -> None:
        """Checkpoints after querying (the seed's and the queries' indices, the answers) and after every epoch."""
        state = thief.resume()
        if not state:
            images = thief.labelled[0]
            seed = torch.randperm(len(images), generator=thief.rng)[: min(self.seeds, len(images))]
            state = {"seed": seed, **self._query(query, thief)}
            thief.checkpoint(state)
        train_surrogate(
            thief,
            thief.pool[state["order"]],
            state["targets"],
            thief.recipe.epochs,
            state,
            state,
            extra_loss=self._seed_loss(thief, state["seed"]),
        )

    def _seed_loss(self, thief: Thief, seed: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
        images, labels = thief.labelled[0][seed], thief.labelled[1][seed]
        batch = max(2, min(len(seed), thief.recipe.batch_size))  # two at least: one image cannot train BatchNorm

        def loss(model: nn.Module) -> torch.Tensor:
            idx = torch.randint(0, len(seed), (batch,), generator=thief.rng)
            x = _data.to_float(images[idx].to(thief.device))
            return self.seed_weight * F.cross_entropy(model(x), labels[idx].to(thief.device))

        return loss
