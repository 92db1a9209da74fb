"""FedProx's Synthetic(alpha, beta) as a population of clients generated on demand.

Li et al., "Federated Optimization in Heterogeneous Networks" (FedProx, MLSys 2020), section 5.1, and
the generators of its released code (``data/synthetic_*/generate_synthetic.py``,
``data/synthetic_iid/generate_iid.py``). For client ``k``:

* ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` (``dim x classes``), ``b_k ~ N(u_k, 1)`` (``classes``): one
  softmax-regression model per client (``b_k``'s mean is ``u_k`` too, as the code's ``mean_b = mean_W``);
* ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` (``dim``), ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal,
  ``Sigma_jj = j^-1.2`` (``j = 1..dim``);
* ``y = argmax(softmax(x W_k + b_k))`` (= ``argmax(x W_k + b_k)``);
* ``n_k = int(lognormal(4, 2)) + 50`` samples, capped at ``size_cap``.

``alpha`` and ``beta`` are standard deviations (``np.random.normal(0, alpha)`` in the released code).
Defaults are the paper's: 60-d inputs, 10 classes, 30 clients. The **IID variant** (``iid = True``,
the code's ``synthetic_iid``) has one model ``W, b ~ N(0, 1)`` shared by every client and ``v = 0``
for every client (``alpha`` and ``beta`` do not apply and must stay 0); sizes as above.

**On demand, keyed.** Every draw of client ``k`` comes from one numpy generator seeded by
``derive_seed(seed, "fedprox-synthetic", k)``, in a fixed order (size, ``u_k``, ``B_k``, ``W_k``, ``b_k``,
``v_k``, then the samples; drawn as standard normals and scaled, so ``alpha`` / ``beta`` only scale
them); the IID model comes from ``derive_seed(seed, "fedprox-synthetic", "iid-model")``. So client
``k``'s data are the same generated alone (:func:`generate_client`) or inside any population of any
size, cost O(n_k), and need nothing of size ``num_clients`` (which only bounds ``k``): a population of
10^6 clients costs nothing until a client is sampled. The IID and non-IID variants of client ``k``
share its size and its noise draws (common random numbers).

**Size cap** (``size_cap``, default 1,000; 0 = uncapped, the paper's exact sizes). The log-normal
(4, 2) has median ``e^4 ~ 55`` but a very heavy tail: among 10^6 clients the largest draws are near
10^6 samples (one client as large as a thousand typical ones, 240 MB of float32 inputs when
sampled), and the padding of vectorised clients and the time of a round follow the largest client of
the cohort. The cap of 1,000 changes only the clients whose draw exceeds 950 (7.7 % of them), keeps
the median (104 samples) and every smaller size, and bounds one client at 1,000 samples (240 KB).

**Per-client split.** Each client's samples are i.i.d. draws, so its first ``max(1, int((1 -
test_fraction) * n_k))`` samples are its training part and the rest its held-out part (the released
code keeps ``int(0.9 n)`` for training, after a shuffle that i.i.d. samples do not need: its
``test_fraction`` is 0.1). ``split_seed`` does not apply (nothing is drawn for the split); the data's
seed is the ``seed`` option.

**Central view** ("a central test split only where one exists"): ``train`` / ``test`` are the union of
the clients' training / held-out parts, in client order, when ``num_clients <= central_clients``
(the paper's 30 clients: all of them); otherwise of a seeded sample of ``central_clients`` clients
(``derive_seed(seed, "fedprox-synthetic", "central-sample")``, sorted ids in
``population.central_ids``). At 10^6 clients only that sample is ever generated at load time.
``normalise`` is ignored: the generator's scale is the benchmark's.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedsim.data.base import ClientShard, DataInfo, DatasetSplit
from fedsim.errors import FedsimError
from fedsim.seeding import derive_seed

__all__ = [
    "NAME",
    "ClientParameters",
    "FedProxSyntheticPopulation",
    "client_parameters",
    "feature_variances",
    "generate_client",
    "load_fedprox_synthetic_split",
]

NAME = "fedprox_synthetic"
KEY = "fedprox-synthetic"
SIZE_LOG_MEAN, SIZE_LOG_SIGMA, SIZE_OFFSET = 4.0, 2.0, 50
"""Client sizes: ``int(lognormal(4, 2)) + 50`` (the released code)."""
FEATURE_POWER = -1.2
"""``Sigma_jj = j^-1.2``."""
CACHED_CLIENTS = 8
"""Recently generated clients a population keeps (a client trains, then is evaluated)."""
_OPTIONS = ("alpha", "beta", "iid", "num_clients", "dim", "classes", "size_cap", "seed", "central_clients")


@dataclass(frozen=True)
class ClientParameters:
    """Everything drawn for one client before its samples."""

    size: int
    """``n_k``, after the cap."""
    u: float
    """Mean of the client's model entries (``u_k ~ N(0, alpha)``; 0 in the IID variant)."""
    B: float
    """Mean of the client's feature means (``B_k ~ N(0, beta)``; 0 in the IID variant)."""
    W: np.ndarray
    """``[dim, classes]`` float64."""
    b: np.ndarray
    """``[classes]`` float64."""
    v: np.ndarray
    """``[dim]`` float64: the mean of the client's inputs."""


