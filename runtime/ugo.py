"""The weights of STA's Universal Group Operators, which the UGO op (runtime/ops.py) runs: each a 1-hidden-layer
ReLU MLP x -> w2 . relu(w1 x + b1) + b2 fitted to one function over its domain (spikec.ugo fits them;
spikec ships them fitted in spikec/data). The passes load them to build a model; the driver fits them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from spikec.errors import SpikecError

DATA_DIR = Path(str(files("spikec").joinpath("data")))


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def _silu(x: np.ndarray) -> np.ndarray:
    return x * 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class UGOSpec:
    name: str
    function: Callable[[np.ndarray], np.ndarray]
    mixture: tuple[tuple[float, float, float], ...]  # (probability, low, high) of uniform components
    hidden: int  # N of the paper's Table 3
    reference_hidden: int  # N in the reference code's shipped weights
    loss: str  # "huber", "huber+penalty" or "mse"
    optimizer: str  # "sgd" or "adam", lr 0.01
    schedule: tuple  # ("multistep", milestones, gamma) | ("step", size, gamma) | ("cosine",)
    # fit() minimizes the relative error: the operator scales (LayerNorm's 1/sqrt(var), softmax's 1/sum)
    relative: bool = False

    @property
    def domain(self) -> tuple[float, float]:
        return min(lo for _, lo, _ in self.mixture), max(hi for _, _, hi in self.mixture)

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        probabilities = np.array([p for p, _, _ in self.mixture])
        component = rng.choice(len(self.mixture), size=count, p=probabilities / probabilities.sum())
        lows = np.array([lo for _, lo, _ in self.mixture])[component]
        highs = np.array([hi for _, _, hi in self.mixture])[component]
        return rng.uniform(lows, highs)


SPECS: dict[str, UGOSpec] = {
    spec.name: spec
    for spec in (
        UGOSpec(
            "exp",
            np.exp,
            ((0.5, -35.0, 3.0), (0.5, -12.0, 2.0)),
            32,
            32,
            "huber",
            "sgd",
            ("multistep", (500, 800), 0.5),
        ),
        UGOSpec(
            "gelu", _gelu, ((0.5, -25.0, 25.0), (0.5, -1.0, 1.0)), 32, 64, "huber+penalty", "sgd", ("step", 100, 0.5)
        ),
        UGOSpec(
            "inverse",
            lambda x: 1.0 / x,
            ((0.75, 3.0, 38.0), (0.25, 2.0, 75.0)),
            16,
            64,
            "huber+penalty",
            "sgd",
            ("multistep", (500, 800), 0.1),
            relative=True,
        ),
        UGOSpec(
            "rsqrt", lambda x: 1.0 / np.sqrt(x), ((1.0, 0.01, 1.0),), 8, 8, "mse", "adam", ("cosine",), relative=True
        ),
        # Not in the paper: SiLU (LLaMA-family gated MLPs; quick_gelu is silu(1.702 x) / 1.702) on GELU's domain,
        # size and recipe.
        UGOSpec(
            "silu", _silu, ((0.5, -25.0, 25.0), (0.5, -1.0, 1.0)), 32, 32, "huber+penalty", "sgd", ("step", 100, 0.5)
        ),
    )
}


@dataclass(frozen=True)
class UGO:
    """Trained weights of one operator: x -> w2 . relu(w1 x + b1) + b2."""

    name: str
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: float

    @property
    def hidden(self) -> int:
        return int(self.w1.size)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return np.maximum(x[..., None] * self.w1 + self.b1, 0.0) @ self.w2 + self.b2

    def scaled(self, factor: float) -> UGO:
        """x -> f(factor x) / factor: quick_gelu from SiLU's operator (the scalings fold into w1 and w2, b2)."""
        return UGO(self.name, self.w1 * factor, self.b1, self.w2 / factor, self.b2 / factor)

    def thresholds(self) -> np.ndarray:
        """Per hidden neuron, the largest pre-activation over the domain (the affine pre-activation peaks
        at an end of the interval)."""
        low, high = SPECS[self.name].domain
        return np.maximum(np.maximum(low * self.w1 + self.b1, high * self.w1 + self.b1), 1e-12)

    def spiking(self, x: np.ndarray, timesteps: int) -> np.ndarray:
        """The UGO with its hidden layer as IF neurons, after ``timesteps`` steps of constant input x."""
        x = np.asarray(x, np.float64)
        theta = self.thresholds()
        current = x[..., None] * self.w1 + self.b1
        v = np.full(current.shape, 0.5) * theta
        count = np.zeros(current.shape)
        for _ in range(timesteps):
            v = v + current
            spike = v >= theta
            v = v - spike * theta
            count += spike
        return (count / timesteps * theta) @ self.w2 + self.b2

    def arrays(self) -> dict[str, np.ndarray]:
        """The weights as ``load`` reads them back (an .npz for spikec.modelio.write)."""
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": np.array(self.b2)}


def path_for(name: str, hidden: int | None = None) -> Path:
    """Shipped weights: ugo-<name>.npz at the paper's N; ugo-<name>-n<N>.npz for other sizes."""
    spec = spec_of(name)
    return DATA_DIR / (f"ugo-{name}.npz" if hidden in (None, spec.hidden) else f"ugo-{name}-n{hidden}.npz")


def load(name: str, hidden: int | None = None) -> UGO:
    path = path_for(name, hidden)
    if not path.is_file():
        raise SpikecError(
            f"UGO '{name}' with N={hidden}: no weights at {path}; train them with "
            f"`spikec ugo train --only {name} --hidden {hidden}`"
        )
    with np.load(path) as data:
        return UGO(name, data["w1"], data["b1"], data["w2"], float(data["b2"]))


def spec_of(name: str) -> UGOSpec:
    if name not in SPECS:
        raise SpikecError(f"unknown UGO '{name}': choose one of {', '.join(SPECS)}")
    return SPECS[name]
