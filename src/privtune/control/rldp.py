"""RLDP (Khadangi et al., 2025, arXiv 2507.22565): a Soft Actor-Critic hyper-policy, trained
online during the fine-tuning run, sets per-adapter clipping thresholds and the noise
multiplier every ``rl_interval`` steps.

Soundness: the policy sees only (a) the loss on held-out validation records, (b) public
quantities (epsilon spent, progress, its own past actions), (c) only with ``norm_levels``
set (off by default: over 283 steps it cost more gradient noise than the policy made up for,
README "Longer runs"), a differentially private histogram of each adapter's per-sample
gradient norms: every step the mechanism releases, per adapter k and level l, the noisy
fraction of samples with norm <= l * C_k (levels 0.5, 1, 2: the clip fraction, and where the
norms lie around the threshold), and the ledger charges it (mechanisms.py). It never reads
the raw norms or the training loss of the protected records: actions chosen from those would
leak information no ledger accounts for. Every action still goes through the budget guard, so
no policy (random, failing or learned) can end a run above the target epsilon.

Reward of an interval: validation-loss improvement divided by the interval's pace of privacy
spending relative to a uniform schedule, r = dU / max(pace, 0.05) with
pace = (d_eps / eps_target) / (steps / total_steps), clipped to [-10, 10]. Spending at the
uniform pace leaves the improvement as it is; spending twice as fast halves it.

SAC is stable-baselines3's: the training loop drives it (predict, replay buffer, train) since
the loop, not the agent, owns time.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch

from privtune.control.base import Action, Controller, ControllerContext, Observation
from privtune.modeling import group_of
from privtune.privacy.mechanisms import count_dims, quarter_share_count_std

log = logging.getLogger(__name__)

# what has a threshold of its own (the `groups` option), as privtune.modeling groups it
GROUPS = {"adapter": "per_adapter", "projection": "per_projection", "flat": "flat"}
ANCHORS = ("auto_s", "clip")  # per-adapter AUTO-S normalisation, or per-adapter clipping
N_FEATURES = 6  # valid loss, its change, eps spent/target, progress, pace, budget per step left
# (plus the DP norm histogram, adapters x levels, and the last action)


def _sha256(path: str) -> str:  # pragma: no mutate block
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _read_policy(path: str) -> dict[str, Any]:  # pragma: no mutate block
    """A saved policy's state; the errors begin with the option's name (the registry names it)."""
    saved = "a controller.pt of an RLDP run, or models/rldp-public/policy.pt"
    if not Path(path).is_file():
        raise ValueError(f"warm_start '{path}' is not a file ({saved})")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as err:  # pickle, zip or torch errors: all mean "not a saved policy"
        raise ValueError(f"warm_start '{path}' is not {saved} ({type(err).__name__})") from None
    needed = {"policy", "obs_mean", "obs_var", "obs_count"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise ValueError(f"warm_start '{path}' holds no RLDP policy ({saved})")
    return state


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
    """Online SAC over bounded residuals around a calibrated anchor action.

    The anchor is per-adapter AUTO-S at the equal split (or per-adapter clipping) with the
    budget-paced noise; the policy's action u in [-1, 1]^(K+1) multiplies each threshold and
    the noise by a factor within ``clip_bounds`` / ``noise_bounds`` (u = 0 is the anchor).
    """

    name = "rldp"

    grouping = "per_adapter"
    needs_validation: ClassVar[bool] = True

    @classmethod
    def describe_plan(cls, ctx: ControllerContext, **options: Any) -> str:
        """``options``: every typed option, as the registry passes them (their defaults are
        RLDPOptions', not repeated here)."""
        paced = f"the budget-paced noise multiplier ({ctx.calibrated_noise:.3g} at an even pace)"
        if not options["policy"]:
            return f"{paced}, the anchor alone (policy: false)"
        low, high = options["noise_bounds"]
        return (
            f"{low:g}-{high:g} x {paced}, set by its policy every {options['rl_interval']} "
            f"steps; the guard holds epsilon {ctx.target_epsilon:g} ({ctx.accountant})"
        )

    def __init__(
        self,
        ctx: ControllerContext,
        rl_interval: int = 5,
        anchor: str = "auto_s",
        gamma: float = 0.01,
        policy: bool = True,
        warmup_intervals: int = 0,
        explore: float = 1.0,
        explore_decay: float = 32.0,
        fallback_margin: float = 0.0,
        reward_scale: float = 100.0,
        sac_updates: int = 4,
        sac_batch_size: int = 8,
        buffer_size: int = 2000,
        learning_rate: float = 1e-3,
        clip_bounds: tuple[float, float] = (2 / 3, 1.5),
        noise_bounds: tuple[float, float] = (0.9, 1.1),
        clip: float = 1.0,
        groups: str = "adapter",
        norm_levels: tuple[float, ...] = (),
        norm_noise: float = 0.25,
        valid_records: int = 8,
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
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {', '.join(ANCHORS)}, not '{anchor}'")
        if not (gamma > 0 and explore >= 0 and explore_decay > 0 and reward_scale > 0):
            raise ValueError("gamma, explore_decay and reward_scale must be > 0, explore >= 0")
        for low, high in (clip_bounds, noise_bounds):
            if not 0 < low <= 1 <= high:
                raise ValueError("bounds must be 0 < low <= 1 <= high (multiples of the anchor)")
        # The validation loss before each decision, on this many records: the same ones every
        # time, so its change tracks the model. It is RLDP's main per-step cost: 8 records take
        # 0.10 s of CPU on the default model against 1.1 s for a step (16 took 0.25 s, 5 % of
        # a 5-step interval; measured 2026-12-03, benchmarks/results/rldp_vs_dpsgd.json).
        self.validation_records = valid_records
        levels = tuple(float(level) for level in norm_levels)
        if any(not level > 0 for level in levels) or not norm_noise > 0:
            raise ValueError("norm_levels must be > 0 and norm_noise > 0 (or norm_levels: [])")
        if not policy:
            # Nothing acts on the histogram: releasing it would only take gradient noise budget
            # (8.8 % more gradient noise at epsilon 1 on the default model, 283 steps).
            levels = ()
        if levels and not ctx.expected_batch_size:
            raise ValueError("the DP norm histogram needs the expected batch size")
        self.norm_levels = levels
        # sigma_b of each count, as a fraction of the expected batch (0.25: a fraction's noise
        # is 0.25 per step, about 0.1 averaged over a 5-step interval)
        self.count_noise = norm_noise * ctx.expected_batch_size if levels else None
        self.interval = rl_interval
        if groups not in GROUPS:
            raise ValueError(f"groups must be one of {', '.join(GROUPS)}, not '{groups}'")
        # The loop groups the parameters by this (train.py); the names are the same groups'.
        self.grouping = GROUPS[groups]
        self.group_names = tuple(
            dict.fromkeys(group_of(name, self.grouping) for name in ctx.group_names)
        )
        self.n_groups = len(self.group_names)
        # The anchor's thresholds: the equal split C / sqrt(K) of the flat threshold C, so
        # sum_k C_k^2 = C^2 and the anchor has DP-SGD's signal-to-noise (C_k = C each would add
        # sqrt(K) times more noise per adapter).
        self.split = clip / math.sqrt(self.n_groups)
        self.anchor = anchor
        self.gamma = gamma
        self.policy = policy
        self.warmup_intervals = warmup_intervals
        self.explore = explore
        self.explore_decay = explore_decay
        self.fallback_margin = fallback_margin
        self.reward_scale = reward_scale
        self.sac_updates = sac_updates
        self.sac_batch_size = sac_batch_size
        # log factors of the residual at u = -1 and u = +1 (the noise's are of the paced z)
        self.clip_range = (math.log(clip_bounds[0]), math.log(clip_bounds[1]))
        self.noise_range = (math.log(noise_bounds[0]), math.log(noise_bounds[1]))
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
        self._obs_dim = obs_dim
        self.anchor_action = np.zeros(act_dim, np.float32)
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self._skip_transition = False
        self._prev_valid: float | None = None
        self._prev_eps = 0.0
        self._prev_step = 0
        self.decisions = 0
        self.failures = 0  # policy errors (non-finite observation, failed update): anchor
        self.anchor_fallbacks = 0  # the critic did not prefer the policy's action: anchor
        self.policy_actions = 0  # decisions where the policy's residual was applied
        self.critic_updates = 0
        self.last_reward = math.nan
        self.last_advantage = math.nan
        self.last_residual = self.anchor_action
        self.last_features: np.ndarray | None = None
        self.warm_start = warm_start
        self.warm_provenance: dict[str, Any] = {}
        if warm_start:
            self.load_state_dict(_read_policy(warm_start))
            self.warm_provenance["sha256"] = _sha256(warm_start)

    # -- action mapping ------------------------------------------------------------------
    @staticmethod
    def _factor(u: float, log_range: tuple[float, float]) -> float:
        """exp of the residual: u = 0 is the anchor (factor 1), u = -1 / +1 the bounds."""
        low, high = log_range
        return math.exp(float(u) * (high if u > 0 else -low))

    def _decode(self, residual: np.ndarray) -> Action:
        clips = tuple(
            self.split * self._factor(u, self.clip_range) for u in residual[: self.n_groups]
        )
        factor = self._factor(residual[-1], self.noise_range)
        if self._step + self.interval >= self.ctx.total_steps:
            # The last interval asks for the least noise; the guard raises it to what exactly
            # spends the rest, so no budget is left unused.
            factor = math.exp(self.noise_range[0])
        noise = self.budget_noise() * factor
        return Action(
            clip_thresholds=clips,
            noise_multiplier=noise,
            scaling="normalize" if self.anchor == "auto_s" else "clip",
            stability=self.gamma if self.anchor == "auto_s" else 0.0,
            count_noise=self._histogram_noise(noise),
            count_levels=self.norm_levels,
        )

    def _histogram_noise(self, noise: float) -> float | None:
        """sigma_b of the histogram's counts: ``norm_noise`` of the batch, raised where the
        counts would take more than a quarter of the step's privacy at z (the mechanism raises
        it only where they would take it all). Without it SmolLM2's 630 counts (210 adapters x
        3 levels) took 79 % and left the gradient 2.2x the noise."""
        if self.count_noise is None:
            return None
        dims = count_dims(self.n_groups, self.norm_levels)
        return max(self.count_noise, quarter_share_count_std(noise, dims))

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
        return self.budget_noise() * math.exp(self.noise_range[1])

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
        previous = self.anchor_action if self._prev is None else self._prev[1]
        vector = np.concatenate([np.array(features, np.float32), histogram, previous])
        if not np.all(np.isfinite(vector)):
            raise ValueError("observation is not finite")
        return vector

    def _pace(self, obs: Observation) -> float:  # pragma: no mutate block
        steps = max(obs.step - self._prev_step, 1)
        spent = (obs.epsilon_spent - self._prev_eps) / obs.epsilon_target
        return spent / (steps / obs.total_steps)

    def _reward(self, obs: Observation) -> float:  # pragma: no mutate block
        """Utility per privacy share: the validation-loss gain (x reward_scale, so a typical
        interval's gain is of order 1 against SAC's entropy bonus) over the spending pace."""
        gain = 0.0 if self._prev_valid is None else self._prev_valid - obs.valid_loss
        return float(np.clip(self.reward_scale * gain / max(self._pace(obs), 0.05), -10, 10))

    # -- acting and learning ---------------------------------------------------------------
    def act(self, observation: Observation | None) -> Action:
        if observation is None or self._prev is None:
            residual = self.anchor_action
            self._prev = (np.zeros(self._obs_dim, np.float32), residual)
        else:
            self._track(observation)
            try:
                residual = self._learn_and_act(observation)
            except Exception as err:  # a policy failure never stops training or the guarantee
                self.failures += 1
                log.warning("RLDP policy failed (%s); the anchor acts", err)
                residual = self.anchor_action
                self._prev = (self._prev[0], residual)
                self._skip_transition = True  # no reward to pair with the last observation
            self._prev_valid = observation.valid_loss
            self._prev_eps = observation.epsilon_spent
            self._prev_step = observation.step
        self.decisions += 1
        self.last_residual = residual
        return self._decode(residual)

    def _learn_and_act(self, obs: Observation) -> np.ndarray:  # pragma: no mutate block
        raw = self._features(obs)
        self.last_features = raw
        self.obs_rms.update(raw[None])
        x = np.clip((raw - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + 1e-8), -5, 5)
        x = x.astype(np.float32)
        reward = self._reward(obs)
        previous_x, previous_action = self._prev
        # the first transition starts from the placeholder observation
        if self.decisions > 1 and not self._skip_transition:
            self.sac.replay_buffer.add(
                previous_x, x, previous_action, np.array([reward]), np.array([False]), [{}]
            )
        self._skip_transition = False
        self.last_reward = reward
        if self.sac.replay_buffer.size() >= self.sac_batch_size and self.sac_updates:
            self.sac.train(gradient_steps=self.sac_updates, batch_size=self.sac_batch_size)
            self.critic_updates += self.sac_updates
        residual = self._choose(x)
        if not np.all(np.isfinite(residual)):
            raise ValueError("policy produced a non-finite action")
        self._prev = (x, residual)
        return residual

    def exploration(self) -> float:  # pragma: no mutate block
        """Scale of the policy's sampling noise: SAC's own std at first, shrinking as the
        critic learns (1 / sqrt(1 + critic updates / explore_decay))."""
        return self.explore / math.sqrt(1.0 + self.critic_updates / self.explore_decay)

    def _choose(self, x: np.ndarray) -> np.ndarray:  # pragma: no mutate block
        """The policy's residual when the critic values it above the anchor's, else the anchor.

        Before the critic has learned anything (no update yet, no warm start) the anchor acts:
        random warm-up actions cost utility and teach a critic little in a few dozen decisions.
        """
        if not self.policy:
            return self.anchor_action
        if self.decisions <= self.warmup_intervals:
            return self.rng.uniform(-1, 1, self.n_groups + 1).astype(np.float32)
        if self.critic_updates == 0:
            return self.anchor_action
        obs = torch.as_tensor(x[None])
        with torch.no_grad():
            mean, log_std, _ = self.sac.actor.get_action_dist_params(obs)
            noise = torch.as_tensor(self.rng.standard_normal(mean.shape), dtype=mean.dtype)
            action = torch.tanh(mean + self.exploration() * log_std.exp() * noise)
            anchor = torch.as_tensor(self.anchor_action[None])
            q_policy = torch.min(torch.cat(self.sac.critic(obs, action), dim=1)).item()
            q_anchor = torch.min(torch.cat(self.sac.critic(obs, anchor), dim=1)).item()
        self.last_advantage = q_policy - q_anchor
        if not self.last_advantage > self.fallback_margin:
            self.anchor_fallbacks += 1
            return self.anchor_action
        self.policy_actions += 1
        return action.numpy()[0].astype(np.float32)

    def metrics(self) -> dict[str, float]:  # pragma: no mutate block
        """The last decision: reward, the critic's advantage over the anchor, fallbacks, the
        residual applied and a summary of what the policy observed."""
        metrics = {
            "rldp/reward": self.last_reward,
            "rldp/advantage": self.last_advantage,
            "rldp/fallbacks": float(self.failures),
            "rldp/anchor_fallbacks": float(self.anchor_fallbacks),
            "rldp/policy_actions": float(self.policy_actions),
            "rldp/exploration": self.exploration(),
            "rldp/residual_noise": float(self.last_residual[-1]),
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
                for k, name in enumerate(self.group_names):
                    metrics[f"rldp/obs/unclipped_dp/{name}"] = float(histogram[k * levels + at])
        return metrics

    def provenance(self) -> dict[str, str]:  # pragma: no mutate block
        """Where the policy's starting weights came from (MLflow tags): a warm start carries
        the data it was trained on, so the privacy argument can be checked per run."""
        if not self.warm_start:
            return {"rldp.warm_start": "none"}
        tags = {"rldp.warm_start": str(self.warm_start)}
        tags |= {f"rldp.warm_start.{k}": str(v) for k, v in self.warm_provenance.items()}
        return tags

    def state_dict(self) -> dict[str, Any]:  # pragma: no mutate block
        """Policy, critic, entropy coefficient, observation statistics and the replay buffer
        (what a later run needs to start where this one ended), and this run's provenance."""
        buffer = self.sac.replay_buffer
        n = buffer.size()
        return {
            "policy": self.sac.policy.state_dict(),
            "log_ent_coef": self.sac.log_ent_coef.detach().clone(),
            "obs_mean": self.obs_rms.mean,
            "obs_var": self.obs_rms.var,
            "obs_count": self.obs_rms.count,
            "replay": {
                "obs": buffer.observations[:n, 0].copy(),
                "next_obs": buffer.next_observations[:n, 0].copy(),
                "actions": buffer.actions[:n, 0].copy(),
                "rewards": buffer.rewards[:n, 0].copy(),
            },
            "critic_updates": self.critic_updates,
            "decisions": self.decisions,
            "fallbacks": self.failures,
            "anchor_fallbacks": self.anchor_fallbacks,
            "policy_actions": self.policy_actions,
            "provenance": dict(self.warm_provenance),
            "group_names": self.group_names,  # what a warm start must act on (its shape)
            "norm_levels": self.norm_levels,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # pragma: no mutate block
        """Warm start: an earlier run's policy, critic, statistics and transitions."""
        shape = (tuple(state.get("group_names", ())), tuple(state.get("norm_levels", ())))
        if "group_names" not in state:  # saved before the groups were: its sizes must agree
            actions = state["policy"]["actor.mu.weight"].shape[0]
            same = actions == self.n_groups + 1 and np.shape(state["obs_mean"]) == np.shape(
                self.obs_rms.mean
            )
        else:
            same = shape == (self.group_names, self.norm_levels)
        if not same:
            raise ValueError(
                "warm_start holds a policy trained for other groups or norm levels "
                f"({len(shape[0]) or 'unrecorded'} groups, levels {list(shape[1]) or 'unrecorded'}"
                f"; this run: {self.n_groups} groups, levels {list(self.norm_levels)}): train "
                "it with the same model, LoRA targets, groups and norm_levels"
            )
        try:
            self.sac.policy.load_state_dict(state["policy"])
        except RuntimeError as err:  # other layer sizes: a policy of another SAC setup
            first = str(err).strip().splitlines()[0]
            problem = f"warm_start holds a policy of other network sizes ({first})"
            raise ValueError(problem) from None
        if "log_ent_coef" in state:
            with torch.no_grad():
                self.sac.log_ent_coef.copy_(state["log_ent_coef"])
        self.obs_rms.mean = state["obs_mean"]
        self.obs_rms.var = state["obs_var"]
        self.obs_rms.count = state["obs_count"]
        replay = state.get("replay")
        if replay is not None:
            for obs, nxt, action, reward in zip(
                replay["obs"], replay["next_obs"], replay["actions"], replay["rewards"],
                strict=True,
            ):  # fmt: skip
                self.sac.replay_buffer.add(
                    obs, nxt, action, np.array([reward]), np.array([False]), [{}]
                )
        self.critic_updates = int(state.get("critic_updates", 0))
        self.warm_provenance = dict(state.get("provenance") or {})
