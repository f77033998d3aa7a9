"""LMO-DP noise (arXiv 2405.18776): Laplace noise whose inverse scale is itself random.

Per coordinate i an inverse scale eps_i = a1*Gamma(k, scale theta) + a3*Exponential(rate lam)
+ a4*Uniform(a, b) is drawn (independent draws), then n_i ~ Laplace(0, clip / eps_i). The noise
is added to the SUM of per-sample gradients clipped to L1 norm <= clip (see lmo_accounting for
why L1). The Exponential uses the RATE convention everywhere (sampler, MGF, tests): the authors'
sampler passed lam to numpy as a scale while their accountant read it as a rate.

Everything is in units of the clipping threshold: with clip = 1 the noise is Laplace(0, 1/eps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from privtune.errors import ConfigError

# An MGF argument within this relative margin of its pole counts as divergent: at the pole the
# MGF is +inf, and float rounding must not turn it into a huge finite number.
POLE_MARGIN = 1e-9


@dataclass(frozen=True)
class LMOParams:
    """The 8 parameters of the inverse-scale distribution (lam is the Exponential's RATE)."""

    a1: float
    a3: float
    a4: float
    k: float
    theta: float
    lam: float
    a: float
    b: float

    def __post_init__(self) -> None:
        for name in ("a1", "a3", "a4", "k", "theta", "lam", "b"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"lmo.{name}", f"must be a finite number > 0, got {value!r}", "set it > 0"
                )
        if not (math.isfinite(self.a) and self.a >= 0):
            raise ConfigError("lmo.a", f"must be >= 0, got {self.a!r}", "set lmo.a >= 0")
        if not self.a < self.b:
            raise ConfigError(
                "lmo.b", f"the Uniform needs a < b, got a={self.a}, b={self.b}", "set b > a"
            )

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LMOParams:
        return cls(**{key: float(values[key]) for key in cls.__dataclass_fields__})

    def with_noise_level(self, level: float) -> LMOParams:
        """The same law with every noise draw multiplied by `level` (weights a1, a3, a4 divided
        by it): level > 1 adds noise. The knob the budget guard turns, as z for Gaussian noise;
        spending is non-increasing in it (the pair at level L is the pair at level 1 with the
        shift divided by L, and the bound grows with the shift)."""
        if not (math.isfinite(level) and level > 0):
            raise ValueError(f"noise level must be finite and > 0, got {level!r}")
        return replace(self, a1=self.a1 / level, a3=self.a3 / level, a4=self.a4 / level)

    def arrays(self) -> dict[str, np.ndarray]:
        """The parameters as 0-d arrays, the form the vectorised helpers take."""
        return {key: np.asarray(value, dtype=float) for key, value in self.to_dict().items()}


# ---------------------------------------------------------------- sampling (torch, CPU generator)


def sample_inverse_scales(
    params: LMOParams, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """n independent draws of eps = a1*Gamma(k, theta) + a3*Exp(rate lam) + a4*U(a, b)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    shape = torch.full((n,), params.k, dtype=torch.float64)
    gamma = torch._standard_gamma(shape, generator=generator) * params.theta
    exponential = torch.empty(n, dtype=torch.float64).exponential_(1.0, generator=generator)
    uniform = torch.empty(n, dtype=torch.float64).uniform_(params.a, params.b, generator=generator)
    eps = params.a1 * gamma + params.a3 * exponential / params.lam + params.a4 * uniform
    return eps.to(dtype)


def lmo_noise(
    params: LMOParams,
    shape: tuple[int, ...] | torch.Size,
    clip: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """LMO noise for a sum of L1-clipped gradients: clip * Laplace(0, 1) / eps, per coordinate.

    Drawn on the CPU generator (as GaussianMechanism.add_noise does) so CPU and CUDA runs add
    identical noise; move the result to the device in one copy.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be > 0, got {clip!r}")
    n = math.prod(shape)
    eps = sample_inverse_scales(params, n, generator)
    # Laplace(0, 1) as the difference of two independent Exp(1) draws.
    pair = torch.empty(2, n, dtype=torch.float64).exponential_(1.0, generator=generator)
    laplace = pair[0] - pair[1]
    return (clip * laplace / eps).to(dtype).reshape(tuple(shape))


# ---------------------------------------------------------------- MGF of eps, vectorised


def _log_expm1_ratio(x: np.ndarray) -> np.ndarray:
    """log((e^x - 1) / x), stable for all real x (0 at x = 0)."""
    x = np.asarray(x, dtype=float)
    ax = np.abs(x)
    safe = np.where(ax > 0, ax, 1.0)
    value = np.maximum(x, 0.0) + np.log(-np.expm1(-safe)) - np.log(safe)
    return np.where(ax > 0, value, 0.0)


def log_mgf_arrays(p: dict[str, np.ndarray], t: np.ndarray | float) -> np.ndarray:
    """log E[exp(t * eps)] broadcast over parameter arrays and t; +inf where the MGF diverges.

    Gamma term (1 - a1 theta t)^-k needs a1 theta t < 1; Exponential term lam / (lam - a3 t)
    needs a3 t < lam; the Uniform term is finite everywhere.
    """
    t = np.asarray(t, dtype=float)
    u_gamma = p["a1"] * p["theta"] * t
    u_exp = p["a3"] * t / p["lam"]
    valid = (u_gamma < 1.0 - POLE_MARGIN) & (u_exp < 1.0 - POLE_MARGIN)
    with np.errstate(invalid="ignore", divide="ignore"):
        gamma = -p["k"] * np.log1p(-np.where(valid, u_gamma, 0.0))
        exponential = -np.log1p(-np.where(valid, u_exp, 0.0))
        uniform = p["a4"] * p["a"] * t + _log_expm1_ratio(p["a4"] * (p["b"] - p["a"]) * t)
    return np.where(valid, gamma + exponential + uniform, np.inf)


def _dlog_expm1_ratio(x: np.ndarray) -> np.ndarray:
    """d/dx log((e^x - 1) / x) = 1 / (1 - e^-x) - 1/x, with its series near 0."""
    x = np.asarray(x, dtype=float)
    small = np.abs(x) < 1e-4
    safe = np.where(small, 1.0, x)
    neg = np.minimum(safe, -1e-300)
    # 1 / (1 - e^-x), written so that neither branch overflows.
    logistic = np.where(safe < 0, np.exp(neg) / np.expm1(neg), -1.0 / np.expm1(-np.abs(safe)))
    exact = logistic - 1.0 / safe
    return np.where(small, 0.5 + x / 12.0, exact)


def log_density_arrays(p: dict[str, np.ndarray], u: np.ndarray) -> np.ndarray:
    """log density of the unit-clip noise n = Laplace(0, 1) / eps at u: p(u) = M'(-|u|) / 2."""
    t = -np.abs(np.asarray(u, dtype=float))
    dlog = (
        p["a1"] * p["theta"] * p["k"] / (1.0 - p["a1"] * p["theta"] * t)
        + p["a3"] / (p["lam"] - p["a3"] * t)
        + p["a4"] * p["a"]
        + p["a4"] * (p["b"] - p["a"]) * _dlog_expm1_ratio(p["a4"] * (p["b"] - p["a"]) * t)
    )
    return log_mgf_arrays(p, t) + np.log(dlog) - math.log(2.0)


def mgf(params: LMOParams, t: np.ndarray | float) -> np.ndarray:
    """E[exp(t * eps)]; +inf outside the domain (a1 theta t < 1 and a3 t < lam)."""
    t = np.asarray(t, dtype=float)
    if np.isnan(t).any():
        raise ValueError("mgf: t contains NaN")
    return np.exp(log_mgf_arrays(params.arrays(), t))


def mean_inverse_scale(params: LMOParams) -> float:
    """E[eps] = a1 k theta + a3 / lam + a4 (a + b) / 2 (the MGF's slope at 0)."""
    p = params
    return p.a1 * p.k * p.theta + p.a3 / p.lam + p.a4 * (p.a + p.b) / 2.0


def usefulness_arrays(p: dict[str, np.ndarray], gamma: float) -> np.ndarray:
    """P(|n| <= gamma) for unit-clip noise: 1 - E[exp(-gamma eps)] = 1 - M(-gamma)."""
    return -np.expm1(log_mgf_arrays(p, -gamma))


def usefulness(params: LMOParams, gamma: float = 0.9) -> float:
    """The paper's usefulness U(gamma) = P(|n| <= gamma), gamma in units of the clip."""
    if gamma <= 0:
        raise ValueError("gamma must be > 0")
    return float(usefulness_arrays(params.arrays(), gamma))


# Quadrature nodes in log t for E[1/eps] = int M(-t) dt and E[1/eps^2] = int t M(-t) dt.
# The integrands are smooth in log t; tails beyond the range are below 1e-8 for k >= 0.5.
_LOG_T = np.linspace(-25.0, 45.0, 1401)


def inverse_moments_arrays(
    p: dict[str, np.ndarray], chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """(E[1/eps], E[1/eps^2]) for each candidate, by trapezoid quadrature on a log-t grid."""
    flat = {
        key: np.broadcast_to(value, np.broadcast(*p.values()).shape).ravel()
        for key, value in p.items()
    }
    n = next(iter(flat.values())).size
    first, second = np.empty(n), np.empty(n)
    t = np.exp(_LOG_T)
    for start in range(0, n, chunk):
        part = {key: value[start : start + chunk, None] for key, value in flat.items()}
        m = np.exp(log_mgf_arrays(part, -t[None, :]))
        first[start : start + chunk] = np.trapezoid(m * t, _LOG_T, axis=1)
        second[start : start + chunk] = np.trapezoid(m * t * t, _LOG_T, axis=1)
    shape = np.broadcast(*p.values()).shape
    return first.reshape(shape), second.reshape(shape)


def noise_std(params: LMOParams, clip: float = 1.0) -> float:
    """Per-coordinate std of the noise: clip * sqrt(2 E[1/eps^2]) (Laplace variance 2 b^2)."""
    _, second = inverse_moments_arrays(params.arrays())
    return float(clip * np.sqrt(2.0 * second))


def mean_abs_noise(params: LMOParams, clip: float = 1.0) -> float:
    """E|n| = clip * E[1/eps] (the paper's 'mean |noise|')."""
    first, _ = inverse_moments_arrays(params.arrays())
    return float(clip * first)
