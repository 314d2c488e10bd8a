"""``engine.nn``: Parameters, Modules, containers, layers, losses, initialisers and clipping,
with PyTorch's names (``torch.nn``).

Example:
    >>> from dptrain import engine
    >>> from dptrain.engine import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> [name for name, _ in model.named_parameters()]
    ['0.weight', '0.bias', '2.weight', '2.bias']
"""

from dptrain.engine import functional
from dptrain.engine.nn import init, utils
from dptrain.engine.nn.attention import (
    MultiheadAttention,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from dptrain.engine.nn.containers import ModuleDict, ModuleList, Sequential
from dptrain.engine.nn.conv import AdaptiveAvgPool2d, AvgPool2d, Conv1d, Conv2d, MaxPool2d
from dptrain.engine.nn.layers import (
    GELU,
    CrossEntropyLoss,
    Dropout,
    Embedding,
    Flatten,
    Identity,
    LayerNorm,
    Linear,
    LogSoftmax,
    MSELoss,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)
from dptrain.engine.nn.module import Module
from dptrain.engine.nn.norm import BatchNorm1d, BatchNorm2d
from dptrain.engine.nn.parameter import Parameter
from dptrain.engine.nn.recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNBase, RNNCell

__all__ = [
    "Parameter", "Module", "Sequential", "ModuleList", "ModuleDict", "Identity", "Linear",
    "ReLU", "GELU", "Tanh", "Sigmoid", "SiLU", "Softmax", "LogSoftmax", "Dropout", "LayerNorm",
    "Embedding", "Flatten", "CrossEntropyLoss", "MSELoss", "init", "utils", "functional",
    "Conv1d", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "BatchNorm1d",
    "BatchNorm2d", "MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder",
    "RNNBase", "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell",
]
