"""VGG-16 with BatchNorm (Simonyan & Zisserman, 2015), CIFAR style: one linear layer after the convs."""

import torch
from torch import nn

from models._init import he_init

# Channel counts; "M" is a 2x2 max-pool.
CFG_16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    """Thirteen 3x3 conv-BN-ReLU layers in five pooled stages, then fc 512 → num_classes."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in CFG_16:
            if v == "M":
                # ceil_mode keeps odd sizes alive: 28 → 14 → 7 → 4 → 2 → 1.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                channels = v
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        he_init(self)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.convs(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
