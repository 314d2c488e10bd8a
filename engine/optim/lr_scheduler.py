"""Learning-rate schedules (``torch.optim.lr_scheduler``), each a closed form of the epoch.

Every scheduler computes each group's rate from its ``initial_lr`` and `last_epoch` alone, so
values match PyTorch's to float rounding and a schedule resumes exactly from a `state_dict`. A
consequence: schedulers do not compose; a second scheduler on the same optimizer overrides it.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

from dptrain.engine.optim.optimizer import Optimizer, check_real

__all__ = ["LRScheduler", "StepLR", "CosineAnnealingLR", "LinearLR", "LambdaLR"]


class LRScheduler:
    """Base class: sets every group's ``"lr"`` from the epoch count on each `step`.

    Constructing a scheduler records each group's current ``lr`` as ``"initial_lr"`` (unless it
    is there already) and sets the rates for epoch 0. Call `step` once per epoch (or per
    iteration), after ``optimizer.step()``. Subclasses implement `get_lr`.

    Args:
        optimizer: the optimizer whose rates this scheduler sets.
        last_epoch: the index of the last epoch done; -1 starts afresh. To resume at a later
            epoch the groups must already hold ``"initial_lr"``.
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be an Optimizer, got {type(optimizer).__name__}")
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < -1:
            raise ValueError(f"last_epoch must be an int >= -1, got {last_epoch!r}")
        self.optimizer = optimizer
        for i, group in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise KeyError(f"param group {i} has no 'initial_lr': it is needed to resume "
                               f"a schedule at last_epoch={last_epoch}")
        self.base_lrs: list[float] = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._last_lr: list[float] = []
        self.step()

    def get_lr(self) -> list[float]:
        """The rate of each parameter group at epoch `last_epoch`.

        Returns:
            One learning rate per parameter group.
        """
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set each group's ``"lr"`` for it."""
        self.last_epoch += 1
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=False):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """The rates the last `step` set.

        Returns:
            One learning rate per parameter group.
        """
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: every attribute but the optimizer.

        Returns:
            A dict that `load_state_dict` accepts.
        """
        return {k: (list(v) if isinstance(v, list) else v)
                for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state returned by `state_dict`.

        Args:
            state_dict: the scheduler state to restore.
        """
        self.__dict__.update({k: (list(v) if isinstance(v, list) else v)
                              for k, v in state_dict.items()})


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class StepLR(LRScheduler):
    """Multiply the initial rate by `gamma` once every `step_size` epochs.

    ``lr = initial_lr * gamma ** (last_epoch // step_size)``

    Args:
        optimizer: the optimizer whose rates this scheduler sets.
        step_size: the number of epochs between decays, > 0.
        gamma: the decay factor.
        last_epoch: the index of the last epoch done; -1 starts afresh.
    """

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1):
        _check_positive_int("step_size", step_size)
        check_real("gamma", gamma)
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = self.gamma ** (self.last_epoch // self.step_size)
        return [base_lr * factor for base_lr in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """Anneal the rate from its initial value to `eta_min` along a half cosine of `T_max` epochs.

    ``lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * last_epoch / T_max)) / 2``

    Args:
        optimizer: the optimizer whose rates this scheduler sets.
        T_max: the number of epochs of the half period, > 0.
        eta_min: the minimum rate.
        last_epoch: the index of the last epoch done; -1 starts afresh.
    """

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1):
        _check_positive_int("T_max", T_max)
        check_real("eta_min", eta_min)
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        cos = (1.0 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2.0
        return [self.eta_min + (base_lr - self.eta_min) * cos for base_lr in self.base_lrs]


class LinearLR(LRScheduler):
    """Scale the rate by a factor that moves linearly from `start_factor` to `end_factor`.

    ``lr = initial_lr * (start_factor + (end_factor - start_factor) *
    min(last_epoch, total_iters) / total_iters)``

    Args:
        optimizer: the optimizer whose rates this scheduler sets.
        start_factor: the factor at epoch 0, in (0, 1].
        end_factor: the factor from epoch `total_iters` on, in [0, 1].
        total_iters: the number of epochs the factor takes to reach `end_factor`, > 0.
        last_epoch: the index of the last epoch done; -1 starts afresh.
    """

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3,
                 end_factor: float = 1.0, total_iters: int = 5, last_epoch: int = -1):
        check_real("start_factor", start_factor)
        check_real("end_factor", end_factor)
        if not 0.0 < start_factor <= 1.0:
            raise ValueError(f"start_factor must be in (0, 1], got {start_factor}")
        if not 0.0 <= end_factor <= 1.0:
            raise ValueError(f"end_factor must be in [0, 1], got {end_factor}")
        _check_positive_int("total_iters", total_iters)
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        progress = min(self.total_iters, self.last_epoch) / self.total_iters
        factor = self.start_factor + (self.end_factor - self.start_factor) * progress
        return [base_lr * factor for base_lr in self.base_lrs]


class LambdaLR(LRScheduler):
    """Set each group's rate to its initial rate times a function of the epoch.

    ``lr = initial_lr * lr_lambda(last_epoch)``

    Args:
        optimizer: the optimizer whose rates this scheduler sets.
        lr_lambda: a function of the epoch index, or a list of them, one per parameter group.
        last_epoch: the index of the last epoch done; -1 starts afresh.

    For example ``LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100))`` warms the rate up over 100
    steps, then holds it.
    """

    def __init__(self, optimizer: Optimizer,
                 lr_lambda: Callable[[int], float] | list[Callable[[int], float]],
                 last_epoch: int = -1):
        n = len(optimizer.param_groups) if isinstance(optimizer, Optimizer) else 0
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"lr_lambda must be one function or a list of {n} (one per "
                                 f"param group), got a list of {len(lr_lambda)}")
            lambdas = list(lr_lambda)
        else:
            lambdas = [lr_lambda] * n
        for fn in lambdas:
            if not callable(fn):
                raise TypeError(f"lr_lambda must be callable, got {type(fn).__name__}")
        self.lr_lambdas = lambdas
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [base_lr * fn(self.last_epoch)
                for base_lr, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state; of the lambdas, only callable objects' attributes are kept
        (plain functions and lambdas cannot be saved, and are not).

        Returns:
            A dict that `load_state_dict` accepts.
        """
        state = {k: v for k, v in super().state_dict().items() if k != "lr_lambdas"}
        state["lr_lambdas"] = [
            None if isinstance(fn, types.FunctionType) or not hasattr(fn, "__dict__")
            else dict(fn.__dict__) for fn in self.lr_lambdas]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state returned by `state_dict` (the lambdas themselves stay).

        Args:
            state_dict: the scheduler state to restore.
        """
        state = dict(state_dict)
        saved = state.pop("lr_lambdas", None) or []
        super().load_state_dict(state)
        for fn, attrs in zip(self.lr_lambdas, saved, strict=False):
            if attrs is not None:
                fn.__dict__.update(attrs)

