"""Wide ResNet 16-4 (Zagoruyko & Komodakis, 2016): pre-activation wide basic blocks, widths 16/64/128/256."""

import torch
from torch import nn

from models._init import he_init


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv twice; a 1x1 projection shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.equal_in_out = in_planes == planes and stride == 1
        if self.equal_in_out:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(torch.relu(self.bn2(out)))
        # As in the reference code, the projection sees the pre-activated input, the identity the raw one.
        residual = x if self.equal_in_out else pre
        return out + self.shortcut(residual)


class WRN16_4(nn.Module):
    """Depth 16 (two blocks per group), widen factor 4, no dropout."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        blocks_per_group = (16 - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks = []
        in_planes = 16
        for group, planes in enumerate([64, 128, 256]):
            for i in range(blocks_per_group):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(WideBasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(256)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, num_classes)
        he_init(self)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(x))
        x = torch.relu(self.bn(x))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
