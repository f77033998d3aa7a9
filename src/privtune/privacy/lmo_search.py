"""Offline search for LMO-DP parameters meeting a SOUND subsampled epsilon over a planned run.

The paper's search (lmo_noise_grid_searching.py) filters a 40,824-point grid on the per-step,
non-subsampled, out-of-domain epsilon. Here every candidate is scored, vectorised with numpy,
by lmo_accounting's bound over the whole plan (Poisson rate q, `steps` steps, delta); among
those within the target we keep the most useful (paper's U(gamma) = P(|n| <= gamma)) or the
least noisy (smallest per-coordinate std). Results are cached on disk per plan and grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from privtune.errors import ConfigError
from privtune.io import read_json, write_json
from privtune.privacy.lmo_accounting import (
    MAX_ORDER,
    orders_up_to,
    rdp_arrays,
    rdp_to_epsilon_arrays,
    subsampled_rdp,
)
from privtune.privacy.lmo_mechanism import (
    LMOParams,
    inverse_moments_arrays,
    log_mgf_arrays,
    usefulness_arrays,
)

Objective = Literal["usefulness", "std"]
FIELDS = ("a1", "a3", "a4", "k", "theta", "lam", "a", "b")


@dataclass(frozen=True)
class LMOGrid:
    """A product grid: weights a1, a3, a4; (theta, k) pairs; rates lam; (b, a) Uniform pairs."""

    version: str
    a1: tuple[float, ...]
    a3: tuple[float, ...]
    a4: tuple[float, ...]
    theta_k: tuple[tuple[float, float], ...]
    lam: tuple[float, ...]
    uniform_ba: tuple[tuple[float, float], ...]

    def __len__(self) -> int:
        sizes = (self.a1, self.a3, self.a4, self.theta_k, self.lam, self.uniform_ba)
        return math.prod(len(axis) for axis in sizes)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every candidate as parallel (N,) arrays, built from index grids (no Python loop)."""
        axes = [self.a1, self.a3, self.a4, range(len(self.theta_k)), self.lam]
        axes.append(range(len(self.uniform_ba)))
        mesh = np.meshgrid(*[np.asarray(axis, dtype=float) for axis in axes], indexing="ij")
        a1, a3, a4, tk, lam, ba = (m.ravel() for m in mesh)
        theta_k = np.asarray(self.theta_k, dtype=float)[tk.astype(int)]
        uniform = np.asarray(self.uniform_ba, dtype=float)[ba.astype(int)]
        return {
            "a1": a1, "a3": a3, "a4": a4, "theta": theta_k[:, 0], "k": theta_k[:, 1],
            "lam": lam, "b": uniform[:, 0], "a": uniform[:, 1],
        }  # fmt: skip


_WEIGHTS = tuple(round(0.1 * i, 10) for i in range(1, 10))
_THETA_K = ((1.0, 2.0), (2.0, 2.0), (3.0, 2.0), (5.0, 1.0), (9.0, 0.5), (7.5, 1.0), (0.5, 1.0))

# The authors' grid (rebuttal and lmo_noise_grid_searching.py): 9^3 * 7 * 4 * 2 = 40,824 points.
PAPER_GRID = LMOGrid(
    version="paper-v1",
    a1=_WEIGHTS,
    a3=_WEIGHTS,
    a4=_WEIGHTS,
    theta_k=_THETA_K,
    lam=(0.1, 0.5, 1.0, 5.0),
    uniform_ba=((1.0, 0.0), (2.0, 1.0)),
)

# The paper grid never has a1*theta < 0.05, so no candidate has a finite bound beyond order 20,
# which caps how small a subsampled epsilon can get. This grid adds small Gamma/Exponential
# weights (nearly plain Laplace with a random scale in a4*[a, b]) and more Uniform ranges.
EXTENDED_GRID = LMOGrid(
    version="extended-v1",
    a1=(0.001, 0.01, 0.03, *_WEIGHTS[::2]),
    a3=(0.001, 0.01, 0.03, *_WEIGHTS[::2]),
    a4=_WEIGHTS,
    theta_k=_THETA_K,
    lam=(0.1, 0.5, 1.0, 5.0),
    uniform_ba=((1.0, 0.0), (2.0, 1.0), (3.0, 2.0), (5.0, 4.0), (8.0, 7.0)),
)


@dataclass(frozen=True)
class LMOSearchResult:
    params: LMOParams
    epsilon: float  # sound subsampled epsilon over the plan
    usefulness: float  # P(|n| <= gamma * clip)
    noise_std: float  # per-coordinate std, in units of the (L1) clip
    objective: str
    n_candidates: int
    n_feasible: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params.to_dict(),
            "epsilon": self.epsilon,
            "usefulness": self.usefulness,
            "noise_std": self.noise_std,
            "objective": self.objective,
            "n_candidates": self.n_candidates,
            "n_feasible": self.n_feasible,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMOSearchResult:
        return cls(
            params=LMOParams.from_dict(d["params"]),
            **{key: d[key] for key in d if key != "params"},
        )


