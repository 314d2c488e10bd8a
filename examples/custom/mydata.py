"""A data set of your own: a function returning arrays ``(x, y)`` (or a ``dptrain`` Dataset,
or an indexable data set of ``(x, y)`` pairs), which the ranks shard as they do the built-in
ones. A job names it ``mydata:digit_images`` with its arguments in ``dataset.args``.
"""

import numpy as np


def digit_images(classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as 1x8x8 float32 images in [0, 1], int64 labels,
    keeping the first `classes` classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < classes
    x = (d.data[keep] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, d.target[keep].astype(np.int64)
