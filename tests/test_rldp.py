"""RLDP: the SAC hyper-policy acts within its bounds, learns online, never breaks the budget,
falls back safely on failure, warm-starts, and never reads the protected records' statistics."""

import dataclasses
import hashlib
import math

import numpy as np
import pytest
import torch

from privtune.control import Action, ControllerContext, Observation, build_controller
from privtune.modeling import attach_lora
from privtune.privacy.mechanisms import effective_noise_multiplier
from privtune.train import train
from tests.test_train import PARAMS, _data

CTX = ControllerContext(
    group_names=("a", "b", "c"),
    sample_rate=0.1,
    total_steps=40,
    target_epsilon=2.0,
    delta=1e-5,
    calibrated_noise=1.0,
    seed=0,
    expected_batch_size=10.0,
)
OPTIONS = {"rl_interval": 2, "warmup_intervals": 1, "sac_batch_size": 2, "sac_updates": 2}
HISTOGRAM = {**OPTIONS, "norm_levels": [0.5, 1.0, 2.0]}  # the policy also sees gradient norms


def _obs(step, valid=5.0, eps=0.5, **changes):
    base = Observation(
        step=step,
        total_steps=40,
        train_loss=5.0,
        loss_trend=-0.1,
        valid_loss=valid,
        epsilon_spent=eps,
        epsilon_target=2.0,
        clipped_fraction=0.5,
        norm_quantiles=((0.1, 0.2, 0.3, 0.4, 0.5),) * 3,
        norm_mean=(0.3,) * 3,
        norm_std=(0.1,) * 3,
        action=Action((1.0, 1.0, 1.0), 1.0),
        norm_histogram_dp=((0.2, 0.5, 0.9),) * 3,
    )
    return dataclasses.replace(base, **changes)


def _drive(controller, steps=8):
    actions = [controller.act(None)]
    for i in range(1, steps):
        actions.append(controller.act(_obs(2 * i, valid=5.0 - 0.1 * i, eps=0.2 * i)))
    return actions


SPLIT = 1 / math.sqrt(3)  # the flat threshold 1.0 split equally over three adapters


def _assert_within_residual_bounds(action, paced=1.0):
    assert len(action.clip_thresholds) == 3
    low, high = 2 / 3 * SPLIT, 1.5 * SPLIT
    assert all(low - 1e-9 <= c <= high + 1e-9 for c in action.clip_thresholds)
    assert 0.9 * paced - 1e-9 <= action.noise_multiplier <= 1.1 * paced + 1e-9


def test_the_first_action_is_the_anchor_per_adapter_auto_s():
    controller = build_controller("rldp", CTX, OPTIONS)
    action = controller.act(None)
    assert action.clip_thresholds == pytest.approx((SPLIT,) * 3, rel=1e-6)
    assert action.noise_multiplier == pytest.approx(1.0, rel=1e-6)  # the calibrated z
    assert (action.scaling, action.stability) == ("normalize", 0.01)
    clipped = build_controller("rldp", CTX, {**OPTIONS, "anchor": "clip"}).act(None)
    assert (clipped.scaling, clipped.clip_thresholds) == ("clip", action.clip_thresholds)


def test_random_residuals_stay_within_their_bounds():
    """Even uniformly random residuals (warm-up) move each threshold and the noise only within
    the bounds around the anchor."""
    controller = build_controller("rldp", CTX, {**OPTIONS, "warmup_intervals": 50})
    actions = _drive(controller, 12)
    for action in actions:
        _assert_within_residual_bounds(action)
    assert len({a.clip_thresholds for a in actions}) > 5  # they did move
    assert min(min(a.clip_thresholds) for a in actions) < 0.8 * SPLIT
    assert max(a.noise_multiplier for a in actions) > 1.03
    assert controller.reserve_noise() == pytest.approx(1.1)  # the upper bound, for the guard


