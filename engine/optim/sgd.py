"""Stochastic gradient descent with momentum, dampening, Nesterov momentum and weight decay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dptrain.engine.backend import get_array_module
from dptrain.engine.optim.optimizer import (
    Optimizer,
    ParamsT,
    apply_blockwise,
    check_nonnegative,
    check_real,
)
from dptrain.engine.tensor import Tensor

__all__ = ["SGD"]


class SGD(Optimizer):
    """Stochastic gradient descent, with PyTorch's update rule (``torch.optim.SGD``).

    For each parameter ``p`` with gradient ``g``::

        g = -g if maximize
        g = g + weight_decay * p
        b = g                                      (first step)
        b = momentum * b + (1 - dampening) * g     (later steps)
        g = g + momentum * b if nesterov else b    (when momentum != 0)
        p = p - lr * g

    Args:
        params: Tensors to optimize, or dicts defining parameter groups.
        lr: learning rate, >= 0.
        momentum: momentum factor, >= 0.
        dampening: dampening of the momentum (applied from the second step on).
        weight_decay: L2 penalty, >= 0.
        nesterov: use Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: ascend the objective instead of descending it.

    Example:
        >>> import numpy as np
        >>> from dptrain.engine.tensor import Tensor
        >>> w = Tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
        >>> w.grad = Tensor(np.array([0.5, -1.0], dtype=np.float32))
        >>> SGD([w], lr=0.1).step()
        >>> w.data.tolist()
        [0.949999988079071, 2.0999999046325684]
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"])
        check_nonnegative("momentum", group["momentum"])
        check_real("dampening", group["dampening"])
        check_nonnegative("weight_decay", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"nesterov requires momentum > 0 and dampening = 0, got momentum="
                f"{group['momentum']} and dampening={group['dampening']}")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one SGD step on every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = self._run_closure(closure)
        state = self.state
        for group in self.param_groups:
            # Python floats keep float32 arithmetic in float32 (a numpy float64 would upcast).
            hyper = (float(group["lr"]), float(group["momentum"]), float(group["dampening"]),
                     float(group["weight_decay"]), bool(group["nesterov"]),
                     bool(group["maximize"]))
            momentum = hyper[1]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                d = p.data
                xp = get_array_module(d)
                buf, first = None, False
                if momentum != 0:
                    s = state[p]
                    buf = s.get("momentum_buffer")
                    if buf is None:
                        buf, first = Tensor(xp.empty_like(d)), True
                        s["momentum_buffer"] = buf
                    buf = buf.data
                apply_blockwise(_sgd_update, xp, (d, grad.data, buf), first, *hyper)
                p._version[0] += 1
        return loss


def _sgd_update(xp, d, g, buf, first: bool, lr: float, momentum: float, dampening: float,
                wd: float, nesterov: bool, maximize: bool) -> None:
    """One SGD update of parameter array `d`, in place (and of momentum buffer `buf`)."""
    owned = False  # whether `g` is a temporary that may be overwritten
    if wd != 0:
        t = xp.multiply(d, wd)
        g = xp.subtract(t, g, out=t) if maximize else xp.add(g, t, out=t)
        owned = True
    elif maximize:
        g = xp.negative(g)
        owned = True
    if buf is not None:
        if first:  # the buffer starts as the gradient; dampening applies from step 2
            xp.copyto(buf, g)
        else:
            buf *= momentum
            if dampening != 0:
                buf += xp.multiply(g, 1.0 - dampening)
            else:
                buf += g
        if nesterov:
            t = xp.multiply(buf, momentum)
            g = xp.add(g, t, out=t)
            owned = True
        else:
            g, owned = buf, False
    g = xp.multiply(g, -lr, out=g if owned else None)
    d += g
