"""``lenet``: LeNet-5-style convolutional classifier for small grey-scale images."""

from __future__ import annotations

from collections.abc import Sequence

from dptrain.engine.models.checks import check_args
from dptrain.engine.models.registry import register_model
from dptrain.engine.nn import Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU, Sequential
from dptrain.engine.tensor import Tensor

__all__ = ["LeNet"]

# image size -> (kernel, padding of the first conv, padding of the second conv)
_GEOMETRY = {28: (5, 2, 0), 8: (3, 1, 1)}


@register_model("lenet")
class LeNet(Module):
    """conv -> ReLU -> 2x2 max pool -> conv -> ReLU -> 2x2 max pool -> three fully connected
    layers with ReLU between them (LeNet-5 with ReLU and max pooling).

    For 28x28 inputs (MNIST) the convolutions are 5x5, the first padded by 2 (28 -> 14 -> 10
    -> 5); for 8x8 inputs (scikit-learn's digits) they are 3x3 and padded by 1 (8 -> 4 -> 2).
    Submodules: ``features`` (``0`` conv, ``3`` conv) and ``classifier`` (``1``, ``3``,
    ``5`` linear).

    Args:
        image_size: 28 or 8, the height and width of the input.
        in_channels: channels of the input (1 for grey scale).
        num_classes: outputs (logits).
        channels: the two convolutions' output channels.
        hidden: the two hidden fully connected widths.

    Input: (N, in_channels, image_size, image_size) floats. Output: (N, num_classes) logits.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine.models import get_model
        >>> get_model("lenet", image_size=8)(engine.randn(2, 1, 8, 8)).shape
        (2, 10)
    """

    def __init__(self, image_size: int = 28, in_channels: int = 1, num_classes: int = 10,
                 channels: Sequence[int] = (6, 16), hidden: Sequence[int] = (120, 84)) -> None:
        super().__init__()
        if image_size not in _GEOMETRY:
            raise ValueError(f"lenet: image_size must be one of {sorted(_GEOMETRY)}, got "
                             f"{image_size!r}")
        check_args("lenet", in_channels=in_channels, num_classes=num_classes)
        for key, value in (("channels", channels), ("hidden", hidden)):
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"lenet: {key} must be a pair of positive integers, got "
                                 f"{value!r}")
            check_args("lenet", **{key: value})
        k, pad1, pad2 = _GEOMETRY[image_size]
        side = ((image_size + 2 * pad1 - k + 1) // 2 + 2 * pad2 - k + 1) // 2
        self.image_size = image_size
        self.in_channels = in_channels
        self.features = Sequential(
            Conv2d(in_channels, channels[0], k, padding=pad1), ReLU(), MaxPool2d(2),
            Conv2d(channels[0], channels[1], k, padding=pad2), ReLU(), MaxPool2d(2))
        self.classifier = Sequential(
            Flatten(), Linear(channels[1] * side * side, hidden[0]), ReLU(),
            Linear(hidden[0], hidden[1]), ReLU(), Linear(hidden[1], num_classes))

    def forward(self, input: Tensor) -> Tensor:
        """Class logits.

        Args:
            input: (N, in_channels, image_size, image_size) images.

        Returns:
            (N, num_classes) logits.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(input, Tensor) or input.ndim != 4 or input.shape[1:] != expected:
            raise ValueError(f"lenet: expected input of shape (N, {', '.join(map(str, expected))})"
                             f", got {getattr(input, 'shape', type(input).__name__)}")
        return self.classifier(self.features(input))
