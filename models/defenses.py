"""Posterior defenses that sit inside the deployed graph: images in [0, 1] -> network -> softmax -> defense.

A defense maps (images, probabilities) to probabilities on the simplex; `DEFENSES` is the registry the CLI
offers. InI needs none: its victim is deployed with `none`, one plain forward pass.
"""

from __future__ import annotations

import torch
from torch import nn


class NoDefense(nn.Module):
    """The undefended posterior (and InI's: its protection is in the weights)."""

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return probs


class Deployed(nn.Module):
    """The one graph a prediction API serves."""

    def __init__(self, classifier: nn.Module, defense: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense(x, torch.softmax(self.classifier(x), dim=1))


DEFENSES: dict[str, type[nn.Module]] = {"none": NoDefense}
