"""The one training loop: ledger, guard and accountant agree; runs are reproducible."""

import math
import time

import pytest
import torch

from privtune.config import FinetuneParams, LoraParams
from privtune.control import Action, Controller, register_controller
from privtune.control.registry import CONTROLLERS
from privtune.data.tokenization import encode_records
from privtune.modeling import attach_lora
from privtune.privacy import accountant
from privtune.train import train
from tests.conftest import synthetic_texts

PARAMS = FinetuneParams(
    secret_noise=False,  # these tests compare runs: reproducible seeds
    epsilon=2.0,
    batch_size=16,
    epochs=1.0,
    lr=5e-3,
    log_every=2,
    eval_every=4,
    eval_records=16,
    audit_canaries=0,
    lora=LoraParams(r=4),
)


def _data(tokenizer):
    return (
        encode_records(synthetic_texts(160, seed=1), tokenizer, 64),
        encode_records(synthetic_texts(32, seed=2), tokenizer, 64),
    )


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_dpsgd_ledger_spends_the_target_and_no_more(tiny_model, tiny_tokenizer):
    train_data, valid_data = _data(tiny_tokenizer)
    base_before = {n: p.clone() for n, p in tiny_model.named_parameters()}
    model = attach_lora(tiny_model, PARAMS.lora)
    result = train(
        model, train_data, valid_data, PARAMS, "dpsgd", {"clip": 0.5}, show_progress=False
    )
    plan = result.plan
    assert plan.sample_rate == pytest.approx(16 / 160)
    assert result.steps_taken == plan.steps == 10 == len(result.ledger)
    assert all(
        e.noise_multiplier == pytest.approx(plan.calibrated_noise) for e in result.ledger.entries
    )
    assert all(e.clip_thresholds == (0.5,) for e in result.ledger.entries)
    assert 0.95 * PARAMS.epsilon <= result.epsilon <= PARAMS.epsilon
    assert result.epsilon_rdp > result.epsilon  # RDP is looser, logged beside
    recomputed = accountant.epsilon(result.ledger.segments(), plan.delta, PARAMS.accountant)
    assert recomputed == pytest.approx(result.epsilon)
    # the frozen base model is untouched: only LoRA parameters moved
    for name, param in model.get_base_model().named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(param, base_before[name.replace(".base_layer", "")])
    assert [row["step"] for row in result.history][-1] == plan.steps - 1


def test_runs_are_reproducible_for_a_seed(tiny_model, tiny_tokenizer):
    train_data, valid_data = _data(tiny_tokenizer)
    states = []
    for _ in range(2):
        model = attach_lora(__import__("copy").deepcopy(tiny_model), PARAMS.lora)
        train(model, train_data, valid_data, PARAMS, "dpsgd", {}, show_progress=False)
        states.append(_lora_state(model))
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name])


def test_nonprivate_learns_and_has_no_ledger(tiny_model, tiny_tokenizer):
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    params = PARAMS.model_copy(update={"epochs": 3.0})
    started = time.perf_counter()
    result = train(model, train_data, valid_data, params, "nonprivate", show_progress=False)
    elapsed = time.perf_counter() - started
    assert result.ledger is None and result.epsilon is None
    # the step loop is timed on its own: inside the call, without the final validation
    assert 0 < result.loop_seconds < elapsed and result.loop_cpu_seconds > 0
    assert 0 <= result.decision_cpu_seconds < result.loop_cpu_seconds
    first, last = result.history[0]["valid_loss"], result.history[-1]["valid_loss"]
    assert last < first


@pytest.fixture
def greedy_controller():
    @register_controller("test-greedy", force=True)
    class Greedy(Controller):
        """Asks for almost no noise every 3 steps: the guard must refuse to overspend."""

        def __init__(self, ctx):
            super().__init__(ctx)
            self.interval = 3

        def reserve_noise(self) -> float:
            return self.ctx.calibrated_noise * 1.5

        def act(self, observation):
            return Action(clip_thresholds=(1.0,), noise_multiplier=1e-3)

    yield
    CONTROLLERS.pop("test-greedy")


def test_guard_holds_against_a_greedy_controller(tiny_model, tiny_tokenizer, greedy_controller):
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    result = train(model, train_data, valid_data, PARAMS, "test-greedy", show_progress=False)
    assert result.epsilon <= PARAMS.epsilon
    assert min(e.noise_multiplier for e in result.ledger.entries) > 1e-3


@pytest.fixture
def watching_controllers():
    """A private and a non-private controller that keep every observation they are given."""
    from privtune.privacy.mechanisms.none import NoNoise

    seen: dict[str, list] = {"test-watch-dp": [], "test-watch-open": []}

    class Watch(Controller):
        def __init__(self, ctx):
            super().__init__(ctx)
            self.interval = 2

        def act(self, observation):
            if observation is not None:
                seen[self.name].append(observation)
            return Action(clip_thresholds=(1.0,), noise_multiplier=self.ctx.calibrated_noise)

    register_controller("test-watch-dp", force=True)(type("WatchDP", (Watch,), {}))
    register_controller("test-watch-open", force=True)(
        type("WatchOpen", (Watch,), {"mechanism": NoNoise})
    )
    yield seen
    for name in seen:
        CONTROLLERS.pop(name)


