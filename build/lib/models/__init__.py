"""Model zoo: classifiers that take images in [0, 1] and normalise inside the graph (RobustBench style).

`MODELS` maps an architecture name to a network class built as `cls(num_classes, in_channels, image_size)`;
every network has a `forward_features` method and a final `fc` linear layer.
"""

from typing import Sequence

import torch
from torch import nn

from models.lenet import LeNet5, LeNet5BN
from models.params import UserError
from models.resnet import ResNet18, ResNet34
from models.vgg import VGG16
from models.wrn import WRN16_4

MODELS: dict[str, type] = {
    "lenet5": LeNet5,
    "lenet5_bn": LeNet5BN,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "vgg16": VGG16,
    "wrn16_4": WRN16_4,
}


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std stored as (1, C, 1, 1) buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Images in [0, 1] → normalise → network → logits."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, the input of `net.fc`."""
        return self.net.forward_features(self.normalize(x))


def check_arch(arch: str, flag: str = "") -> None:
    """The one check that an architecture name is in the registry; `flag` names where it came from."""
    if arch not in MODELS:
        where = f"{flag}: " if flag else ""
        raise UserError(f"{where}unknown architecture {arch!r}; choose from {', '.join(MODELS)}")


def build_model(
    arch: str, num_classes: int, in_channels: int, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Classifier:
    """Build `arch` for the given image shape and class count, normalising with `mean` and `std`."""
    check_arch(arch)
    if len(mean) != in_channels or len(std) != in_channels:
        raise UserError(f"mean and std need {in_channels} values, one per channel; got {len(mean)} and {len(std)}")
    net = MODELS[arch](num_classes, in_channels, image_size)
    return Classifier(net, mean, std)