def grid_epsilons(
    p: dict[str, np.ndarray], sample_rate: float, steps: int, delta: float, max_order: int
) -> np.ndarray:
    """Sound subsampled epsilon of every candidate (inf where no order has a finite bound)."""
    # Orders past every candidate's MGF pole are inf for all: drop them before the O(A^2) part.
    orders = orders_up_to(max_order)
    finite = np.isfinite(log_mgf_arrays({k: v[:, None] for k, v in p.items()}, orders - 1.0))
    last = int(orders[finite.any(axis=0)].max()) if finite.any() else 2
    orders = orders_up_to(last)
    total = subsampled_rdp(rdp_arrays(p, orders), sample_rate) * steps
    return rdp_to_epsilon_arrays(total, orders, delta)


def _cache_key(target: float, delta: float, q: float, steps: int, grid: LMOGrid, **kw: Any) -> str:
    extra = "|".join(f"{key}={value!r}" for key, value in sorted(kw.items()))
    return f"eps={target!r}|delta={delta!r}|q={q!r}|steps={steps}|grid={grid.version}|{extra}"


# This process's searches by key, when no cache file is given: the finetune stage checks its
# plan (the law's search) before it loads the model, and the loop's controller searches again.
_SEARCHED: dict[str, dict[str, Any]] = {}


def search(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    objective: Objective = "usefulness",
    gamma: float = 0.9,
    grid: LMOGrid = PAPER_GRID,
    max_order: int = MAX_ORDER,
    cache_path: str | Path | None = None,
    write_cache: bool = True,
) -> LMOSearchResult:
    """Best grid candidate whose sound epsilon over the plan is <= target_epsilon.

    Raises ConfigError (field finetune.epsilon) when no candidate qualifies. ``write_cache``
    false: the cache file is read, not written (`privtune check` writes nothing); a search it
    lacks is kept in this process only.
    """
    if objective not in ("usefulness", "std"):
        raise ValueError(f"objective must be 'usefulness' or 'std', got {objective!r}")
    if not target_epsilon > 0:
        raise ConfigError("finetune.epsilon", "must be > 0", "set a positive target")
    key = _cache_key(target_epsilon, delta, sample_rate, steps, grid, objective=objective,
                     gamma=gamma, max_order=max_order)  # fmt: skip
    stored = read_json(cache_path) if cache_path and Path(cache_path).exists() else {}
    if key in stored:
        entry = stored[key]
    else:  # this process's searches, kept in the cache file too when it may be written
        if key not in _SEARCHED:
            _SEARCHED[key] = _search_uncached(
                target_epsilon, sample_rate, steps, delta, objective, gamma, grid, max_order
            )
        entry = _SEARCHED[key]
        if cache_path is not None and write_cache:
            stored[key] = entry
            write_json(cache_path, stored)
    if entry.get("best_epsilon") is not None:
        # the extended grid reaches lower epsilons than the paper's, not every one
        finer = ", or try the entry's `grid: extended` (lower epsilons, about 20 s a search)"
        if grid.version != PAPER_GRID.version:
            finer = ""
        raise ConfigError(
            "finetune.epsilon",
            f"no LMO-DP candidate in grid {grid.version} reaches epsilon <= {target_epsilon} "
            f"over {steps} steps at q={sample_rate:.4g} (best: {entry['best_epsilon']:.4g})",
            "raise finetune.epsilon, plan fewer steps (finetune.epochs) or a lower sample rate "
            "(finetune.batch_size)" + finer,
        )
    return LMOSearchResult.from_dict(entry)


def _search_uncached(
    target: float,
    q: float,
    steps: int,
    delta: float,
    objective: Objective,
    gamma: float,
    grid: LMOGrid,
    max_order: int,
) -> dict[str, Any]:
    p = grid.arrays()
    eps = grid_epsilons(p, q, steps, delta, max_order)
    feasible = np.flatnonzero(eps <= target)
    if feasible.size == 0:
        return {"best_epsilon": float(eps.min())}
    sub = {name: value[feasible] for name, value in p.items()}
    useful = usefulness_arrays(sub, gamma)
    if objective == "usefulness":
        best = int(np.argmax(useful))
        _, second = inverse_moments_arrays({name: value[best] for name, value in sub.items()})
        std = float(np.sqrt(2.0 * second))
    else:
        _, second = inverse_moments_arrays(sub)
        best = int(np.argmin(second))
        std = float(np.sqrt(2.0 * second[best]))
    params = LMOParams(**{name: float(sub[name][best]) for name in FIELDS})
    result = LMOSearchResult(
        params=params,
        epsilon=float(eps[feasible[best]]),
        usefulness=float(useful[best]),
        noise_std=std,
        objective=objective,
        n_candidates=len(grid),
        n_feasible=int(feasible.size),
    )
    return result.to_dict()