def feature_variances(dim: int = 60) -> np.ndarray:
    """``Sigma``'s diagonal: ``j^-1.2`` for ``j = 1..dim``."""
    return np.arange(1, dim + 1, dtype=np.float64) ** FEATURE_POWER


def _check_int(option: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise FedsimError(f"dataset '{NAME}': option {option} = {value!r} must be an integer >= {low}")
    return int(value)


def _check_std(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise FedsimError(f"dataset '{NAME}': option {option} = {value!r} must be a finite number >= 0 "
                          "(a standard deviation)")
    return float(value)


@dataclass(frozen=True)
class _Spec:
    """Validated generator options (what a client's data depend on, besides its id)."""

    seed: int = 0
    alpha: float = 0.0
    beta: float = 0.0
    iid: bool = False
    dim: int = 60
    classes: int = 10
    size_cap: int = 1000

    @classmethod
    def checked(cls, seed: Any, alpha: Any, beta: Any, iid: Any, dim: Any, classes: Any, size_cap: Any) -> _Spec:
        if not isinstance(iid, bool):
            raise FedsimError(f"dataset '{NAME}': option iid = {iid!r} must be true or false")
        alpha, beta = _check_std("alpha", alpha), _check_std("beta", beta)
        if iid and (alpha or beta):
            raise FedsimError(f"dataset '{NAME}': option iid = true is Synthetic-IID (one shared model, v = 0); "
                              f"alpha = {alpha} and beta = {beta} do not apply, leave them 0")
        size_cap = _check_int("size_cap", size_cap, 0)
        if 0 < size_cap < SIZE_OFFSET:
            raise FedsimError(f"dataset '{NAME}': option size_cap = {size_cap} must be 0 (uncapped) or >= "
                              f"{SIZE_OFFSET} (every client has at least {SIZE_OFFSET} samples)")
        return cls(_check_int("seed", seed, 0), alpha, beta, iid, _check_int("dim", dim, 1),
                   _check_int("classes", classes, 2), size_cap)


def _iid_model(spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """The IID variant's shared ``W, b ~ N(0, 1)``."""
    rng = np.random.default_rng(derive_seed(spec.seed, KEY, "iid-model"))
    return rng.standard_normal((spec.dim, spec.classes)), rng.standard_normal(spec.classes)


def _draw(spec: _Spec, k: int, iid_model: tuple[np.ndarray, np.ndarray] | None
          ) -> tuple[ClientParameters, np.random.Generator]:
    """Client ``k``'s parameters, and its generator positioned at its samples."""
    rng = np.random.default_rng(derive_seed(spec.seed, KEY, k))
    size = int(rng.lognormal(SIZE_LOG_MEAN, SIZE_LOG_SIGMA)) + SIZE_OFFSET
    if spec.size_cap:
        size = min(size, spec.size_cap)
    u = spec.alpha * float(rng.standard_normal())
    B = spec.beta * float(rng.standard_normal())
    W = u + rng.standard_normal((spec.dim, spec.classes))
    b = u + rng.standard_normal(spec.classes)
    v = B + rng.standard_normal(spec.dim)
    if spec.iid:  # drawn all the same, so that both variants share sizes and noise
        W, b = iid_model if iid_model is not None else _iid_model(spec)
        u, B, v = 0.0, 0.0, np.zeros(spec.dim)
    return ClientParameters(size, u, B, W, b, v), rng


def _samples(spec: _Spec, params: ClientParameters, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((params.size, spec.dim))
    x *= np.sqrt(feature_variances(spec.dim))
    x += params.v
    x = x.astype(np.float32)
    # Labels from the float32 inputs the model will see, so that they are exactly the client model's argmax.
    y = np.argmax(x.astype(np.float64) @ params.W + params.b, axis=1).astype(np.int64)
    return x, y


def _client_id(k: Any, num_clients: int | None = None) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise FedsimError(f"dataset '{NAME}': client id {k!r} is not an integer") from None
    if k < 0 or (num_clients is not None and k >= num_clients):
        bound = f"0 <= id < {num_clients}" if num_clients is not None else "id >= 0"
        raise FedsimError(f"dataset '{NAME}': client id {k} out of range ({bound})")
    return k


def client_parameters(seed: int, k: int, alpha: float = 0.0, beta: float = 0.0, dim: int = 60, classes: int = 10,
                      *, iid: bool = False, size_cap: int = 1000) -> ClientParameters:
    """Client ``k``'s size, ``u_k``, ``B_k``, ``W_k``, ``b_k``, ``v_k`` (what its samples are drawn from)."""
    spec = _Spec.checked(seed, alpha, beta, iid, dim, classes, size_cap)
    return _draw(spec, _client_id(k), None)[0]


def generate_client(seed: int, k: int, alpha: float = 0.0, beta: float = 0.0, dim: int = 60, classes: int = 10,
                    *, iid: bool = False, size_cap: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Client ``k``'s samples alone: ``x`` float32 ``[n_k, dim]`` and ``y`` int64 ``[n_k]`` (train part
    first, then held-out part)."""
    spec = _Spec.checked(seed, alpha, beta, iid, dim, classes, size_cap)
    params, rng = _draw(spec, _client_id(k), None)
    return _samples(spec, params, rng)


def _train_count(size: int, test_fraction: float) -> int:
    return max(1, int((1.0 - test_fraction) * size))


class FedProxSyntheticPopulation:
    """The :class:`~fedsim.data.base.Population` of Synthetic(alpha, beta): ``client(k)`` generates client
    ``k`` (keeping the last few), O(n_k) time and memory; nothing is built per client up front."""

    def __init__(self, spec: _Spec, num_clients: int, test_fraction: float) -> None:
        self.spec = spec
        self._num_clients = num_clients
        self.test_fraction = test_fraction
        self._iid_model = _iid_model(spec) if spec.iid else None
        self.central_ids = np.arange(0)
        """Clients whose data make the central view (all of them at small N, a seeded sample at large N)."""
        self._make_cache()

    def _make_cache(self) -> None:
        self._cached = functools.lru_cache(maxsize=CACHED_CLIENTS)(self._generate)

    def __getstate__(self) -> dict[str, Any]:  # the cache does not pickle (and need not travel)
        state = dict(self.__dict__)
        del state["_cached"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._make_cache()

    @property
    def num_clients(self) -> int:
        return self._num_clients

    def parameters(self, k: int) -> ClientParameters:
        """Client ``k``'s parameters (as :func:`client_parameters`)."""
        return _draw(self.spec, _client_id(k, self._num_clients), self._iid_model)[0]

    def client(self, k: int) -> ClientShard:
        """Client ``k``'s own tensors: train part (rows ``0..n_train-1``) and held-out part."""
        return self._cached(_client_id(k, self._num_clients))

    def _generate(self, k: int) -> ClientShard:
        params, rng = _draw(self.spec, k, self._iid_model)
        x, y = _samples(self.spec, params, rng)
        n_train = _train_count(params.size, self.test_fraction)
        x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
        train = TensorDataset(x_t[:n_train], y_t[:n_train])
        held = TensorDataset(x_t[n_train:], y_t[n_train:])
        return ClientShard(train, np.arange(n_train), held, np.arange(params.size - n_train))


def _central_ids(spec: _Spec, num_clients: int, central_clients: int) -> np.ndarray:
    if num_clients <= central_clients:
        return np.arange(num_clients)
    rng = np.random.default_rng(derive_seed(spec.seed, KEY, "central-sample"))
    return np.sort(rng.choice(num_clients, size=central_clients, replace=False))


def _central_view(population: FedProxSyntheticPopulation) -> tuple[TensorDataset, TensorDataset]:
    """The union of the central clients' train / held-out parts, in client order: each client is the
    same as :meth:`FedProxSyntheticPopulation.client` makes it, written straight into the two arrays
    (sizes first, so memory peaks at the central view itself, not twice it)."""
    spec, fraction = population.spec, population.test_fraction
    drawn = [_draw(spec, int(k), population._iid_model) for k in population.central_ids]
    n_train = [_train_count(params.size, fraction) for params, _ in drawn]
    n_held = [params.size - n for (params, _), n in zip(drawn, n_train, strict=True)]
    x_train = np.empty((sum(n_train), spec.dim), np.float32)
    x_held = np.empty((sum(n_held), spec.dim), np.float32)
    y_train, y_held = np.empty(len(x_train), np.int64), np.empty(len(x_held), np.int64)
    t = h = 0
    for (params, rng), nt, nh in zip(drawn, n_train, n_held, strict=True):
        x, y = _samples(spec, params, rng)
        x_train[t:t + nt], y_train[t:t + nt] = x[:nt], y[:nt]
        x_held[h:h + nh], y_held[h:h + nh] = x[nt:], y[nt:]
        t, h = t + nt, h + nh
    return (TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
            TensorDataset(torch.from_numpy(x_held), torch.from_numpy(y_held)))


def load_fedprox_synthetic_split(
    test_fraction: float = 0.2,
    split_seed: int = 0,
    normalise: bool = True,
    data_dir: str = "data",
    *,
    alpha: float = 0.0,
    beta: float = 0.0,
    iid: bool = False,
    num_clients: int = 30,
    dim: int = 60,
    classes: int = 10,
    size_cap: int = 1000,
    seed: int = 0,
    central_clients: int = 1000,
    **unknown: Any,
) -> DatasetSplit:
    """Synthetic(alpha, beta) (or Synthetic-IID) with ``num_clients`` natural clients generated on demand
    (``population``) and the central view of ``central_clients`` of them (see the module docstring).

    ``split_seed`` and ``normalise`` do not apply; ``data_dir`` is unused (nothing is read).
    """
    del split_seed, normalise, data_dir
    if unknown:
        raise FedsimError(f"dataset '{NAME}': unknown option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(_OPTIONS)}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 <= test_fraction < 1:
        raise FedsimError(f"dataset '{NAME}': test_fraction = {test_fraction!r} must be in [0, 1)")
    spec = _Spec.checked(seed, alpha, beta, iid, dim, classes, size_cap)
    num_clients = _check_int("num_clients", num_clients, 1)
    central_clients = _check_int("central_clients", central_clients, 1)
    population = FedProxSyntheticPopulation(spec, num_clients, float(test_fraction))
    population.central_ids = _central_ids(spec, num_clients, central_clients)
    train, test = _central_view(population)
    info = DataInfo(NAME, (spec.dim,), spec.classes)
    return DatasetSplit(train, test, info, clients=None, population=population)
