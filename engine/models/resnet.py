"""``resnet``: a small residual network with batch norm (He et al. 2016, the CIFAR variant)."""

from __future__ import annotations

from dptrain.engine.models.checks import check_args
from dptrain.engine.models.registry import register_model
from dptrain.engine.nn import (
    AdaptiveAvgPool2d,
    BatchNorm2d,
    Conv2d,
    Linear,
    Module,
    Sequential,
    init,
)
from dptrain.engine.tensor import Tensor

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(Module):
    """Two 3x3 conv + batch norm layers and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x)))))
    + shortcut(x))``; the shortcut is a strided 1x1 conv + batch norm (``downsample``) when
    the shape changes, else the identity. Names as torchvision's ``BasicBlock``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: 2 to halve the height and width, else 1.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = Sequential(Conv2d(in_channels, out_channels, 1, stride,
                                                bias=False), BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + (x if self.downsample is None else self.downsample(x))).relu()


@register_model("resnet")
class ResNet(Module):
    """A residual network for small images: a 3x3 conv stem, three stages of `BasicBlock`s
    with `width`, 2 `width` and 4 `width` channels (the second and third halve the
    resolution), global average pooling and a linear classifier. Depth 6n + 2 counts the
    conv and linear layers (8: one block per stage, 20: ResNet-20). Weights: Kaiming-normal
    convs (fan_out), batch norm weight 1 and bias 0, as torchvision.
    Submodules: ``conv1``, ``bn1``, ``layer1``..``layer3`` (each a Sequential of blocks),
    ``avgpool``, ``fc``.

    Works for any input of at least 4x4 pixels: 8x8 digits and 32x32x3 CIFAR images alike.

    Args:
        depth: 6n + 2 for n >= 1 (8, 14, 20, 32, ...).
        width: channels of the first stage.
        in_channels: channels of the input (3 for colour, 1 for grey scale).
        num_classes: outputs (logits).

    Input: (N, in_channels, H, W) floats. Output: (N, num_classes) logits.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine.models import get_model
        >>> get_model("resnet", depth=8, width=4)(engine.randn(2, 3, 8, 8)).shape
        (2, 10)
    """

    def __init__(self, depth: int = 8, width: int = 16, in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        check_args("resnet", depth=depth, width=width, in_channels=in_channels,
                   num_classes=num_classes)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet: depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got "
                             f"{depth}")
        blocks = (depth - 2) // 6
        self.in_channels = in_channels
        self.conv1 = Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = BatchNorm2d(width)
        channels = width
        for stage in range(3):
            out = width * 2 ** stage
            layer = Sequential()
            for b in range(blocks):
                layer.append(BasicBlock(channels, out, 2 if stage and not b else 1))
                channels = out
            setattr(self, f"layer{stage + 1}", layer)
        self.avgpool = AdaptiveAvgPool2d(1)
        self.fc = Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, Conv2d):
                init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, input: Tensor) -> Tensor:
        """Class logits.

        Args:
            input: (N, in_channels, H, W) images, H and W at least 4.

        Returns:
            (N, num_classes) logits.
        """
        if not isinstance(input, Tensor) or input.ndim != 4 or \
                input.shape[1] != self.in_channels or min(input.shape[2:]) < 4:
            raise ValueError(f"resnet: expected input of shape (N, {self.in_channels}, H, W) "
                             f"with H, W >= 4, got "
                             f"{getattr(input, 'shape', type(input).__name__)}")
        x = self.bn1(self.conv1(input)).relu()
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
