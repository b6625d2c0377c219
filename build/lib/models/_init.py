"""Weight initialisation shared by the convolutional architectures."""

from torch import nn


def he_init(module: nn.Module) -> None:
    """He init of every conv (as torchvision and the reference WRN code do); PyTorch's default shrinks the signal
    layer by layer, so an untrained deep net would answer almost the same for any input."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
