"""The built-in real data sets: scikit-learn's handwritten digits (8x8, 10 classes), and
its breast-cancer (30 features, 2 classes) and wine (13 features, 3 classes) tables.

The digits split is fixed: 1437 training and 360 test images, pixels scaled to [0, 1] and
standardised with the training set's mean and deviation. The tables are split 80/20,
stratified, with seed 0, every feature standardised with the training set's statistics.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits", "digits_loaders", "TRAIN_SIZE", "steps_per_epoch", "tabular", "loaders", "DATASETS"]

#: the data sets :func:`loaders` knows
DATASETS = ("digits", "breast_cancer", "wine")

#: training images of the fixed split
TRAIN_SIZE = 1437


def digits(seed: int = 0, image: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``; ``x`` is ``[N, 1, 8, 8]`` (``image``) or ``[N, 64]``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=360, random_state=seed, stratify=y)
    x_tr, x_te = torch.tensor(x_tr, dtype=torch.float32) / 16, torch.tensor(x_te, dtype=torch.float32) / 16
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if image:
        x_tr, x_te = x_tr.view(-1, 1, 8, 8), x_te.view(-1, 1, 8, 8)
    return x_tr, torch.tensor(y_tr), x_te, torch.tensor(y_te)


def steps_per_epoch(batch_size: int = 64) -> int:
    """Optimizer steps in one pass over the digits training set."""
    return -(-TRAIN_SIZE // batch_size)


def digits_loaders(batch_size: int = 64, seed: int = 0, image: bool = True) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (shuffling seeded by ``seed``) and test loader."""
    x_tr, y_tr, x_te, y_te = digits(seed=0, image=image)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(TensorDataset(x_te, y_te), batch_size=512),
    )


def tabular(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of scikit-learn's ``"breast_cancer"`` or ``"wine"``."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-8
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def loaders(dataset: str = "digits", batch_size: int = 64, seed: int = 0, image: bool = True
            ) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (shuffling seeded by ``seed``) and test loader of ``dataset``."""
    if dataset == "digits":
        return digits_loaders(batch_size, seed, image)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    x_tr, y_tr, x_te, y_te = tabular(dataset)
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(TensorDataset(x_te, y_te), batch_size=512))