@pytest.mark.parametrize("levels", [(), (0.5, 1.0, 2.0)], ids=["default", "histogram"])
def test_the_anchor_acts_until_the_critic_has_learned_then_the_policy_learns(levels):
    """No random warm-up: before its first update the critic knows nothing, so the anchor
    acts; afterwards the policy's residuals (within bounds) appear and SAC keeps learning.
    By default it does so without the DP norm histogram (nothing released, nothing paid)."""
    extra = {"norm_levels": list(levels)} if levels else {}
    controller = build_controller("rldp", CTX, {**OPTIONS, "warmup_intervals": 0, **extra})
    actions = _drive(controller, 12)
    anchor = actions[0]
    assert controller.sac.replay_buffer.size() == 10
    assert controller.sac._n_updates > 0 and controller.critic_updates > 0
    # decisions 1 and 2 come before the buffer holds a batch: the anchor's
    for action in actions[:3]:
        _assert_same_action(action, anchor)
    for action in actions:
        _assert_within_residual_bounds(action)
    assert controller.policy_actions + controller.anchor_fallbacks == 12 - 3
    assert controller.policy_actions > 0
    assert math.isfinite(controller.metrics()["rldp/reward"])
    assert math.isfinite(controller.metrics()["rldp/advantage"])
    assert all(a.count_levels == levels for a in actions)
    if not levels:
        assert all(a.count_noise is None for a in actions)
        assert not any(key.startswith("rldp/obs/unclipped_dp") for key in controller.metrics())
        return
    # with levels every action asks the mechanism for the DP norm histogram, at sigma_b = B / 4
    # or, where that would take more than a quarter of the step's privacy, z sqrt(D)
    assert all(a.count_noise == pytest.approx(max(2.5, 3 * a.noise_multiplier)) for a in actions)
    assert controller.metrics()["rldp/obs/unclipped_dp/a"] == pytest.approx(0.5)


def _critic_preferring(prefer_anchor: bool):
    """A stand-in critic: high value at the anchor (u = 0) or away from it."""

    def critic(obs, action):
        distance = action.abs().sum(dim=1, keepdim=True)
        value = -distance if prefer_anchor else distance
        return value, value

    return critic


@pytest.mark.parametrize("prefer_anchor", [True, False])
def test_the_anchor_acts_when_the_critic_does_not_value_the_policy_above_it(
    monkeypatch, prefer_anchor
):
    controller = build_controller("rldp", CTX, OPTIONS)
    _drive(controller, 6)  # the critic has learned: the policy may act
    assert controller.critic_updates > 0
    monkeypatch.setattr(controller.sac, "critic", _critic_preferring(prefer_anchor))
    before = (controller.policy_actions, controller.anchor_fallbacks)
    states = np.random.default_rng(0).normal(size=(4, controller._obs_dim)).astype(np.float32)
    residuals = [controller._choose(x) for x in states]
    if prefer_anchor:
        assert all(not r.any() for r in residuals)
        assert controller.anchor_fallbacks == before[1] + 4
        assert controller.metrics()["rldp/advantage"] < 0
    else:
        assert all(r.any() for r in residuals)
        assert controller.policy_actions == before[0] + 4
        assert controller.metrics()["rldp/advantage"] > 0
    assert all(np.all(np.abs(r) <= 1) for r in residuals)


def test_exploration_shrinks_as_the_critic_learns():
    controller = build_controller("rldp", CTX, OPTIONS)
    assert controller.exploration() == pytest.approx(1.0)
    _drive(controller, 12)
    assert controller.critic_updates == 2 * (12 - 3)  # sac_updates per decision with a batch
    assert controller.exploration() == pytest.approx(1 / math.sqrt(1 + 18 / 32))
    quiet = build_controller("rldp", CTX, {**OPTIONS, "explore": 0.0})
    quiet.critic_updates, quiet.decisions = 1, 5  # past warm-up, the critic has learned
    x = np.zeros(quiet._obs_dim, np.float32)
    quiet.sac.critic = _critic_preferring(prefer_anchor=False)
    # without exploration the residual is the actor's mean, the same every time
    np.testing.assert_array_equal(quiet._choose(x), quiet._choose(x))


