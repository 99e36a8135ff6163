"""Parameter shapes of reference models, written out so benchmarks need no torchvision."""

from __future__ import annotations

__all__ = ["RESNET50_NUM_PARAMS", "RESNET50_NUM_TENSORS", "resnet50_shapes"]

# torchvision's resnet50(): 161 parameter tensors, 25,557,032 parameters.
RESNET50_NUM_TENSORS = 161
RESNET50_NUM_PARAMS = 25_557_032

# (bottleneck width, blocks) of the four stages; a block's output is 4x its width.
_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))
_EXPANSION = 4


def _conv_bn(out_channels: int, in_channels: int, kernel: int) -> list[tuple[int, ...]]:
    """A bias-free convolution followed by batch norm (weight and bias)."""
    return [(out_channels, in_channels, kernel, kernel), (out_channels,), (out_channels,)]


def resnet50_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """The shapes of ``torchvision.models.resnet50().parameters()``, in that order."""
    shapes = _conv_bn(64, 3, 7)
    in_channels = 64
    for width, blocks in _STAGES:
        out_channels = width * _EXPANSION
        for block in range(blocks):
            shapes += _conv_bn(width, in_channels, 1)
            shapes += _conv_bn(width, width, 3)
            shapes += _conv_bn(out_channels, width, 1)
            if block == 0:  # the projection shortcut
                shapes += _conv_bn(out_channels, in_channels, 1)
            in_channels = out_channels
    shapes += [(num_classes, in_channels), (num_classes,)]
    return shapes