def test_a_private_controller_sees_nothing_computed_from_records_without_noise(
    tiny_model, tiny_tokenizer, watching_controllers
):
    """The training loss, clipped fraction and norm statistics are the records' own, without
    noise: an action that depended on them would leak outside epsilon, so the loop gives a
    private method's controller None there (the validation loss, epsilon and DP releases
    stay); a non-private one sees them."""
    import copy

    from privtune.control.base import RAW_FIELDS

    train_data, valid_data = _data(tiny_tokenizer)
    for name in watching_controllers:
        model = attach_lora(copy.deepcopy(tiny_model), PARAMS.lora)
        train(model, train_data, valid_data, PARAMS, name, show_progress=False)
    private, public = watching_controllers["test-watch-dp"], watching_controllers["test-watch-open"]
    assert len(private) == len(public) == 4  # decisions at steps 2, 4, 6, 8 (step 0: None)
    for obs in private:
        assert all(getattr(obs, f) is None for f in RAW_FIELDS)
        assert obs.epsilon_spent > 0 and obs.valid_loss is not None and obs.step > 0
    for obs in public:
        assert all(getattr(obs, f) is not None for f in RAW_FIELDS)
        assert math.isfinite(obs.train_loss) and len(obs.norm_quantiles) == 1


@pytest.fixture
def per_adapter_controller():
    @register_controller("test-per-adapter", force=True)
    class PerAdapter(Controller):
        """Different threshold and noise std per adapter (the RLDP action shape)."""

        grouping = "per_adapter"

        def act(self, observation):
            k = len(self.ctx.group_names)
            clips = tuple(0.2 * (i + 1) for i in range(k))
            stds = tuple(
                2.0 * self.ctx.calibrated_noise * c * (1 + i % 2) for i, c in enumerate(clips)
            )
            return Action(clip_thresholds=clips, noise_multiplier=0.0, noise_stds=stds)

    yield
    CONTROLLERS.pop("test-per-adapter")


def test_heteroscedastic_noise_enters_the_ledger_as_effective_z(
    tiny_model, tiny_tokenizer, per_adapter_controller
):
    from privtune.privacy.mechanisms import effective_noise_multiplier

    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    result = train(model, train_data, valid_data, PARAMS, "test-per-adapter", show_progress=False)
    entry = result.ledger.entries[0]
    # one per LoRA adapter of the 1-block model: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    assert len(entry.clip_thresholds) == len(result.controller.ctx.group_names) == 4
    z = effective_noise_multiplier(entry.clip_thresholds, entry.noise_stds)
    assert entry.noise_multiplier == pytest.approx(z)
    assert z >= result.plan.calibrated_noise  # the guard only admits enough noise
    assert result.epsilon <= PARAMS.epsilon
    assert {f"clip/{name}" for name in result.controller.ctx.group_names} <= set(result.history[0])


def test_micro_batches_give_the_same_ledger_and_update(tiny_model, tiny_tokenizer):
    """physical_batch_size splits each Poisson batch; the noise is added once per logical
    batch, so the ledger is identical and the adapter equal up to float summation order."""
    import copy

    train_data, valid_data = _data(tiny_tokenizer)
    runs = []
    for physical in (None, 3):
        model = attach_lora(copy.deepcopy(tiny_model), PARAMS.lora)
        params = PARAMS.model_copy(update={"physical_batch_size": physical, "audit_canaries": 32})
        result = train(model, train_data, valid_data, params, "dpsgd", {}, show_progress=False)
        runs.append((result, _lora_state(model)))
    (whole, whole_state), (micro, micro_state) = runs
    assert micro.ledger.state_dict() == whole.ledger.state_dict()
    assert micro.epsilon == whole.epsilon
    for name in whole_state:
        torch.testing.assert_close(micro_state[name], whole_state[name], rtol=1e-4, atol=1e-5)
    # the audit's canaries ride with the last micro-batch: clipped and released alike
    torch.testing.assert_close(
        torch.as_tensor(micro.audit.scores),
        torch.as_tensor(whole.audit.scores),
        rtol=1e-4,
        atol=1e-5,
    )


def test_bf16_autocast_trains_the_adapter_and_leaves_the_ledger_alone(tiny_model, tiny_tokenizer):
    """bf16 autocast (CUDA's default, forced here on the CPU): the adapter moves, the frozen
    base does not, and the ledger is the fp32 run's (norms, clipping and noise stay float32)."""
    import copy

    train_data, valid_data = _data(tiny_tokenizer)
    ledgers = []
    for precision in ("fp32", "bf16"):
        model = attach_lora(copy.deepcopy(tiny_model), PARAMS.lora)
        start = _lora_state(model)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        params = PARAMS.model_copy(update={"precision": precision})
        result = train(model, train_data, valid_data, params, "dpsgd", {}, show_progress=False)
        ledgers.append(result.ledger.state_dict())
        moved = [not torch.equal(p, start[n]) for n, p in _lora_state(model).items()]
        assert all(moved), "every LoRA parameter must move"
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, frozen[n]), n
        assert math.isfinite(result.valid_loss)
    assert ledgers[0] == ledgers[1]


def test_a_guard_that_admits_no_first_step_fails_the_run_instead_of_a_model_of_none(
    tiny_model, tiny_tokenizer
):
    """The plan refuses an epsilon whose noise the guard would not admit (test_bad_inputs);
    if the two ever disagree, the run fails (exit 3) rather than save and register an
    adapter trained for no step as if the guard had stopped it late."""
    from privtune.errors import BudgetExhausted
    from privtune.privacy.plan import TrainingPlan

    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    plan = TrainingPlan(len(train_data), 16 / len(train_data), 10, 1e-3, calibrated_noise=2e3)
    tiny = PARAMS.model_copy(update={"epsilon": 1e-3, "accountant": "rdp"})
    with pytest.raises(BudgetExhausted, match="cannot keep the run within"):
        train(model, train_data, valid_data, tiny, "dpsgd", {}, plan=plan, show_progress=False)