def test_without_the_policy_the_anchor_always_acts():
    """policy: false is the ablation's 'anchor alone': the same action at every decision,
    and no DP norm histogram (nothing would read it; it would take gradient noise budget)."""
    controller = build_controller("rldp", CTX, {**OPTIONS, "policy": False})
    actions = _drive(controller, 12)
    for action in actions[1:]:
        _assert_same_action(action, actions[0])
    assert all(a.count_noise is None and not a.count_levels for a in actions)
    with_policy = build_controller("rldp", CTX, HISTOGRAM).act(None)
    assert with_policy.count_noise is not None and with_policy.count_levels
    assert controller.sac._n_updates > 0  # it still learns (a warm start needs equal norm_levels)
    assert controller.policy_actions == 0


@pytest.mark.parametrize("groups, batch", [(210, 32.0), (3, 10.0), (4, 1000.0)])
def test_the_histogram_never_takes_more_than_a_quarter_of_a_steps_privacy(groups, batch):
    """sigma_b = B / 4 unless the D counts' share of 1/z^2, D z^2 / (2 sigma_b)^2, would pass a
    quarter: then sigma_b = z sqrt(D), so the gradient keeps z / sqrt(3/4) at most (SmolLM2's
    210 adapters x 3 levels at B = 32 had taken 79 % of it, and 2.2x the gradient noise)."""
    from dataclasses import replace

    from privtune.privacy.mechanisms.gaussian import gradient_noise_multiplier

    ctx = replace(
        CTX,
        group_names=tuple(f"g{k}" for k in range(groups)),
        expected_batch_size=batch,
        calibrated_noise=0.568,
    )
    controller = build_controller("rldp", ctx, HISTOGRAM)
    dims = groups * 3
    for action in _drive(controller, 6):
        z, sigma = action.noise_multiplier, action.count_noise
        share = dims * z**2 / (2 * sigma) ** 2
        assert share <= 0.25 * (1 + 1e-12)
        assert gradient_noise_multiplier(z, sigma, dims) <= z / math.sqrt(0.75) * (1 + 1e-9)
        if batch / 4 >= z * math.sqrt(dims):  # B / 4 is quiet enough: kept as asked
            assert sigma == batch / 4
        else:
            assert sigma == pytest.approx(z * math.sqrt(dims), rel=1e-12)


def test_features_ignore_private_training_statistics():
    """Gradient norms and training loss of the protected records never reach the policy."""
    controller = build_controller("rldp", CTX, OPTIONS)
    _drive(controller, 4)
    plain = controller._features(_obs(10))
    private_changed = _obs(
        10,
        train_loss=99.0,
        loss_trend=7.0,
        clipped_fraction=0.0,
        norm_quantiles=((9.0,) * 5,) * 3,
        norm_mean=(9.0,) * 3,
        norm_std=(4.0,) * 3,
    )
    np.testing.assert_array_equal(controller._features(private_changed), plain)


def test_features_read_the_dp_norm_histogram_and_need_it():
    controller = build_controller("rldp", CTX, HISTOGRAM)
    _drive(controller, 4)
    plain = controller._features(_obs(10))
    shifted = controller._features(_obs(10, norm_histogram_dp=((0.0, 0.1, 0.4),) * 3))
    assert not np.array_equal(plain, shifted)
    noisy = controller._features(_obs(10, norm_histogram_dp=((-0.3, 0.5, 1.4),) * 3))
    assert noisy[6:15].min() >= 0.0 and noisy[6:15].max() <= 1.0  # noisy fractions: clipped
    with pytest.raises(ValueError, match="histogram"):
        controller._features(_obs(10, norm_histogram_dp=None))
    blind = build_controller("rldp", CTX, OPTIONS)  # the default: no histogram
    assert blind.act(None).count_noise is None  # no release, no cost
    assert len(blind._features(_obs(10, norm_histogram_dp=None))) == len(plain) - 9


