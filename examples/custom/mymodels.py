"""A model of your own: any function (or Module class) returning a ``dptrain.engine`` Module.

A job names it ``mymodels:small_cnn``; the ranks import this file from the job's directory.
"""

from dptrain.engine import nn


def small_cnn(channels: int = 8, num_classes: int = 10) -> nn.Module:
    """A small conv net for 1x8x8 images: conv 3x3, ReLU, 2x2 max-pool, linear."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(channels * 4 * 4, num_classes))
