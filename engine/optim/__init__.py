"""Optimizers and learning-rate schedules with PyTorch's update rules and checkpoint layout.

Example:
    >>> import numpy as np
    >>> from dptrain.engine.tensor import Tensor
    >>> from dptrain.engine.optim import SGD, lr_scheduler
    >>> w = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    >>> opt = SGD([w], lr=0.1, momentum=0.9)
    >>> sched = lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    >>> w.grad = Tensor(np.ones(3, dtype=np.float32))
    >>> opt.step(); sched.step(); opt.zero_grad()
"""

from dptrain.engine.optim import lr_scheduler
from dptrain.engine.optim.adam import Adam, AdamW
from dptrain.engine.optim.optimizer import Optimizer
from dptrain.engine.optim.sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "lr_scheduler"]
