"""The attacks must WORK: they find memorisation in an overfit model and nothing in an untouched
one, their statistics are right on hand-made inputs, and they never leak record text."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats
from sklearn.metrics import roc_auc_score

from privtune.attacks import (
    AttackConfig,
    auc_confidence_interval,
    balanced_sets,
    canary_exposures,
    canary_extraction,
    chunked_continuation_logprobs,
    epsilon_lower_bound,
    exposure_from_scores,
    make_guesses,
    membership_inference,
    membership_scores,
    one_run_audit,
    p_value,
    reproduces,
    run_attacks,
    summarize,
    tpr_at_fpr,
    without_canaries,
)
from privtune.attacks.audit import default_k_choices
from privtune.config import BaseParams
from privtune.data.canaries import (
    audit_records,
    insert_canaries,
    make_audit_canaries,
    make_canaries,
)
from privtune.data.tokenization import encode_records
from privtune.errors import ConfigError, DataError
from privtune.evaluate import continuation_logprobs
from privtune.losses import per_sample_loss
from privtune.modeling import build_gpt2
from tests.conftest import synthetic_texts

N_CANDIDATES = 500  # the stage uses 10,000; 500 keeps the tests fast (max exposure 8.97 bits)
CPU = torch.device("cpu")
PLANTED_REPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two busy cores: torch's intra-op threads slow these tiny models down 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fresh_model(tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    params = BaseParams(n_layer=1, n_head=2, n_embd=64, max_length=96)
    return build_gpt2(params, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def world(tiny_tokenizer):
    """Members, non-members, canaries (one planted 4 times, three held out) and audit canaries."""
    canaries = make_canaries((PLANTED_REPS,), per_repetition=1, held_out=3, seed=5)
    audit = make_audit_canaries(16, seed=5, avoid=canaries)
    members = [{"text": t} for t in synthetic_texts(16, seed=1, words=12)]
    non_members = [{"text": t} for t in synthetic_texts(16, seed=2, words=12)]
    planted = [{"text": f"{c.text}."} for c in canaries for _ in range(c.repetitions)]
    return {
        "tokenizer": tiny_tokenizer,
        "canaries": canaries,
        "audit": audit,
        "members": members,
        "non_members": non_members,
        "train": members + planted + audit_records(audit),
    }


@pytest.fixture(scope="module")
def overfit_model(world):
    """A tiny GPT-2 trained non-privately (plain torch) until it memorises its records."""
    model = _fresh_model(world["tokenizer"])
    data = encode_records([r["text"] for r in world["train"]], world["tokenizer"], 96)
    batch = data.batch(torch.arange(len(data)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_sample_loss(logits, batch["labels"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.5, "the fixture model failed to memorise its training records"
    return model


@pytest.fixture(scope="module")
def untouched_model(world):
    return _fresh_model(world["tokenizer"]).eval()


# --- membership inference -------------------------------------------------------------------


def test_loss_attack_finds_members_of_an_overfit_model(world, overfit_model, untouched_model):
    summaries, _ = membership_inference(
        overfit_model,
        untouched_model,
        world["tokenizer"],
        world["members"],
        world["non_members"],
        resamples=200,
    )
    assert set(summaries) == {"loss", "reference", "zlib", "min_k"}
    for name, summary in summaries.items():
        assert summary.auc > 0.9, name
        assert summary.auc_ci_low <= summary.auc <= summary.auc_ci_high


def test_untouched_model_is_at_chance(world, untouched_model):
    # 200 vs 200 records of one distribution: the AUC's standard deviation is about 0.03
    members = [{"text": t} for t in synthetic_texts(200, seed=11, words=12)]
    non_members = [{"text": t} for t in synthetic_texts(200, seed=12, words=12)]
    summaries, _ = membership_inference(
        untouched_model, None, world["tokenizer"], members, non_members, resamples=200
    )
    for name, summary in summaries.items():
        assert abs(summary.auc - 0.5) < 0.1, name
        assert summary.auc_ci_high - summary.auc_ci_low < 0.2, name


def test_scores_are_oriented_member_high(world, overfit_model, untouched_model):
    texts = [r["text"] for r in world["members"][:2] + world["non_members"][:2]]
    scores = membership_scores(overfit_model, untouched_model, world["tokenizer"], texts)
    for name, values in scores.items():
        assert values[:2].min() > values[2:].max(), name
    # loss is the negated mean NLL, computed independently here
    data = encode_records(texts, world["tokenizer"], 96)
    batch = data.batch(torch.arange(len(texts)))
    with torch.no_grad():
        logits = overfit_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    expected = -per_sample_loss(logits, batch["labels"]).numpy()
    np.testing.assert_allclose(scores["loss"], expected, rtol=1e-5)


def test_the_reference_losses_are_kept_for_the_next_method(
    world, overfit_model, untouched_model, tmp_path
):
    """The base model's losses of the attack's records are the same for every method: the
    first attack scores them, the next reads them (shown by passing another reference model),
    for these texts only, and a file that does not fit them is scored again. The file holds
    numbers and its name a hash, no text."""
    from privtune.attacks.reference_cache import ReferenceCache

    texts = [r["text"] for r in world["members"][:3] + world["non_members"][:3]]
    cache = ReferenceCache.for_project(tmp_path, "base-sha", CPU)
    tokenizer = world["tokenizer"]
    counted: list[int] = []
    first = membership_scores(
        overfit_model, untouched_model, tokenizer, texts, reference_cache=cache,
        on_batch=counted.append,
    )  # fmt: skip
    (path,) = cache.directory.iterdir()
    assert path.name.startswith("membership-reference-")
    assert all(t.encode() not in path.read_bytes() for t in texts)
    counted.clear()
    again = membership_scores(
        overfit_model, overfit_model, tokenizer, texts, reference_cache=cache,
        on_batch=counted.append,
    )  # fmt: skip
    np.testing.assert_array_equal(again["reference"], first["reference"])
    assert sum(counted) == 2 * len(texts)  # a progress bar still ends full
    itself = membership_scores(overfit_model, overfit_model, tokenizer, texts)
    assert not np.allclose(itself["reference"], first["reference"])
    # other texts (or the same in another order) are another file, scored by the model given
    other = membership_scores(
        overfit_model, overfit_model, tokenizer, texts[::-1], reference_cache=cache
    )
    np.testing.assert_allclose(other["reference"], itself["reference"][::-1], atol=1e-6)
    assert len(list(cache.directory.iterdir())) == 2
    for damaged in (b"not a tensor file", torch.zeros(2, dtype=torch.float64)):
        if isinstance(damaged, bytes):
            path.write_bytes(damaged)
        else:
            torch.save(damaged, path)
        rescored = membership_scores(
            overfit_model, untouched_model, tokenizer, texts, reference_cache=cache
        )
        np.testing.assert_array_equal(rescored["reference"], first["reference"])


def test_bad_record_is_named_by_index_without_text(world, untouched_model):
    with pytest.raises(DataError, match=r"non_members\[1\]"):
        membership_inference(
            untouched_model,
            None,
            world["tokenizer"],
            world["members"][:2],
            [{"text": "fine"}, {"txt": "secret words"}],
        )


def test_balanced_sets_are_equal_deterministic_subsets():
    members, non_members = list(range(100)), list(range(1000, 1030))
    a = balanced_sets(members, non_members, n=20, seed=3)
    assert a == balanced_sets(members, non_members, n=20, seed=3)
    assert a != balanced_sets(members, non_members, n=20, seed=4)
    assert len(a[0]) == len(a[1]) == 20
    assert set(a[0]) <= set(members) and set(a[1]) <= set(non_members)
    full = balanced_sets(members, non_members, n=None, seed=3)
    assert len(full[0]) == len(full[1]) == 30


def test_without_canaries_drops_records_that_carry_one():
    canaries = make_canaries((1,), per_repetition=2, held_out=1, seed=3)
    records = [{"text": t} for t in synthetic_texts(6, seed=4)]
    planted = insert_canaries(records, canaries, seed=3)
    kept = without_canaries(planted, canaries)
    assert len(kept) == 4 and all(r in records for r in kept)


# --- ROC statistics -------------------------------------------------------------------------


def test_tpr_at_fpr_on_hand_made_scores():
    members = [0.9, 0.8, 0.7, 0.2]
    non_members = [0.85, 0.1, 0.05, 0.0]
    assert tpr_at_fpr(members, non_members, 0.0) == 0.25
    # a straight line between (0, .25) and (.25, 1) would claim 0.55: no threshold gives it
    assert tpr_at_fpr(members, non_members, 0.1) == 0.25
    assert tpr_at_fpr(members, non_members, 0.25) == 1.0
    assert tpr_at_fpr(members, non_members, 0.5) == 1.0
    separated = tpr_at_fpr([5, 6, 7], [1, 2, 3], 0.001)
    assert separated == 1.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=1, max_size=30),
    st.lists(st.floats(-5, 5), min_size=1, max_size=30),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_tpr_at_fpr_is_achievable_and_monotone(members, non_members, f1, f2):
    low, high = sorted((f1, f2))
    t_low, t_high = tpr_at_fpr(members, non_members, low), tpr_at_fpr(members, non_members, high)
    assert 0 <= t_low <= t_high <= 1
    # some threshold reaches exactly this TPR with FPR <= target
    m, nm = np.array(members), np.array(non_members)
    achieved = [(np.mean(m >= t), np.mean(nm >= t)) for t in np.r_[m, nm, np.inf]]
    assert any(abs(tp - t_low) < 1e-12 and fp <= low + 1e-12 for tp, fp in achieved)


def test_bootstrap_interval_contains_auc_and_is_seeded():
    rng = np.random.default_rng(0)
    members, non_members = rng.normal(1, 1, 80), rng.normal(0, 1, 80)
    auc = roc_auc_score(np.r_[np.ones(80), np.zeros(80)], np.r_[members, non_members])
    low, high = auc_confidence_interval(members, non_members, resamples=500, seed=1)
    assert low < auc < high
    assert 0.05 < high - low < 0.3  # the normal-theory width here is about 0.16
    assert (low, high) == auc_confidence_interval(members, non_members, resamples=500, seed=1)
    narrow = auc_confidence_interval(
        rng.normal(1, 1, 800), rng.normal(0, 1, 800), resamples=500, seed=1
    )
    assert narrow[1] - narrow[0] < high - low


# --- exposure and extraction ----------------------------------------------------------------


def test_planted_canary_is_exposed_and_held_out_ones_are_not(world, overfit_model):
    results = canary_exposures(
        overfit_model, world["tokenizer"], world["canaries"], n_candidates=N_CANDIDATES, seed=0
    )
    top = math.log2(N_CANDIDATES + 1)
    planted = [r for r in results if r.repetitions == PLANTED_REPS]
    held_out = [r for r in results if r.repetitions == 0]
    assert planted[0].rank == 1 and planted[0].exposure == pytest.approx(top)
    assert np.mean([r.exposure for r in held_out]) < 4


def test_calibrated_exposure_ranks_what_fine_tuning_added_to_the_reference(
    world, overfit_model, untouched_model
):
    """Against the reference it was fine-tuned from, the planted canary still tops the
    ranking; against itself a model adds nothing: every candidate ties (about 1 bit)."""
    results = canary_exposures(
        overfit_model,
        world["tokenizer"],
        world["canaries"],
        n_candidates=N_CANDIDATES,
        seed=0,
        reference=untouched_model,
    )
    top = math.log2(N_CANDIDATES + 1)
    planted = [r for r in results if r.repetitions == PLANTED_REPS]
    assert planted[0].calibrated == pytest.approx(top)
    assert np.mean([r.calibrated for r in results if r.repetitions == 0]) < 4
    alone = canary_exposures(
        untouched_model, world["tokenizer"], world["canaries"][:1], n_candidates=N_CANDIDATES,
        seed=0, reference=untouched_model,
    )  # fmt: skip
    assert alone[0].calibrated == pytest.approx(top - math.log2(1 + N_CANDIDATES / 2))
    without = canary_exposures(
        overfit_model, world["tokenizer"], world["canaries"], n_candidates=N_CANDIDATES, seed=0
    )
    assert all(r.calibrated is None for r in without)
    assert [r.exposure for r in without] == [r.exposure for r in results]


def test_the_reference_scores_are_kept_for_the_next_method_and_rescored_when_unusable(
    world, overfit_model, untouched_model, tmp_path, monkeypatch
):
    """Every method fine-tuned from one base is calibrated against the same scores: kept in a
    file the next attack reads (shown by reading them with another reference model passed),
    scored again when the file lacks a canary or cannot be read."""
    from privtune.attacks.reference_cache import ReferenceCache

    canaries = world["canaries"]
    args = (world["tokenizer"], canaries)
    kw = {"n_candidates": N_CANDIDATES, "seed": 0, "chunk_size": 64}
    cache = ReferenceCache.for_project(tmp_path, "base-sha", CPU)
    assert cache.directory == tmp_path / ".privtune/cache"
    key = ([(c.id, c.prefix, c.secret) for c in canaries], N_CANDIDATES, 0, 64)
    path = cache.path("exposure", *key)
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    h100 = ReferenceCache.for_project(tmp_path, "base-sha", gpu).path("exposure", *key)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert ReferenceCache.for_project(tmp_path, "base-sha", gpu).path("exposure", *key) != h100
    for base, device in [("other-base", CPU), ("base-sha", gpu)]:
        assert ReferenceCache.for_project(tmp_path, base, device).path("exposure", *key) != path
    for parts in [(key[0][:1], *key[1:]), (*key[:3], 128), (*key[:2], 1, 64)]:
        assert cache.path("exposure", *parts) != path
    assert cache.path("membership", *key) != path
    first = canary_exposures(
        overfit_model, *args, **kw, reference=untouched_model, reference_cache=cache
    )
    assert path.is_file()
    # the file's scores are used, not the model passed: as calibrated as the first time
    again = canary_exposures(
        overfit_model, *args, **kw, reference=overfit_model, reference_cache=cache
    )
    assert [r.calibrated for r in again] == [r.calibrated for r in first]
    itself = canary_exposures(overfit_model, *args, **kw, reference=overfit_model)
    assert [r.calibrated for r in itself] != [r.calibrated for r in first]
    wrong_and_one_missing = {canaries[0].id: torch.zeros(N_CANDIDATES + 1, dtype=torch.float64)}
    for damaged in (b"not a tensor file", wrong_and_one_missing):
        if isinstance(damaged, bytes):
            path.write_bytes(damaged)
        else:
            torch.save(damaged, path)
        rescored = canary_exposures(
            overfit_model, *args, **kw, reference=untouched_model, reference_cache=cache
        )
        assert [r.calibrated for r in rescored] == [r.calibrated for r in first]


def test_untouched_model_gives_chance_exposure(world, untouched_model):
    canaries = make_canaries((1,), per_repetition=6, held_out=0, seed=9)
    results = canary_exposures(
        untouched_model, world["tokenizer"], canaries, n_candidates=N_CANDIDATES, seed=0
    )
    # rank is uniform for a model that knows nothing: mean exposure about 1/ln 2 = 1.44 bits
    assert np.mean([r.exposure for r in results]) < 4


def test_exposure_formula():
    assert exposure_from_scores(10.0, np.arange(7.0)) == pytest.approx(3.0)  # rank 1 of 8
    assert exposure_from_scores(-1.0, np.arange(7.0)) == pytest.approx(0.0)  # rank 8 of 8
    assert exposure_from_scores(3.0, np.array([3.0, 0.0, 0.0])) == pytest.approx(2 - math.log2(1.5))


def test_chunking_does_not_change_scores(world, overfit_model):
    canary = world["canaries"][0]
    candidates = [canary.secret, "000 000 000", "123 456 789", "999 111 555", "314 159 265"]
    whole = continuation_logprobs(overfit_model, world["tokenizer"], canary.prefix, candidates)
    chunked = chunked_continuation_logprobs(
        overfit_model, world["tokenizer"], canary.prefix, candidates, chunk_size=2
    )
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


def test_chunks_are_sized_for_the_models_device(monkeypatch, untouched_model):
    """On the CPU a chunk's logits stay within 256 MiB; on a GPU within a quarter of its free
    memory, at most 4 GiB, and never less than the CPU's budget."""
    from privtune.attacks import exposure

    assert exposure.logits_budget(torch.device("cpu")) == 256 * 2**20
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 2**40))
    for available, budget in [(64 * 2**30, 4 * 2**30), (4 * 2**30, 2**30), (2**20, 256 * 2**20)]:
        free["bytes"] = available
        assert exposure.logits_budget(torch.device("cuda", 0)) == budget
    vocab = untouched_model.config.vocab_size
    chunk = exposure.default_chunk_size(untouched_model, tokens_per_continuation=12)
    assert chunk == max(16, 256 * 2**20 // (8 * vocab * 12))


def test_greedy_and_sampled_extraction(world, overfit_model, untouched_model):
    results = canary_extraction(overfit_model, world["tokenizer"], world["canaries"], samples=4)
    planted = [r for r in results if r.repetitions == PLANTED_REPS]
    held_out = [r for r in results if r.repetitions == 0]
    assert planted[0].greedy and planted[0].sampled_hits >= 2
    assert not any(r.greedy or r.sampled_hits for r in held_out)
    again = canary_extraction(overfit_model, world["tokenizer"], world["canaries"], samples=4)
    assert again == results  # seeded
    blank = canary_extraction(untouched_model, world["tokenizer"], world["canaries"], samples=2)
    assert not any(r.greedy or r.sampled_hits for r in blank)


def test_reproduces_needs_the_exact_secret():
    assert reproduces(" 123 456 789.", "123 456 789")
    assert reproduces("123 456 789", "123 456 789")
    assert not reproduces(" 123 456 7890", "123 456 789")
    assert not reproduces(" 123 456 788", "123 456 789")
    assert not reproduces(" x 123 456 789", "123 456 789")


# --- one-run audit --------------------------------------------------------------------------


def _paper_p_value(m, r, v, eps, delta):
    """The paper's Algorithm 2, written as its loop, to check the vectorised version."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha = total = 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 300).flatmap(
        lambda m: st.tuples(st.just(m), st.integers(0, m)).flatmap(
            lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.integers(0, t[1]))
        )
    ),
    st.floats(0, 8),
    st.sampled_from([0.0, 1e-5, 1e-3]),
)
def test_p_value_matches_the_papers_loop(mrv, eps, delta):
    m, r, v = mrv
    assert p_value(m, r, v, eps, delta) == pytest.approx(
        _paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12
    )


def test_bound_by_hand():
    # all r guesses right, delta = 0: reject eps while q^r < 0.05, q = e^eps / (1 + e^eps)
    for r in (10, 100):
        expected = special.logit(0.05 ** (1 / r))
        assert epsilon_lower_bound(r, r, r) == pytest.approx(expected, abs=1e-5)
    assert epsilon_lower_bound(10, 10, 10) == pytest.approx(1.0519, abs=1e-4)
    # 99% confidence asks for more evidence
    assert epsilon_lower_bound(100, 100, 100, confidence=0.99) < epsilon_lower_bound(100, 100, 100)


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses():
    assert epsilon_lower_bound(1000, 500, 250) == 0.0
    assert epsilon_lower_bound(1000, 500, 260) == 0.0  # within noise of chance
    bounds = [epsilon_lower_bound(1000, 500, v, delta=1e-5) for v in (300, 350, 400, 450, 500)]
    assert bounds[0] > 0
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.data())
def test_bound_properties(m, data):
    r = data.draw(st.integers(1, m))
    v = data.draw(st.integers(0, r - 1))
    delta = data.draw(st.sampled_from([1e-6, 1e-4, 1e-2]))
    plain = epsilon_lower_bound(m, r, v)
    assert 0 <= plain <= epsilon_lower_bound(m, r, v + 1)  # one more correct guess never hurts
    assert epsilon_lower_bound(m, r, v, delta) <= plain + 1e-6  # delta only weakens the claim
    if plain > 0:  # the reported eps is itself rejected
        assert p_value(m, r, v, plain, 0.0) < 0.05


def _randomized_response_bounds(eps, m, runs, k_choices, seed):
    """Bounds from many runs of the one-run game against eps-DP randomized response.

    ``k_choices="all"`` guesses every canary by its reported bit (W ~ Binomial(m, q) exactly,
    the worst case the bound must survive); otherwise top/bottom-k guesses on the scores.
    """
    rng = np.random.default_rng(seed)
    q = special.expit(eps)
    bounds = []
    for _ in range(runs):
        included = rng.random(m) < 0.5
        kept = rng.random(m) < q  # each canary's bit is reported truthfully w.p. q
        reported = np.where(kept, included, ~included)
        scores = reported + rng.uniform(0, 0.5, m)  # data-independent tie-breaking
        choices = (
            [(int(reported.sum()), m - int(reported.sum()))] if k_choices == "all" else k_choices
        )
        bounds.append(one_run_audit(scores, included, 0.0, choices).epsilon_lower_bound)
    return np.array(bounds)


def test_bound_never_overstates_randomized_response():
    # eps = 1 randomized response guessed on every canary: the 95% bound may exceed 1 in at
    # most 5% of runs (here 600 runs: 5% plus 3 standard errors of slack)
    bounds = _randomized_response_bounds(1.0, 100, 600, "all", seed=0)
    assert np.mean(bounds > 1.0) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 600)
    assert np.mean(bounds > 0) > 0.5  # and it is not vacuous


@settings(max_examples=4, deadline=None)
@given(st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([60, 150]), st.integers(0, 10**6))
def test_bonferroni_bound_never_overstates(eps, m, seed):
    bounds = _randomized_response_bounds(eps, m, 200, default_k_choices(m), seed)
    assert np.mean(bounds > eps) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200)


def test_bound_detects_a_leaky_mechanism():
    bounds = _randomized_response_bounds(4.0, 200, 50, None, seed=1)
    assert np.median(bounds) > 2.0


def test_bonferroni_costs_confidence():
    rng = np.random.default_rng(0)
    included = rng.random(200) < 0.5
    scores = included + rng.normal(0, 0.5, 200)
    single = one_run_audit(scores, included, 1e-5, [(20, 20)])
    guesses = make_guesses(scores, 20, 20)
    truth = np.where(included, 1, -1)
    assert single.guesses == 40 and single.correct == int(np.sum(guesses == truth))
    assert single.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(200, 40, single.correct, 1e-5)
    )
    several = one_run_audit(scores, included, 1e-5, [(20, 20), (20, 20), (20, 20), (20, 20)])
    assert several.epsilon_lower_bound < single.epsilon_lower_bound


def test_make_guesses():
    guesses = make_guesses([0.1, 0.9, 0.5, 0.3, 0.7], k_pos=2, k_neg=1)
    assert guesses.tolist() == [-1, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="k_pos"):
        make_guesses([1.0, 2.0], 2, 1)


def test_audit_canaries():
    ordinary = make_canaries(seed=5)
    audit = make_audit_canaries(400, seed=5, avoid=ordinary)
    assert audit == make_audit_canaries(400, seed=5, avoid=ordinary)
    assert audit != make_audit_canaries(400, seed=6, avoid=ordinary)
    assert len({c.prefix for c in audit}) == len({c.secret for c in audit}) == 400
    taken = {c.prefix for c in ordinary} | {c.secret for c in ordinary}
    assert not taken & ({c.prefix for c in audit} | {c.secret for c in audit})
    included = sum(c.repetitions for c in audit)
    assert {c.repetitions for c in audit} == {0, 1}
    assert abs(included - 200) < 4 * 10  # Binomial(400, 1/2): sd 10
    records = audit_records(audit)
    assert len(records) == included and all(r["text"].endswith(".") for r in records)


def test_audit_of_overfit_model_rejects_small_epsilon(world, overfit_model, untouched_model):
    texts = [f"{c.text}." for c in world["audit"]]
    included = [c.repetitions > 0 for c in world["audit"]]
    leaky = membership_scores(overfit_model, untouched_model, world["tokenizer"], texts)
    blind = membership_scores(untouched_model, None, world["tokenizer"], texts)
    result = one_run_audit(leaky["reference"], included, delta=1e-5)
    assert result.correct >= result.guesses - 1
    assert result.epsilon_lower_bound > 0.5
    assert one_run_audit(blind["loss"], included, delta=1e-5).epsilon_lower_bound == 0.0


# --- the stage entry point ------------------------------------------------------------------


SMALL = AttackConfig(bootstrap_resamples=100, n_candidates=200, samples=2, audit_delta=1e-5)


def test_run_attacks_reports_flat_floats_and_no_text(
    world, overfit_model, untouched_model, tmp_path, capsys
):
    metrics, figures = run_attacks(
        overfit_model,
        untouched_model,
        world["tokenizer"],
        world["members"],
        world["non_members"],
        world["canaries"],
        world["audit"],
        config=SMALL,
        out_dir=tmp_path,
        name="overfit",
    )
    for key, value in metrics.items():  # numbers; a TPR too few non-members resolve is None
        if key.endswith("_unresolved"):
            assert isinstance(value, str) and "non-members" in value
        elif value is None:
            fpr = key.split("tpr_at_fpr_")[1].removesuffix("_max")
            assert f"mia_tpr_at_fpr_{fpr}_unresolved" in metrics, key
        else:
            assert isinstance(value, int | float), key
    assert metrics["mia_members"] == len(world["members"])
    assert metrics["mia_non_members"] == len(world["non_members"])
    for score in ("loss", "reference", "zlib", "min_k"):
        for suffix in ("auc", "auc_ci_low", "auc_ci_high", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01"):
            assert f"mia_{score}_{suffix}" in metrics
    for key in (
        "mia_auc_max",
        "mia_tpr_at_fpr_0.01_max",
        f"exposure_r{PLANTED_REPS}_mean",
        f"exposure_r{PLANTED_REPS}_max",
        "exposure_held_out_mean",
        f"exposure_calibrated_r{PLANTED_REPS}_mean",  # the base model is the reference
        "exposure_calibrated_held_out_max",
        f"extraction_greedy_r{PLANTED_REPS}",
        f"extraction_sampled_r{PLANTED_REPS}",
        "extraction_greedy_held_out",
        "audit_epsilon_lower_bound",
        "audit_blackbox_epsilon_lower_bound",
        "audit_blackbox_m",
        "audit_blackbox_guesses",
        "audit_blackbox_correct",
    ):
        assert key in metrics, key
    assert metrics["mia_auc_max"] > 0.9
    assert metrics[f"extraction_greedy_r{PLANTED_REPS}"] == 1.0
    assert metrics["audit_blackbox_m"] == 16.0
    assert metrics["audit_epsilon_lower_bound"] == metrics["audit_blackbox_epsilon_lower_bound"]
    assert [f.name for f in figures] == ["roc-overfit.png"] and figures[0].stat().st_size > 0

    secrets = [c.secret for c in world["canaries"] + world["audit"]]
    prefixes = [c.prefix.strip() for c in world["canaries"] + world["audit"]]
    fragments = [r["text"][:24] for r in world["members"] + world["non_members"]]
    captured = capsys.readouterr()
    # where the stage's time went, as a log line (seconds are no metric: reruns must agree)
    phases = ("membership inference", "exposure", "extraction", "audits")
    line = next(x for x in captured.err.splitlines() if x.startswith("attack phases: "))
    assert [
        part.rsplit(" ", 2)[0] for part in line.removeprefix("attack phases: ").split(", ")
    ] == list(phases)
    assert not any("seconds" in key for key in metrics)
    # progress through membership inference, not only at its end: a line a tenth (no terminal)
    scored = 2 * (len(world["members"]) + len(world["non_members"]))  # target and reference
    mia = [x for x in captured.err.splitlines() if x.startswith("membership inference (texts")]
    assert "━" not in captured.err  # the lines, not rich's bar drawn once at the end
    assert len(mia) > 1 and mia[-1].startswith(f"membership inference (texts scored): {scored}/")
    written = json.dumps(metrics) + captured.out + captured.err
    blobs = [written.encode()] + [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    for needle in secrets + prefixes + fragments:
        for blob in blobs:
            assert needle.encode() not in blob


def test_audit_needs_delta(world, untouched_model):
    with pytest.raises(ConfigError, match="audit_delta"):
        run_attacks(
            untouched_model,
            None,
            world["tokenizer"],
            world["members"],
            world["non_members"],
            world["canaries"],
            world["audit"],
            config=AttackConfig(audit_score="loss"),
        )


def test_summarize_groups_by_repetitions():
    from privtune.attacks import CanaryExposure, CanaryExtraction, RocSummary

    roc = RocSummary(0.6, 0.55, 0.65, {0.001: 0.0, 0.01: 0.02})
    exposures = [
        CanaryExposure("a", 1, 2.0, 4.0, 1.0),
        CanaryExposure("b", 1, 4.0, 1.0, 5.0),
        CanaryExposure("c", 16, 9.0, 1.0),
        CanaryExposure("d", 0, 1.0, 8.0),
    ]
    extractions = [
        CanaryExtraction("a", 1, True, 1, 4),
        CanaryExtraction("b", 1, False, 0, 4),
        CanaryExtraction("d", 0, False, 0, 4),
    ]
    metrics = summarize({"loss": roc, "zlib": roc}, exposures, extractions, {})
    assert metrics["exposure_r1_mean"] == 3.0 and metrics["exposure_r1_max"] == 4.0
    assert metrics["exposure_r16_mean"] == 9.0 and metrics["exposure_held_out_mean"] == 1.0
    assert metrics["exposure_calibrated_r1_mean"] == 3.0
    assert metrics["exposure_calibrated_r1_max"] == 5.0
    assert not any(
        k.startswith(("exposure_calibrated_r16", "exposure_calibrated_held")) for k in metrics
    )
    assert metrics["extraction_greedy_r1"] == 0.5 and metrics["extraction_sampled_r1"] == 1 / 8
    assert metrics["extraction_greedy_held_out"] == 0.0
    assert metrics["mia_loss_tpr_at_fpr_0.01"] == 0.02 and metrics["mia_auc_max"] == 0.6
    assert not any(k.startswith("audit_") for k in metrics)


def test_both_audits_share_the_confidence_and_the_larger_bound_is_reported(
    world, overfit_model, untouched_model
):
    """Text canaries (black-box) and gradient canaries (white-box) are audited at half the
    significance each (Bonferroni), so the larger of the two bounds keeps the confidence."""
    from privtune.privacy.gradient_canaries import GradientCanaries

    gradient = GradientCanaries.draw(64, 1000, seed=0, norm=1.0)
    gradient.scores = np.where(gradient.included, 5.0, 0.0)  # a leak no DP run would show
    config = replace(SMALL, samples=0, n_candidates=100)
    args = (world["tokenizer"], world["members"], world["non_members"], world["canaries"])
    both, _ = run_attacks(
        overfit_model, untouched_model, *args, world["audit"], config, gradient_canaries=gradient
    )
    alone, _ = run_attacks(
        overfit_model, untouched_model, *args, (), config, gradient_canaries=gradient
    )
    whitebox = both["audit_whitebox_epsilon_lower_bound"]
    assert both["audit_epsilon_lower_bound"] == max(
        whitebox, both["audit_blackbox_epsilon_lower_bound"]
    )
    assert 0 < whitebox < alone["audit_whitebox_epsilon_lower_bound"]  # half the significance
    assert both["audit_whitebox_m"] == 64.0
