"""PyTorch twins of the engine's model zoo (`engine.models`), for the benchmark's peer rows.

Each twin has the same layers under the same names as the engine model, so an engine state
dict loads into it key for key (`load_engine_weights`); tests/engine/test_models.py checks that
twin and engine model then compute the same outputs. Importing this module needs PyTorch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeNet", "ResNet", "TransformerLM", "TWINS", "load_engine_weights"]

_GEOMETRY = {28: (5, 2, 0), 8: (3, 1, 1)}


class LeNet(nn.Module):
    """Twin of `engine.models.LeNet`."""

    def __init__(self, image_size=28, in_channels=1, num_classes=10, channels=(6, 16),
                 hidden=(120, 84)):
        super().__init__()
        k, pad1, pad2 = _GEOMETRY[image_size]
        side = ((image_size + 2 * pad1 - k + 1) // 2 + 2 * pad2 - k + 1) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], k, padding=pad1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], k, padding=pad2), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels[1] * side * side, hidden[0]), nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Linear(hidden[1], num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Twin of `engine.models.resnet.BasicBlock` (torchvision's names)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """Twin of `engine.models.ResNet`."""

    def __init__(self, depth=8, width=16, in_channels=3, num_classes=10):
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = width
        for stage in range(3):
            out = width * 2 ** stage
            layer = nn.Sequential()
            for b in range(blocks):
                layer.append(BasicBlock(channels, out, 2 if stage and not b else 1))
                channels = out
            setattr(self, f"layer{stage + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class TransformerLM(nn.Module):
    """Twin of `engine.models.TransformerLM`: PyTorch's own pre-norm encoder layers with a
    causal mask, and the output head tied to the token embedding."""

    def __init__(self, vocab_size=256, d_model=128, n_layers=2, n_heads=4, context=128,
                 d_ff=None, dropout=0.0):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(d_model, n_heads, d_ff or 4 * d_model, dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=idx.device), 1)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return F.linear(self.norm(x), self.tok_emb.weight)


TWINS = {"lenet": LeNet, "resnet": ResNet, "transformer_lm": TransformerLM}


def load_engine_weights(module: nn.Module, state_dict) -> nn.Module:
    """Copy an engine state dict (Tensors or arrays, same keys) into `module`; returns it."""
    module.load_state_dict({
        k: torch.from_numpy(np.array(v.numpy() if hasattr(v, "numpy") else v))
        for k, v in state_dict.items()})
    return module
