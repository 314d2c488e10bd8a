"""Adam and AdamW, with PyTorch's update rules, bias correction and AMSGrad."""

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

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    """Adam (``torch.optim.Adam``): moment estimates with per-parameter bias correction.

    For each parameter ``p`` with gradient ``g``, at its step ``t`` (counted per parameter)::

        g = -g if maximize
        g = g + weight_decay * p                    (Adam: L2 penalty in the gradient)
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        v_max = max(v_max, v)                       (amsgrad; then used in place of v)
        denom = sqrt(v) / sqrt(1 - beta2**t) + eps
        p = p - lr / (1 - beta1**t) * m / denom

    Args:
        params: Tensors to optimize, or dicts defining parameter groups.
        lr: learning rate, >= 0.
        betas: decay rates of the first and second moment estimates, each in [0, 1).
        eps: added to the denominator for numerical stability, >= 0.
        weight_decay: L2 penalty, >= 0.
        amsgrad: use the maximum of past second moments (AMSGrad).
        maximize: ascend the objective instead of descending it.

    Example:
        >>> import numpy as np
        >>> from dptrain.engine.tensor import Tensor
        >>> w = Tensor(np.array([1.0, 2.0]), requires_grad=True)
        >>> w.grad = Tensor(np.array([0.5, -1.0]))
        >>> Adam([w], lr=0.1).step()  # the first step moves each weight by about lr
        >>> np.round(w.data, 6).tolist()
        [0.9, 2.1]
    """

    _decoupled = False  # AdamW decays the weights directly instead

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            check_real(f"betas[{i}]", beta)
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        group["betas"] = tuple(betas)  # a list read back from JSON becomes the usual tuple

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one Adam step on every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = self._run_closure(closure)
        state = self.state
        decoupled = self._decoupled
        for group in self.param_groups:
            # Python floats keep float32 arithmetic in float32 (a numpy float64 would upcast).
            lr = float(group["lr"])
            beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
            eps = float(group["eps"])
            wd = float(group["weight_decay"])
            amsgrad = bool(group["amsgrad"])
            maximize = bool(group["maximize"])
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                d = p.data
                xp = get_array_module(d)
                s = state[p]
                if not s:
                    s["step"] = 0
                    s["exp_avg"] = Tensor(xp.zeros_like(d))
                    s["exp_avg_sq"] = Tensor(xp.zeros_like(d))
                t = s["step"] = s["step"] + 1
                vmax = None
                if amsgrad:
                    vmax = s.get("max_exp_avg_sq")
                    if vmax is None:  # (also if amsgrad was switched on after some steps)
                        vmax = s["max_exp_avg_sq"] = Tensor(xp.zeros_like(d))
                    vmax = vmax.data
                step_size = lr / (1.0 - beta1 ** t)
                bias_correction2_sqrt = (1.0 - beta2 ** t) ** 0.5
                apply_blockwise(_adam_update, xp,
                                (d, grad.data, s["exp_avg"].data, s["exp_avg_sq"].data, vmax),
                                lr, beta1, beta2, eps, wd, decoupled, maximize, step_size,
                                bias_correction2_sqrt)
                p._version[0] += 1
        return loss


def _adam_update(xp, d, g, m, v, vmax, lr: float, beta1: float, beta2: float, eps: float,
                 wd: float, decoupled: bool, maximize: bool, step_size: float,
                 bias_correction2_sqrt: float) -> None:
    """One Adam(W) update of parameter array `d` and its moments `m`, `v` (`vmax`), in place,
    in the order and grouping of PyTorch's single-tensor Adam."""
    if wd != 0 and not decoupled:
        gw = xp.multiply(d, wd)
        g = xp.subtract(gw, g, out=gw) if maximize else xp.add(g, gw, out=gw)
    elif maximize:
        g = xp.negative(g)
    if wd != 0 and decoupled:
        d *= 1.0 - lr * wd
    # m.lerp_(g, 1 - beta1), in the form torch uses for the weight's size
    tmp = xp.subtract(g, m)
    if beta1 > 0.5:
        tmp *= 1.0 - beta1
        m += tmp
    else:
        tmp *= beta1
        xp.subtract(g, tmp, out=m)
    # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    v *= beta2
    xp.multiply(g, 1.0 - beta2, out=tmp)
    tmp *= g
    v += tmp
    if vmax is not None:
        xp.maximum(vmax, v, out=vmax)
        v = vmax
    # denom = v.sqrt() / bias_correction2_sqrt + eps; p.addcdiv_(m, denom, value=-step_size)
    xp.sqrt(v, out=tmp)
    tmp /= bias_correction2_sqrt
    tmp += eps
    xp.divide(m, tmp, out=tmp)
    tmp *= -step_size
    d += tmp


class AdamW(Adam):
    """AdamW (``torch.optim.AdamW``): Adam with decoupled weight decay.

    Before the Adam update each parameter is decayed directly, ``p = p * (1 - lr *
    weight_decay)``, instead of adding ``weight_decay * p`` to its gradient.

    Args:
        params: Tensors to optimize, or dicts defining parameter groups.
        lr: learning rate, >= 0.
        betas: decay rates of the first and second moment estimates, each in [0, 1).
        eps: added to the denominator for numerical stability, >= 0.
        weight_decay: decoupled weight decay coefficient, >= 0.
        amsgrad: use the maximum of past second moments (AMSGrad).
        maximize: ascend the objective instead of descending it.
    """

    _decoupled = True

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize)
