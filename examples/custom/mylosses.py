"""A loss of your own: ``loss(output, target)`` returning the batch's mean loss as a Tensor.

A job names it ``mylosses:focal``.
"""

from dptrain import engine


def focal(output: engine.Tensor, target: engine.Tensor, gamma: float = 2.0) -> engine.Tensor:
    """Focal loss (Lin et al. 2017): cross-entropy weighted by ``(1 - p_target) ** gamma``, so
    that examples the model already gets right count less."""
    logp = output.log_softmax(dim=1)
    picked = logp.gather(1, target.reshape(-1, 1)).reshape(-1)
    return (-((1.0 - picked.exp()) ** gamma) * picked).mean()
