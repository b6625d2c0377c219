"""The image generator of data-free model extraction (DFME, Truong et al., 2021): noise -> images in [0, 1]."""

import torch
from torch import nn


class Generator(nn.Module):
    """linear -> (BN, up x2, conv 3x3, BN, LeakyReLU) x2 -> conv 3x3 -> tanh, rescaled to [0, 1]."""

    def __init__(self, noise_dim: int, channels: int, image_size: int, width: int = 64):
        super().__init__()
        self.noise_dim = noise_dim
        self.image_size = image_size
        self.base = -(-image_size // 4)  # two x2 upsamplings, cropped back to image_size
        self.width = width
        self.project = nn.Linear(noise_dim, 2 * width * self.base * self.base)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, 2 * self.width, self.base, self.base)
        x = self.body(x)[:, :, : self.image_size, : self.image_size]
        return (x + 1.0) / 2.0
