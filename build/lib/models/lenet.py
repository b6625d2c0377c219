"""LeNet-5 (LeCun et al., 1998), sized so 28x28 and 32x32 inputs both reach a 16x5x5 map."""

import torch
from torch import nn


class LeNet5(nn.Module):
    """conv 6@5x5 → pool → conv 16@5x5 → pool → fc 120 → fc 84 → fc."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        # Padding 2 turns 28x28 into the 32x32 the original network was designed for.
        padding = 2 if image_size < 32 else 0
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=padding)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        # A no-op for 28x28 and 32x32; lets other sizes reach the 16x5x5 the first linear layer expects.
        self.resize = nn.AdaptiveAvgPool2d(5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc = nn.Linear(84, num_classes)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        if x.shape[-2] != 5 or x.shape[-1] != 5:  # skip the identity: 2 of 15 ms of a training step
            x = self.resize(x)
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return torch.relu(self.fc2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class LeNet5BN(nn.Module):
    """LeNet-5 with BatchNorm after every hidden layer: the small network on which InI's BatchNorm handling
    (`train-ini --bn-mode`) can be measured on CPU, where ResNets take hours."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        padding = 2 if image_size < 32 else 0
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=padding, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 16, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.resize = nn.AdaptiveAvgPool2d(5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120, bias=False)
        self.bn3 = nn.BatchNorm1d(120)
        self.fc2 = nn.Linear(120, 84, bias=False)
        self.bn4 = nn.BatchNorm1d(84)
        self.fc = nn.Linear(84, num_classes)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        if x.shape[-2] != 5 or x.shape[-1] != 5:
            x = self.resize(x)
        x = torch.flatten(x, 1)
        x = torch.relu(self.bn3(self.fc1(x)))
        return torch.relu(self.bn4(self.fc2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
