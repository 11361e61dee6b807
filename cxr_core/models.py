"""torchvision architectures by name, adapted to grayscale input and any number of classes."""

from __future__ import annotations

from torch import nn
from torchvision import models as tv_models

SUPPORTED_ARCHITECTURES = ("resnet18", "resnet34", "mobilenet_v3_large", "efficientnet_b0", "densenet121")


def build_model(arch: str, num_classes: int, in_channels: int = 1) -> nn.Module:
    """Build `arch` from scratch (no pretrained weights are downloaded) for `in_channels` inputs."""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(SUPPORTED_ARCHITECTURES)}")
    model = tv_models.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the stem convolution for one that takes `in_channels` (the rest of the network is unchanged)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                replacement = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    kernel_size=child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=1,
                    bias=child.bias is not None,
                )
                nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
                setattr(parent, name, replacement)
                return
    raise ValueError("model has no Conv2d layer to adapt")


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
