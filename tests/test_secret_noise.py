"""The sampler's and the noise's seeds are secret by default (finetune.secret_noise).

DP holds only against someone who cannot predict the noise or the batches: the params, MLflow
and the model card publish finetune.seed, so a run seeded from it can be replayed and its noise
subtracted. These tests show the default draws fresh seeds from the OS, that a resumed run
continues its checkpoint's secret streams (no new draw, nothing spent twice), that the
checkpoint holding them is owner-only, and what `secret_noise: false` still reproduces.
"""

from __future__ import annotations

import copy
import shutil
import stat

import pytest
import torch

from privtune.callbacks import save_checkpoint
from privtune.modeling import attach_lora
from privtune.train import Checkpointing, Trainer, train
from tests.test_resume import Crash
from tests.test_train import PARAMS, _data, _lora_state

SECRET = PARAMS.model_copy(update={"secret_noise": True})


def _generators(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    return trainer.sampler_generator.get_state(), trainer.engine.mechanism.generator.get_state()


def _seeded(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def _trainer(model, tokenizer, params) -> Trainer:
    train_data, valid_data = _data(tokenizer)
    return Trainer(copy.deepcopy(model), train_data, valid_data, params, "dpsgd")


def test_the_default_draws_new_secret_seeds_for_every_run(tiny_model, tiny_tokenizer):
    assert type(PARAMS)().secret_noise  # the default, as params.yaml ships it
    model = attach_lora(tiny_model, SECRET.lora)
    first, second = (_generators(_trainer(model, tiny_tokenizer, SECRET)) for _ in range(2))
    published = (_seeded(SECRET.seed), _seeded(SECRET.seed + 1))
    for mine, theirs, public in zip(first, second, published, strict=True):
        assert not torch.equal(mine, theirs)  # a new draw for each run
        assert not torch.equal(mine, public)  # and not the published seed's stream


def test_reproducible_noise_is_seeded_from_finetune_seed(tiny_model, tiny_tokenizer):
    params = PARAMS.model_copy(update={"secret_noise": False, "seed": 7})
    model = attach_lora(tiny_model, params.lora)
    sampler, noise = _generators(_trainer(model, tiny_tokenizer, params))
    assert torch.equal(sampler, _seeded(7)) and torch.equal(noise, _seeded(8))


def test_two_runs_with_secret_seeds_release_different_adapters(tiny_model, tiny_tokenizer):
    train_data, valid_data = _data(tiny_tokenizer)
    start = attach_lora(tiny_model, SECRET.lora)
    states = []
    for _ in range(2):
        model = copy.deepcopy(start)
        train(model, train_data, valid_data, SECRET, "dpsgd", {}, show_progress=False)
        states.append(_lora_state(model))
    assert any(not torch.equal(states[0][n], states[1][n]) for n in states[0])


def test_a_resumed_run_continues_its_checkpoints_secret_streams(
    tiny_model, tiny_tokenizer, tmp_path
):
    """Two resumptions of one checkpoint end alike: the secret generator states come from the
    checkpoint (a fresh draw would make them differ), with the ledger continued, not redone."""
    train_data, valid_data = _data(tiny_tokenizer)
    start = attach_lora(tiny_model, SECRET.lora)
    checkpoint = Checkpointing(tmp_path / "run.pt", every=3, key="same-inputs")

    def run(callbacks=(), at=checkpoint):
        model = copy.deepcopy(start)  # a new process: nothing survives but the checkpoint
        result = train(
            model,
            train_data,
            valid_data,
            SECRET,
            "dpsgd",
            {},
            callbacks=list(callbacks),
            checkpoint=at,
            show_progress=False,
        )
        return result, _lora_state(model)

    with pytest.raises(KeyboardInterrupt):
        run([Crash(at=5)])  # checkpoint at step 3, dies during step 5
    copied = Checkpointing(tmp_path / "copy.pt", every=3, key="same-inputs")
    shutil.copy(checkpoint.path, copied.path)
    first, first_state = run()
    second, second_state = run(at=copied)
    assert first.resumed_at == second.resumed_at == 3
    assert first.ledger.state_dict() == second.ledger.state_dict()
    assert len(first.ledger) == first.plan.steps  # every step recorded once
    for name, value in first_state.items():
        assert torch.equal(second_state[name], value), name


def test_the_checkpoint_holding_the_secret_is_owner_only(tmp_path):
    path = tmp_path / "checkpoints" / "run.pt"
    save_checkpoint(path, {"key": "k"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["run.pt"]  # no temporary file left


def test_a_secret_state_is_random_in_every_word_not_a_32_bit_seed():
    """manual_seed keeps 32 bits of a seed; a secret state draws all 624 words, so neither its
    recorded seed nor any seed of the published kind reproduces its stream."""
    from privtune.privacy.seeds import MT_WORDS, secret_state, seeded_state

    # why a seed is not enough: manual_seed keeps 32 bits, so 2**32 + 5 and 5 are one stream
    wide, narrow = (torch.Generator().manual_seed(s) for s in (2**32 + 5, 5))
    assert torch.equal(torch.randn(8, generator=wide), torch.randn(8, generator=narrow))
    seeded = seeded_state(5).numpy()
    # the layout seeds.py writes into: the first two Mersenne Twister words of seed 5
    assert seeded[24:40].view("<u8").tolist() == [5, (1812433253 * 5 + 1) % 2**32]
    generator, again = torch.Generator(), torch.Generator()
    state = secret_state()
    generator.set_state(state)
    again.manual_seed(generator.initial_seed())
    draws = torch.randn(10_000, generator=generator)
    assert not torch.equal(draws[:16], torch.randn(16, generator=again))
    assert abs(float(draws.mean())) < 0.05 and abs(float(draws.std()) - 1) < 0.05
    words = state.numpy()[24 : 24 + 8 * MT_WORDS].view("<u8")
    assert (words < 2**32).all() and len(set(words.tolist())) > MT_WORDS - 5
    assert not torch.equal(state, secret_state())
