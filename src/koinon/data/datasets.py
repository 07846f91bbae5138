"""Datasets that need no download: bundled (digits), generated (mnist1d, synthetic), or yours.

A `Dataset` here is plain tensors: one copy of the training data and of the test data. Clients
hold only index tensors into the training data (see `FederatedData`), so a population of 10,000
clients costs a few index arrays, not 10,000 copies.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from koinon.registry import Registry


@dataclass
class Dataset:
    """Train/test tensors plus, for datasets that have one, a natural client grouping."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    groups: list[np.ndarray] | None = None  # natural partition: train indices per writer/device
    test_groups: list[np.ndarray] | None = None  # test indices per group (per-domain metrics)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @staticmethod
    def from_tensors(
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        name: str = "custom",
        num_classes: int | None = None,
        unlabeled: bool = False,
    ) -> Dataset:
        """Wrap your own tensors (labels are class indices; checked, see `koinon.data.checks`).
        `unlabeled`: `y_train` may mark a sample without a label by -100 (a deployed client's
        own data; `koinon.deploy.labels`)."""
        import dataclasses

        from koinon.data.checks import check_dataset, check_labels

        y_train = check_labels("y_train", y_train)
        y_test = check_labels("y_test", y_test)
        marked = y_train == -100 if unlabeled else torch.zeros_like(y_train, dtype=torch.bool)
        known = y_train[~marked]
        n_cls = num_classes or int(max(known.max().item() if len(known) else 0, y_test.max().item())) + 1
        ds = Dataset(
            name, torch.as_tensor(x_train).float(), y_train, torch.as_tensor(x_test).float(),
            y_test, n_cls,
        )
        # Checked with the unlabeled samples standing in as class 0.
        check_dataset(dataclasses.replace(ds, y_train=torch.where(marked, 0, y_train)) if unlabeled else ds)
        return ds

    @staticmethod
    def from_torch(train: torch.utils.data.Dataset, test: torch.utils.data.Dataset,
                   name: str = "custom") -> Dataset:
        """Materialize two `torch.utils.data.Dataset`s of `(x, label)` pairs into tensors."""

        def stack(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
            xs, ys = zip(*(ds[i] for i in range(len(ds))))  # type: ignore[arg-type]
            return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)

        xtr, ytr = stack(train)
        xte, yte = stack(test)
        return Dataset.from_tensors(xtr, ytr, xte, yte, name=name)


DATASETS: Registry[Dataset] = Registry("dataset")
"""Factories are called as `factory(seed=..., test_fraction=..., num_clients=..., **options)`."""


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng([seed, 0x7E57])
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = max(1, round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _bundled_digits() -> np.ndarray:
    """The `[1797, 65]` table (pixels, label) that scikit-learn ships with its package.

    Read straight from scikit-learn's data folder: `sklearn.datasets.load_digits` returns the
    same table but importing scikit-learn costs about two seconds of start-up on every run.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ValueError("dataset digits needs scikit-learn installed (pip install scikit-learn)")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # a future layout: fall back to the public loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.column_stack([bunch.data, bunch.target])
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.float64)


@DATASETS.register("digits")
def digits(seed: int, test_fraction: float, num_clients: int) -> Dataset:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 images, 10 classes."""
    table = _bundled_digits()
    x = (table[:, :-1].astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = table[:, -1].astype(np.int64)
    tr, te = _stratified_split(y, test_fraction, seed)
    return Dataset(
        "digits", torch.from_numpy(x[tr]), torch.from_numpy(y[tr]),
        torch.from_numpy(x[te]), torch.from_numpy(y[te]), 10,
    )


def _cache_dir() -> Path:
    root = os.environ.get("KOINON_CACHE") or os.path.join(Path.home(), ".cache", "koinon")
    return Path(root)


@DATASETS.register("mnist1d")
def mnist1d(seed: int, test_fraction: float, num_clients: int, num_samples: int = 5000) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated locally by the mnist1d package: 40-step 1-D signals, 10 classes."""
    if num_samples < 20:
        raise ValueError(f"num_samples must be at least 20, got {num_samples}")
    # The generator is pure Python (about 1 ms a sample), so generated arrays are cached by
    # their arguments; the data is never downloaded.
    key = hashlib.sha256(f"mnist1d-v1-{num_samples}-{test_fraction}".encode()).hexdigest()[:12]
    path = _cache_dir() / f"mnist1d-{key}.npz"
    if path.exists():
        arrays = dict(np.load(path))
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_samples
        args.train_split = 1.0 - test_fraction
        state = np.random.get_state()  # the generator seeds numpy's global RNG; restore it
        try:
            raw = make_dataset(args)
        finally:
            np.random.set_state(state)
        arrays = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return Dataset(
        "mnist1d",
        torch.from_numpy(arrays["x"].astype(np.float32)).unsqueeze(1),
        torch.from_numpy(arrays["y"].astype(np.int64)),
        torch.from_numpy(arrays["x_test"].astype(np.float32)).unsqueeze(1),
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
        10,
    )


@DATASETS.register("synthetic")
def synthetic(
    seed: int,
    test_fraction: float,
    num_clients: int,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
    dimension: int = 60,
    num_classes: int = 10,
) -> Dataset:
    """LEAF/FedProx Synthetic(alpha, beta): per-client logistic models; natural partition by client."""
    # Li et al., "Federated Optimization in Heterogeneous Networks" (2020), Section 5.1:
    # u_k ~ N(0, alpha), W_k, b_k ~ N(u_k, 1); B_k ~ N(0, beta), v_k ~ N(B_k, 1);
    # x ~ N(v_k, Sigma) with Sigma_jj = j^-1.2; y = argmax softmax(W_k x + b_k).
    # Client sizes follow a lognormal law, as in LEAF.
    if num_clients < 1:
        raise ValueError(f"num_clients must be positive, got {num_clients}")
    rng = np.random.default_rng([seed, 0x5F17])
    sizes = (rng.lognormal(4, 2, num_clients).astype(int) + 50).clip(max=2000)
    sigma = np.array([(j + 1) ** -1.2 for j in range(dimension)])
    xs, ys, owner = [], [], []
    for k in range(num_clients):
        u = rng.normal(0, np.sqrt(synthetic_alpha))
        b_mean = rng.normal(0, np.sqrt(synthetic_beta))
        w = rng.normal(u, 1, (num_classes, dimension))
        b = rng.normal(u, 1, num_classes)
        v = rng.normal(b_mean, 1, dimension)
        x = rng.normal(v, np.sqrt(sigma), (sizes[k], dimension))
        xs.append(x)
        ys.append(np.argmax(x @ w.T + b, axis=1))
        owner.append(np.full(sizes[k], k))
    x_all = np.concatenate(xs).astype(np.float32)
    y_all = np.concatenate(ys).astype(np.int64)
    own = np.concatenate(owner)
    is_test = np.zeros(len(y_all), dtype=bool)
    for k in range(num_clients):  # each client's own held-out share goes to the global test set
        idx = np.flatnonzero(own == k)
        n_test = max(1, round(len(idx) * test_fraction))
        is_test[rng.choice(idx, n_test, replace=False)] = True
    tr = np.flatnonzero(~is_test)
    te = np.flatnonzero(is_test)
    own_tr = own[tr]
    groups = [np.flatnonzero(own_tr == k) for k in range(num_clients)]
    return Dataset(
        "synthetic", torch.from_numpy(x_all[tr]), torch.from_numpy(y_all[tr]),
        torch.from_numpy(x_all[te]), torch.from_numpy(y_all[te]), num_classes, groups,
    )
