"""Recurrent layers: RNN (tanh or relu), LSTM and GRU, and their one-step cells, with PyTorch's
parameter names, weight layout, initialisation and shapes (``torch.nn.LSTM`` ...).

A layer is a Python loop over time steps of small ops; backprop through time needs nothing
more, because every step reuses the same Parameters and the engine adds up their gradients.
The input projection is computed per step, not as one big matmul over the sequence: slicing
step ``t`` out of a big (L, N, gates) result would give every step's backward a full-size
gradient to add, which is quadratic in the sequence length.
"""

from __future__ import annotations

import math
import numbers
import warnings

from dptrain.engine import functional as F
from dptrain.engine.backend import get_array_module
from dptrain.engine.nn import init
from dptrain.engine.nn.layers import _empty
from dptrain.engine.nn.module import Module
from dptrain.engine.nn.parameter import Parameter
from dptrain.engine.ops import cat, stack
from dptrain.engine.tensor import Tensor

__all__ = ["RNNBase", "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


# ---------------------------------------------------------------- one time step

def _rnn_step(mode: str, x: Tensor, state, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
              b_hh: Tensor | None):
    """The new state after one step of `mode` from (N, H_in) input `x` and `state`: h, or
    (h, c) for LSTM. The formulas and gate order are PyTorch's."""
    if mode == "LSTM":
        h, c = state
        i, f, g, o = (F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, 1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        return o.sigmoid() * c.tanh(), c
    if mode == "GRU":
        x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, 1)
        h_r, h_z, h_n = F.linear(state, w_hh, b_hh).chunk(3, 1)
        r = (x_r + h_r).sigmoid()
        z = (x_z + h_z).sigmoid()
        n = (x_n + r * h_n).tanh()
        return n + z * (state - n)  # (1 - z) * n + z * h
    pre = F.linear(x, w_ih, b_ih) + F.linear(state, w_hh, b_hh)
    return pre.tanh() if mode == "RNN_TANH" else pre.relu()


def _zeros(like: Tensor, shape: tuple) -> Tensor:
    return Tensor(get_array_module(like.data).zeros(shape, dtype=like.dtype))


def _check_state(name: str, what: str, t, expected: tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: {what} must be a Tensor, got {type(t).__name__}")
    if t.shape != expected:
        raise ValueError(f"{name}: expected {what} of shape {expected}, got {t.shape}")


def _check_sizes(name: str, **sizes) -> None:
    for key, value in sizes.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------- multi-layer sequence models

class RNNBase(Module):
    """The shared body of `RNN`, `LSTM` and `GRU`: parameters, shape checks and the loop over
    layers, directions and time steps.

    Parameters are registered per layer ``k`` and direction as ``weight_ih_l{k}`` (gates *
    hidden, input), ``weight_hh_l{k}`` (gates * hidden, hidden), ``bias_ih_l{k}`` and
    ``bias_hh_l{k}``, with the suffix ``_reverse`` for the backward direction, all drawn from
    U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)).

    Args:
        mode: ``'RNN_TANH'``, ``'RNN_RELU'``, ``'LSTM'`` or ``'GRU'``.
        input_size: features per time step of the input.
        hidden_size: features of the hidden state.
        num_layers: recurrent layers stacked, each reading the previous one's output sequence.
        bias: learn ``bias_ih`` and ``bias_hh``.
        batch_first: input and output are (N, L, features) instead of (L, N, features); the
            hidden states stay (layers * directions, N, hidden).
        dropout: dropout probability on each layer's output except the last's, in training.
        bidirectional: also run each layer backwards in time and concatenate both outputs.
        device: where the parameters live.
        dtype: the parameters' floating dtype.
    """

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        name = {"RNN_TANH": "RNN", "RNN_RELU": "RNN"}.get(mode, mode)
        if mode not in _GATES:
            raise ValueError(f"unknown recurrent mode {mode!r}; expected one of {list(_GATES)}")
        _check_sizes(name, input_size=input_size, hidden_size=hidden_size,
                     num_layers=num_layers)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number) or \
                not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{name}: dropout={dropout} and num_layers=1; dropout acts only "
                          "between recurrent layers, so it will do nothing", UserWarning,
                          stacklevel=3)
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        gate_size = _GATES[mode] * hidden_size
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for suffix in ("", "_reverse")[:directions]:
                shapes = {"weight_ih": (gate_size, layer_input),
                          "weight_hh": (gate_size, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(gate_size,), bias_hh=(gate_size,))
                for kind, shape in shapes.items():
                    setattr(self, f"{kind}_l{layer}{suffix}",
                            Parameter(_empty(shape, dtype, device)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every weight and bias from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            init.uniform_(p, -bound, bound)

    def _weights(self, layer: int, direction: int) -> tuple:
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        return (getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix),
                getattr(self, "bias_ih" + suffix) if self.bias else None,
                getattr(self, "bias_hh" + suffix) if self.bias else None)

    def _check_input(self, input) -> None:
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        layout = "(N, L, input_size)" if self.batch_first else "(L, N, input_size)"
        if input.ndim not in (2, 3):
            raise ValueError(f"{name}: expected input of 3 dims {layout} or 2 dims (L, "
                             f"input_size) unbatched, got {input.ndim} dims of shape "
                             f"{input.shape}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: expected input.size(-1) == input_size = "
                             f"{self.input_size}, got input of shape {input.shape}")
        time_axis = 1 if self.batch_first and input.ndim == 3 else 0
        if input.shape[time_axis] == 0:
            raise ValueError(f"{name}: the input sequence is empty (shape {input.shape})")

    def _initial_states(self, input: Tensor, hx, batched: bool, batch: int) -> list:
        """One state per (layer, direction): an (N, H) Tensor, or an (h, c) pair for LSTM."""
        name = type(self).__name__
        n_states = self.num_layers * (2 if self.bidirectional else 1)
        shape = (n_states, batch, self.hidden_size) if batched else (n_states, self.hidden_size)
        if hx is None:
            zero = _zeros(input, (batch, self.hidden_size))
            return [(zero, zero) if self.mode == "LSTM" else zero] * n_states
        if self.mode == "LSTM":
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{name}: hx must be a pair (h_0, c_0), got "
                                f"{type(hx).__name__}")
            parts = list(hx)
            for what, t in zip(("h_0", "c_0"), parts):
                _check_state(name, what, t, shape)
        else:
            _check_state(name, "hx", hx, shape)
            parts = [hx]
        if not batched:
            parts = [t.unsqueeze(1) for t in parts]
        if self.mode == "LSTM":
            return [(parts[0][k], parts[1][k]) for k in range(n_states)]
        return [parts[0][k] for k in range(n_states)]

    def forward(self, input: Tensor, hx=None):
        """Run the sequence through every layer.

        Args:
            input: (L, N, input_size), or (N, L, input_size) with `batch_first`, or
                (L, input_size) for one unbatched sequence.
            hx: the initial hidden state (layers * directions, N, hidden_size), or
                (layers * directions, hidden_size) unbatched; for LSTM a pair (h_0, c_0) of
                such. Zeros when None.

        Returns:
            ``(output, h_n)``, or ``(output, (h_n, c_n))`` for LSTM: `output` holds the last
            layer's hidden state at every step, (L, N, directions * hidden_size) (batch first
            with `batch_first`), and `h_n`, `c_n` every layer's state after the last step.
        """
        self._check_input(input)
        batched = input.ndim == 3
        time_axis = 1 if self.batch_first and batched else 0
        steps = input.shape[time_axis]
        batch = input.shape[1 - time_axis] if batched else 1
        states = self._initial_states(input, hx, batched, batch)
        if batched:
            xs = [input[:, t] if time_axis else input[t] for t in range(steps)]
        else:
            xs = [input[t].unsqueeze(0) for t in range(steps)]
        directions = 2 if self.bidirectional else 1
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                weights = self._weights(layer, direction)
                state = states[layer * directions + direction]
                ys = [None] * steps
                for t in (reversed(range(steps)) if direction else range(steps)):
                    state = _rnn_step(self.mode, xs[t], state, *weights)
                    ys[t] = state[0] if self.mode == "LSTM" else state
                finals.append(state)
                outputs.append(ys)
            xs = outputs[0] if directions == 1 else [cat(pair, -1) for pair in zip(*outputs)]
            if self.dropout and self.training and layer < self.num_layers - 1:
                xs = [F.dropout(x, self.dropout) for x in xs]
        output = stack(xs, time_axis) if batched else stack([x.squeeze(0) for x in xs], 0)

        def gather(parts: list) -> Tensor:
            out = stack(parts, 0)
            return out if batched else out.squeeze(1)

        if self.mode == "LSTM":
            return output, (gather([h for h, _ in finals]), gather([c for _, c in finals]))
        return output, gather(finals)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.mode == "RNN_RELU":
            s += ", nonlinearity='relu'"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s


class RNN(RNNBase):
    """Elman RNN: ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``, act tanh or relu.

    Args:
        input_size: features per time step of the input.
        hidden_size: features of the hidden state.
        num_layers: stacked recurrent layers.
        nonlinearity: ``'tanh'`` or ``'relu'``.
        bias: learn ``bias_ih_l{k}`` and ``bias_hh_l{k}``.
        batch_first: input and output are (N, L, features).
        dropout: dropout on each layer's output except the last's, in training.
        bidirectional: also run backwards in time; outputs are concatenated.
        device: where the parameters live.
        dtype: the parameters' floating dtype.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine import nn
        >>> rnn = nn.RNN(10, 20, num_layers=2, batch_first=True)
        >>> out, h_n = rnn(engine.randn(3, 5, 10))
        >>> out.shape, h_n.shape
        ((3, 5, 20), (2, 3, 20))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got "
                             f"{nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size,
                         hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype)


class LSTM(RNNBase):
    """Long short-term memory, PyTorch's formulation with gates in the order i, f, g, o::

        i, f, g, o = split(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(c_t)

    Args: as `RNN`, without `nonlinearity`. ``forward(input, (h_0, c_0))`` returns
    ``(output, (h_n, c_n))``.

    Example:
        >>> from dptrain import engine
        >>> from dptrain.engine import nn
        >>> lstm = nn.LSTM(8, 16)
        >>> out, (h_n, c_n) = lstm(engine.randn(5, 2, 8))
        >>> out.shape, c_n.shape
        ((5, 2, 16), (1, 2, 16))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device, dtype)


class GRU(RNNBase):
    """Gated recurrent unit, PyTorch's formulation with gates in the order r, z, n::

        r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)
        z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
        n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
        h_t = (1 - z) * n + z * h_{t-1}

    Args: as `RNN`, without `nonlinearity`.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device, dtype)


# ---------------------------------------------------------------- single cells

class _CellBase(Module):
    """One step of a recurrent layer: parameters ``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh`` (PyTorch's cell names), drawn from U(-1/sqrt(hidden), 1/sqrt(hidden))."""

    _mode = ""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        _check_sizes(type(self).__name__, input_size=input_size, hidden_size=hidden_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        gate_size = _GATES[self._mode] * hidden_size
        self.weight_ih = Parameter(_empty((gate_size, input_size), dtype, device))
        self.weight_hh = Parameter(_empty((gate_size, hidden_size), dtype, device))
        if bias:
            self.bias_ih = Parameter(_empty((gate_size,), dtype, device))
            self.bias_hh = Parameter(_empty((gate_size,), dtype, device))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            init.uniform_(p, -bound, bound)

    def forward(self, input: Tensor, hx=None):
        """One step.

        Args:
            input: (N, input_size), or (input_size,) unbatched.
            hx: the state, (N, hidden_size) (for LSTMCell a pair (h, c)); zeros when None.

        Returns:
            The new state: h, or (h, c) for LSTMCell, batched as `input`.
        """
        name = type(self).__name__
        if not isinstance(input, Tensor) or input.ndim not in (1, 2) or \
                input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: expected input of shape (N, {self.input_size}) or "
                             f"({self.input_size},), got {getattr(input, 'shape', input)}")
        batched = input.ndim == 2
        x = input if batched else input.unsqueeze(0)
        shape = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        lstm = self._mode == "LSTM"
        if hx is None:
            zero = _zeros(x, (x.shape[0], self.hidden_size))
            state = (zero, zero) if lstm else zero
        else:
            parts = list(hx) if lstm else [hx]
            for what, t in zip(("h", "c") if lstm else ("hx",), parts):
                _check_state(name, what, t, shape)
            parts = parts if batched else [t.unsqueeze(0) for t in parts]
            state = tuple(parts) if lstm else parts[0]
        out = _rnn_step(self._mode, x, state, self.weight_ih, self.weight_hh, self.bias_ih,
                        self.bias_hh)
        if batched:
            return out
        return tuple(t.squeeze(0) for t in out) if lstm else out.squeeze(0)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + (
            "" if self.bias_ih is not None else ", bias=False")


class RNNCell(_CellBase):
    """One step of `RNN`: ``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``.

    Args:
        input_size: features of the input.
        hidden_size: features of the state.
        bias: learn the biases.
        nonlinearity: ``'tanh'`` or ``'relu'``.
        device: where the parameters live.
        dtype: the parameters' floating dtype.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got "
                             f"{nonlinearity!r}")
        self._mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self.nonlinearity = nonlinearity


class LSTMCell(_CellBase):
    """One step of `LSTM`; ``cell(x, (h, c))`` returns ``(h', c')``. Args as `RNNCell`
    without `nonlinearity`."""

    _mode = "LSTM"


class GRUCell(_CellBase):
    """One step of `GRU`; ``cell(x, h)`` returns ``h'``. Args as `RNNCell` without
    `nonlinearity`."""

    _mode = "GRU"
