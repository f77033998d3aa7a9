"""RLDP (Khadangi et al., 2025, arXiv 2507.22565): a Soft Actor-Critic hyper-policy, trained
online during the fine-tuning run, sets per-adapter clipping thresholds and the noise
multiplier every ``rl_interval`` steps.

Soundness: the policy sees only (a) the loss on held-out validation records, (b) public
quantities (epsilon spent, progress, its own past actions), (c) a differentially private
histogram of each adapter's per-sample gradient norms: every step the mechanism releases, per
adapter k and level l, the noisy fraction of samples with norm <= l * C_k (levels 0.5, 1, 2:
the clip fraction, and where the norms lie around the threshold), and the ledger charges it
(mechanisms.py). It never reads the raw norms or the training loss of the protected records:
actions chosen from those would leak information no ledger accounts for. Every action still
goes through the budget guard, so no policy (random, failing or learned) can end a run above
the target epsilon.

Reward of an interval: validation-loss improvement divided by the interval's pace of privacy
spending relative to a uniform schedule, r = dU / max(pace, 0.05) with
pace = (d_eps / eps_target) / (steps / total_steps), clipped to [-10, 10]. Spending at the
uniform pace leaves the improvement as it is; spending twice as fast halves it.

SAC is stable-baselines3's: the training loop drives it (predict, replay buffer, train) since
the loop, not the agent, owns time.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch

from privtune.control.base import Action, Controller, ControllerContext, Observation

log = logging.getLogger(__name__)

N_FEATURES = 6  # valid loss, its change, eps spent/target, progress, pace, budget per step left
# (plus the DP norm histogram, adapters x levels, and the last action)


def _step_cost(z: float) -> float:
    """e^{1/z^2} - 1: a subsampled Gaussian step's share of mu^2 in the CLT's mu-GDP."""
    return math.expm1(min(1.0 / z**2, 700.0))


class _Spaces(gym.Env):
    """Observation and action spaces for SB3; steps are driven by the training loop."""

    def __init__(self, obs_dim: int, act_dim: int) -> None:  # pragma: no mutate block
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)

    def reset(
        self,
        *,
        seed: int | None = None,
        options: dict | None = None,
    ):  # pragma: no mutate block
        return np.zeros(self.observation_space.shape, np.float32), {}

    def step(self, action):  # pragma: no mutate block
        raise RuntimeError("RLDP's environment is stepped by the fine-tuning loop")


class RLDP(Controller):
    """Online SAC over log clipping thresholds (one per adapter) and the log noise multiplier."""

    name = "rldp"

    grouping = "per_adapter"
    needs_validation: ClassVar[bool] = True

    def __init__(
        self,
        ctx: ControllerContext,
        rl_interval: int = 10,
        warmup_intervals: int = 2,
        sac_updates: int = 4,
        sac_batch_size: int = 8,
        buffer_size: int = 2000,
        learning_rate: float = 1e-3,
        clip_bounds: tuple[float, float] = (0.5, 2.0),
        noise_bounds: tuple[float, float] = (0.8, 1.5),
        clip: float = 1.0,
        norm_levels: tuple[float, ...] = (0.5, 1.0, 2.0),
        norm_noise: float = 0.25,
        valid_records: int = 16,
        warm_start: str | None = None,
    ) -> None:  # pragma: no mutate block
        super().__init__(ctx)
        from stable_baselines3 import SAC
        from stable_baselines3.common.logger import Logger
        from stable_baselines3.common.running_mean_std import RunningMeanStd

        if rl_interval < 1 or sac_batch_size < 1 or sac_updates < 0 or valid_records < 1:
            raise ValueError(
                "rl_interval, sac_batch_size and valid_records must be >= 1, sac_updates >= 0"
            )
        # The validation loss before each decision, on this many records: the same ones every
        # time, so its change tracks the model; 16 keep a decision under a tenth of a step.
        self.validation_records = valid_records
        # Thresholds are relative to the equal split C / sqrt(K) of the flat threshold C: with it,
        # sum_k C_k^2 = C^2 and the start matches DP-SGD's signal-to-noise (C_k = C each would
        # add sqrt(K) times more noise per adapter).
        split = clip / math.sqrt(len(ctx.group_names))
        lo, hi = clip_bounds[0] * split, clip_bounds[1] * split
        z_lo, z_hi = noise_bounds
        if not (0 < lo < hi and 0 < z_lo < z_hi):
            raise ValueError("bounds must be 0 < low < high (both are multiples of the defaults)")
        levels = tuple(float(level) for level in norm_levels)
        if any(not level > 0 for level in levels) or not norm_noise > 0:
            raise ValueError("norm_levels must be > 0 and norm_noise > 0 (or norm_levels: [])")
        if levels and not ctx.expected_batch_size:
            raise ValueError("the DP norm histogram needs the expected batch size")
        self.norm_levels = levels
        # sigma_b of each count, as a fraction of the expected batch (0.25: a fraction's noise
        # is 0.25 per step, about 0.1 averaged over a 5-step interval)
        self.count_noise = norm_noise * ctx.expected_batch_size if levels else None
        self.interval = rl_interval
        self.warmup_intervals = warmup_intervals
        self.sac_updates = sac_updates
        self.sac_batch_size = sac_batch_size
        self.n_groups = len(ctx.group_names)
        self.log_clip = (math.log(lo), math.log(hi))
        # Noise bounds are factors of the budget-paced z (see budget_noise): at 1 the rest of
        # the run would spend what is left of the budget evenly.
        self.log_noise = (math.log(z_lo), math.log(z_hi))
        act_dim = self.n_groups + 1
        obs_dim = N_FEATURES + self.n_groups * len(levels) + act_dim
        self.sac = SAC(
            "MlpPolicy",
            _Spaces(obs_dim, act_dim),
            learning_rate=learning_rate,
            buffer_size=buffer_size,
            learning_starts=0,
            batch_size=sac_batch_size,
            gamma=0.9,
            tau=0.02,
            policy_kwargs={"net_arch": [64, 64]},
            seed=ctx.seed,
            device="cpu",
        )
        # Silent, and no folder: configure(None) would create an SB3-<time> dir in the temp
        # dir; metrics go to MLflow through the loop.
        self.sac.set_logger(Logger(folder=None, output_formats=[]))
        self.obs_rms = RunningMeanStd(shape=(obs_dim,))
        self.rng = np.random.default_rng(ctx.seed)
        self._used = 0.0  # steps x c(z) / c(z_cal) so far: the share of the budget spent
        self._step = 0
        self.safe = self._encode(split, 1.0)
        self._obs_dim = obs_dim
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self._prev_valid: float | None = None
        self._prev_eps = 0.0
        self._prev_step = 0
        self.decisions = 0
        self.fallbacks = 0
        self.last_reward = math.nan
        self.last_features: np.ndarray | None = None
        if warm_start:
            self.load_state_dict(torch.load(warm_start, weights_only=False))

    # -- action mapping ------------------------------------------------------------------
    def _encode(self, clip: float, noise_factor: float) -> np.ndarray:
        def unit(value: float, bounds: tuple[float, float]) -> float:
            low, high = bounds
            return float(np.clip(2 * (math.log(value) - low) / (high - low) - 1, -1, 1))

        return np.array(
            [unit(clip, self.log_clip)] * self.n_groups + [unit(noise_factor, self.log_noise)],
            dtype=np.float32,
        )

    def _decode(self, vector: np.ndarray) -> Action:
        def value(u: float, bounds: tuple[float, float]) -> float:
            low, high = bounds
            return math.exp(low + (float(u) + 1) / 2 * (high - low))

        clips = tuple(value(u, self.log_clip) for u in vector[: self.n_groups])
        factor = value(vector[-1], self.log_noise)
        if self._step + self.interval >= self.ctx.total_steps:
            # The last interval asks for the least noise; the guard raises it to what exactly
            # spends the rest, so no budget is left unused.
            factor = math.exp(self.log_noise[0])
        return Action(
            clip_thresholds=clips,
            noise_multiplier=self.budget_noise() * factor,
            count_noise=self.count_noise,
            count_levels=self.norm_levels,
        )

    def budget_noise(self) -> float:
        """The constant z that would spend what is left of the budget over the steps left.

        A pacing estimate, not an accountant (the guard composes the real ledger): by the
        central limit theorem for Poisson-subsampled Gaussian steps (Bu, Dong, Long, Su 2020)
        the run is close to mu-GDP with mu^2 = q^2 sum_t (e^{1/z_t^2} - 1), so each step's
        share of the budget is additive in c(z) = e^{1/z^2} - 1 (1/z^2 alone underweights
        low-noise steps many times over). After a share u of the calibrated run's total
        the rest affords the z with c(z) = c(z_cal) (1 - u) / left. Noisy early intervals thus
        buy less noise later instead of budget left unspent, and greedy ones pay for it.
        """
        total = self.ctx.total_steps
        left = max(total - self._step, 1) / total
        unused = max(1.0 - self._used / total, 1e-2)
        return 1.0 / math.sqrt(math.log1p(_step_cost(self.ctx.calibrated_noise) * unused / left))

    def _track(self, obs: Observation) -> None:
        """Account the interval just run at the noise the guard admitted (a public quantity)."""
        steps = max(obs.step - self._step, 0)
        z = obs.action.noise_multiplier
        if z > 0 and math.isfinite(z):
            self._used += steps * _step_cost(z) / _step_cost(self.ctx.calibrated_noise)
        self._step = obs.step

    def reserve_noise(self) -> float:
        return self.budget_noise() * math.exp(self.log_noise[1])

    # -- features and reward (public and held-out signals only) -------------------------
    def _features(self, obs: Observation) -> np.ndarray:  # pragma: no mutate block
        valid = obs.valid_loss
        if valid is None or not math.isfinite(valid):
            raise ValueError("validation loss is not finite")
        change = 0.0 if self._prev_valid is None else valid - self._prev_valid
        progress = obs.step / obs.total_steps
        spent = obs.epsilon_spent / obs.epsilon_target
        steps_left = max(obs.total_steps - obs.step, 1) / obs.total_steps
        features = [valid, change, spent, progress, self._pace(obs), (1 - spent) / steps_left]
        histogram = np.zeros(self.n_groups * len(self.norm_levels), np.float32)
        if self.norm_levels:
            if obs.norm_histogram_dp is None:
                raise ValueError("the DP norm histogram was not released")
            # fractions: noise can push them outside [0, 1]
            histogram = np.clip(np.ravel(obs.norm_histogram_dp), 0.0, 1.0).astype(np.float32)
        vector = np.concatenate([np.array(features, np.float32), histogram, self._prev[1]])
        if not np.all(np.isfinite(vector)):
            raise ValueError("observation is not finite")
        return vector

    def _pace(self, obs: Observation) -> float:  # pragma: no mutate block
        steps = max(obs.step - self._prev_step, 1)
        spent = (obs.epsilon_spent - self._prev_eps) / obs.epsilon_target
        return spent / (steps / obs.total_steps)

    def _reward(self, obs: Observation) -> float:  # pragma: no mutate block
        gain = 0.0 if self._prev_valid is None else self._prev_valid - obs.valid_loss
        return float(np.clip(gain / max(self._pace(obs), 0.05), -10.0, 10.0))

    # -- acting and learning ---------------------------------------------------------------
    def act(self, observation: Observation | None) -> Action:
        if observation is None or self._prev is None:
            vector = self.safe
            self._prev = (np.zeros(self._obs_dim, np.float32), vector)
        else:
            self._track(observation)
            try:
                vector = self._learn_and_act(observation)
            except Exception as err:  # a policy failure never stops training or the guarantee
                self.fallbacks += 1
                log.warning("RLDP policy failed (%s); keeping the last safe action", err)
                vector = self.safe
            self._prev_valid = observation.valid_loss
            self._prev_eps = observation.epsilon_spent
            self._prev_step = observation.step
        self.decisions += 1
        return self._decode(vector)

    def _learn_and_act(self, obs: Observation) -> np.ndarray:  # pragma: no mutate block
        raw = self._features(obs)
        self.last_features = raw
        self.obs_rms.update(raw[None])
        x = np.clip((raw - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + 1e-8), -5, 5)
        x = x.astype(np.float32)
        reward = self._reward(obs)
        previous_x, previous_action = self._prev
        if self.decisions > 1:  # the first transition starts from the placeholder observation
            self.sac.replay_buffer.add(
                previous_x, x, previous_action, np.array([reward]), np.array([False]), [{}]
            )
        self.last_reward = reward
        if self.sac.replay_buffer.size() >= self.sac_batch_size and self.sac_updates:
            self.sac.train(gradient_steps=self.sac_updates, batch_size=self.sac_batch_size)
        if self.decisions <= self.warmup_intervals:
            vector = self.rng.uniform(-1, 1, self.n_groups + 1).astype(np.float32)
        else:
            vector, _ = self.sac.predict(x, deterministic=False)
            vector = np.asarray(vector, np.float32)
        if not np.all(np.isfinite(vector)):
            raise ValueError("policy produced a non-finite action")
        self._prev = (x, vector)
        self.safe = vector
        return vector

    def metrics(self) -> dict[str, float]:  # pragma: no mutate block
        """The last decision: reward, fallbacks and a summary of what the policy observed."""
        metrics = {
            "rldp/reward": self.last_reward,
            "rldp/fallbacks": float(self.fallbacks),
            "rldp/replay_size": float(self.sac.replay_buffer.size()),
        }
        raw = self.last_features
        if raw is not None:
            metrics |= {
                "rldp/obs/valid_loss": float(raw[0]),
                "rldp/obs/epsilon_fraction": float(raw[2]),
                "rldp/obs/pace": float(raw[4]),
            }
            levels = len(self.norm_levels)
            if levels and 1.0 in self.norm_levels:  # the DP fraction within each threshold
                at = self.norm_levels.index(1.0)
                histogram = raw[N_FEATURES : N_FEATURES + self.n_groups * levels]
                for k, name in enumerate(self.ctx.group_names):
                    metrics[f"rldp/obs/unclipped_dp/{name}"] = float(histogram[k * levels + at])
        return metrics

    def state_dict(self) -> dict[str, Any]:  # pragma: no mutate block
        return {
            "policy": self.sac.policy.state_dict(),
            "obs_mean": self.obs_rms.mean,
            "obs_var": self.obs_rms.var,
            "obs_count": self.obs_rms.count,
            "decisions": self.decisions,
            "fallbacks": self.fallbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # pragma: no mutate block
        """Warm start: the policy and observation statistics of an earlier run."""
        self.sac.policy.load_state_dict(state["policy"])
        self.obs_rms.mean = state["obs_mean"]
        self.obs_rms.var = state["obs_var"]
        self.obs_rms.count = state["obs_count"]