def test_nan_observation_and_failed_update_fall_back_to_the_anchor(monkeypatch):
    controller = build_controller("rldp", CTX, {**OPTIONS, "warmup_intervals": 50})
    actions = _drive(controller, 4)  # random residuals, none of them the anchor
    assert actions[-1].clip_thresholds != actions[0].clip_thresholds
    action = controller.act(_obs(20, valid=float("nan")))
    assert controller.failures == 1
    _assert_same_action(action, actions[0])

    def broken(*args, **kwargs):
        raise RuntimeError("SAC update failed")

    monkeypatch.setattr(controller.sac, "train", broken)
    action = controller.act(_obs(22))
    assert controller.failures == 2 and controller.metrics()["rldp/fallbacks"] == 2
    _assert_same_action(action, actions[0])


def _assert_same_action(action, expected):
    """The same action; its z is relative to the budget-paced noise, recomputed (floats)."""
    assert action.clip_thresholds == pytest.approx(expected.clip_thresholds, rel=1e-12)
    assert action.noise_multiplier == pytest.approx(expected.noise_multiplier, rel=1e-9)


def test_warm_start_restores_policy_critic_and_transitions_and_records_provenance(tmp_path):
    first = build_controller("rldp", CTX, OPTIONS)
    _drive(first, 8)
    first.warm_provenance = {"data": "public", "episodes": 1}
    path = tmp_path / "policy.pt"
    torch.save(first.state_dict(), path)
    options = {**OPTIONS, "warmup_intervals": 0, "warm_start": str(path)}
    second = build_controller("rldp", CTX, options)
    x = np.zeros(first.sac.observation_space.shape, np.float32)
    a1, _ = first.sac.predict(x, deterministic=True)
    a2, _ = second.sac.predict(x, deterministic=True)
    np.testing.assert_allclose(a1, a2)
    u = torch.zeros(1, 4)
    q1 = first.sac.critic(torch.as_tensor(x[None]), u)[0].item()
    assert second.sac.critic(torch.as_tensor(x[None]), u)[0].item() == pytest.approx(q1)
    np.testing.assert_allclose(second.obs_rms.mean, first.obs_rms.mean)
    assert second.sac.replay_buffer.size() == first.sac.replay_buffer.size() == 6
    np.testing.assert_array_equal(
        second.sac.replay_buffer.actions[:6], first.sac.replay_buffer.actions[:6]
    )
    # a warm-started critic lets the policy act from the first decision, exploring less
    assert second.critic_updates == first.critic_updates > 0
    assert second.exploration() < 1.0
    second.act(None)
    second.act(_obs(2, valid=4.9, eps=0.2))
    assert second.policy_actions + second.anchor_fallbacks == 1
    tags = second.provenance()
    assert tags["rldp.warm_start"] == str(path)
    assert tags["rldp.warm_start.data"] == "public"
    assert tags["rldp.warm_start.sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first.provenance() == {"rldp.warm_start": "none"}
    # the provenance travels on with the policy when it is saved again
    assert second.state_dict()["provenance"]["data"] == "public"


def test_budget_noise_paces_what_is_left_in_the_clts_step_costs():
    """Untouched, the paced z is the calibrated one; after greedy (low-noise) intervals it
    rises, after noisy ones it falls; a step at z costs e^{1/z^2} - 1 (mu-GDP's CLT), so a
    greedy step is charged far more than (z_cal / z)^2."""
    ctx = dataclasses.replace(CTX, calibrated_noise=1.0)
    fresh = build_controller("rldp", ctx, OPTIONS)
    assert fresh.budget_noise() == pytest.approx(1.0)
    after = {}
    for z in (0.8, 1.0, 2.0):
        controller = build_controller("rldp", ctx, OPTIONS)
        controller._track(_obs(10, action=Action((1.0,) * 3, z)))
        after[z] = controller.budget_noise()
    assert after[0.8] > after[1.0] > after[2.0]
    assert after[1.0] == pytest.approx(1.0)
    used = 10 * math.expm1(1 / 0.8**2) / math.expm1(1.0)  # ten steps at z = 0.8
    assert used > 10 * (1 / 0.8) ** 2
    assert 1 / after[0.8] ** 2 == pytest.approx(
        math.log1p(math.expm1(1.0) * (1 - used / 40) / (30 / 40))
    )


def test_rldp_in_the_training_loop_stays_within_budget(tiny_model, tiny_tokenizer, monkeypatch):
    import privtune.train as loop

    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    evaluated = []
    measure = loop.mean_token_loss
    monkeypatch.setattr(
        loop, "mean_token_loss", lambda m, data: evaluated.append(len(data)) or measure(m, data)
    )
    logged = []
    result = train(
        model,
        train_data,
        valid_data,
        PARAMS,
        "rldp",
        dict(HISTOGRAM, valid_records=3),
        on_log=lambda metrics, step: logged.append(metrics),
        show_progress=False,
    )
    assert result.steps_taken == result.plan.steps
    decisions = math.ceil(result.plan.steps / OPTIONS["rl_interval"]) - 1  # the first has none
    assert evaluated.count(3) == decisions  # decisions validate on valid_records records
    # paced by the budget, and the last interval spends what is left: nothing is wasted
    assert 0.97 * PARAMS.epsilon <= result.epsilon <= PARAMS.epsilon
    assert len({e.noise_multiplier for e in result.ledger.entries}) > 1  # a real schedule
    assert all(len(e.clip_thresholds) == 4 for e in result.ledger.entries)
    assert any("rldp/reward" in m for m in logged)
    # the norm histogram (4 adapters x 3 levels) is released every step and charged: the
    # ledger's z is that of gradient and counts together, as the noise drawn says
    expected = result.plan.sample_rate * result.plan.n_records
    for e in result.ledger.entries:
        assert e.count_dims == 12 and e.count_noise_std == pytest.approx(expected / 4)
        drawn = effective_noise_multiplier(
            e.clip_thresholds, e.noise_stds, e.count_noise_std, e.count_dims
        )
        assert drawn >= e.noise_multiplier * (1 - 1e-12)
    assert any(k.startswith("rldp/obs/unclipped_dp/") for m in logged for k in m)
    histogram = result.controller.last_features[6:18]
    assert 0 < histogram.mean() < 1


@pytest.mark.parametrize("groups", ["projection", "flat"])
def test_rldp_with_fewer_threshold_groups_in_the_loop(tiny_model, tiny_tokenizer, groups):
    """`groups: projection` (or `flat`) gives RLDP one threshold per projection across layers
    (or one in all): a smaller action, the equal split over fewer groups, the same budget."""
    from privtune.modeling import adapter_groups

    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    names = adapter_groups(model, {"projection": "per_projection", "flat": "flat"}[groups])[0]
    adapters = adapter_groups(model, "per_adapter")[0]  # one layer: h.0.attn.c_attn, ...
    # GPT-2's attention and MLP output projections (both `c_proj`) stay two groups
    expected = [a.removeprefix("h.0.") for a in adapters] if groups == "projection" else ["all"]
    assert names == expected and "attn.c_proj" in adapters[1]
    result = train(model, train_data, valid_data, PARAMS, "rldp",
                   dict(OPTIONS, valid_records=3, groups=groups), show_progress=False)  # fmt: skip
    assert result.controller.group_names == tuple(names)
    assert result.controller.sac.action_space.shape == (len(names) + 1,)
    assert all(len(e.clip_thresholds) == len(names) for e in result.ledger.entries)
    first = result.ledger.entries[0]  # the anchor: C / sqrt(K) for the K groups
    assert first.clip_thresholds == pytest.approx((1 / math.sqrt(len(names)),) * len(names))
    assert 0.97 * PARAMS.epsilon <= result.epsilon <= PARAMS.epsilon


MISMATCHED = r"methods\.rldp\.warm_start: warm_start holds a policy trained for other groups"


def test_rldp_groups_and_a_mismatched_warm_start_are_refused_by_name(tmp_path):
    from privtune.errors import ConfigError

    with pytest.raises(ConfigError, match="methods.rldp"):
        build_controller("rldp", CTX, {**OPTIONS, "groups": "layer"})
    three = build_controller("rldp", CTX, OPTIONS)  # three adapters
    path = tmp_path / "policy.pt"
    torch.save(three.state_dict(), path)
    warm = {**OPTIONS, "warm_start": str(path)}
    assert build_controller("rldp", CTX, warm).group_names == ("a", "b", "c")  # the same shape
    one = dataclasses.replace(CTX, group_names=("a",))
    others = dataclasses.replace(CTX, group_names=("x", "y", "z"))  # as many, other adapters
    for ctx, options in [(one, warm), (others, warm), (CTX, {**warm, "norm_levels": [1.0]})]:
        with pytest.raises(ConfigError, match=MISMATCHED):
            build_controller("rldp", ctx, options)
    # a policy saved before the groups were recorded: its action and observation sizes decide
    legacy = {
        k: v for k, v in three.state_dict().items() if k not in ("group_names", "norm_levels")
    }
    torch.save(legacy, path)
    assert build_controller("rldp", others, warm).n_groups == 3
    for ctx, options in [(one, warm), (CTX, {**warm, "norm_levels": [1.0]})]:
        with pytest.raises(ConfigError, match=MISMATCHED):
            build_controller("rldp", ctx, options)


def test_a_warm_start_that_is_no_saved_policy_is_a_config_error_naming_it(tmp_path):
    """A missing or foreign file is the user's option gone wrong: exit 2 naming it, not a
    traceback (torch.load's own FileNotFoundError or unpickling error)."""
    from privtune.errors import ConfigError

    other_sizes = build_controller("rldp", CTX, OPTIONS).state_dict()
    other_sizes["policy"] = {k: v[..., :1] for k, v in other_sizes["policy"].items()}
    torch.save(other_sizes, tmp_path / "sizes.pt")
    for path, problem in [
        (tmp_path / "absent.pt", "is not a file"),
        (tmp_path / "notes.txt", r"is not a controller\.pt .* \(UnpicklingError\)"),
        (tmp_path / "other.pt", "holds no RLDP policy"),
        (tmp_path / "sizes.pt", "holds a policy of other network sizes"),
    ]:
        if path.name == "notes.txt":
            path.write_text("not a pickle")
        if path.name == "other.pt":
            torch.save({"weights": torch.zeros(2)}, path)
        with pytest.raises(ConfigError, match=rf"methods\.mine\.warm_start: .*{problem}"):
            build_controller("rldp", CTX, {**OPTIONS, "warm_start": str(path)}, "mine")


def test_a_greedy_policy_cannot_overspend(tiny_model, tiny_tokenizer, monkeypatch):
    """A policy that always asks for the largest thresholds and the least noise its bounds
    allow still ends at or under the target: the guard admits every interval."""
    from privtune.control.rldp import RLDP

    def greedy(self, x):
        return np.array([1.0] * self.n_groups + [-1.0], np.float32)

    monkeypatch.setattr(RLDP, "_choose", greedy)
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    result = train(
        model, train_data, valid_data, PARAMS, "rldp", dict(OPTIONS, valid_records=2),
        show_progress=False,
    )  # fmt: skip
    assert result.steps_taken == result.plan.steps
    assert result.epsilon <= PARAMS.epsilon
    split = 1 / math.sqrt(4)
    assert all(
        e.clip_thresholds == pytest.approx((1.5 * split,) * 4) for e in result.ledger.entries[2:]
    )
