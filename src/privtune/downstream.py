"""Downstream tasks: what the fine-tuned model is for, measured on any corpus.

`evaluate.task` declares it: `medication` (the generated notes: the drug the plan names must be
a first-line treatment of the diagnosis) or `cloze` (any notes: a pattern marks an answer span
in each note, e.g. an ICD-10 code or the drug in the plan; the model chooses it among the
answers seen in the train split). Both score each candidate as the continuation of the note's
text up to the span (sum of token log-probabilities, evaluate.continuation_logprobs), so their
accuracies read the same way; chance is reported beside.

Only counts and rates leave this module: never a note, a prompt or an answer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from privtune.config import ClozeParams, EvaluateParams
from privtune.errors import ConfigError, DataError
from privtune.record_scores import RecordScores

# metrics, and the per-record parts of those a promotion may compare
Evaluation = tuple[dict[str, Any], dict[str, RecordScores]]


@dataclass(frozen=True)
class ClozeItem:
    """One test note's question: its text up to the answer span, and the span."""

    prompt: str
    answer: str


def _span(match: re.Match[str]) -> tuple[int, str]:
    group = 1 if match.re.groups else 0
    return match.start(group), match.group(group)


def cloze_items(records: Sequence[dict], params: ClozeParams) -> list[ClozeItem]:
    """The first match of the pattern in each note whose prompt is long enough to mean
    something (`min_prompt_chars`); notes without a match are not asked."""
    pattern = re.compile(str(params.pattern))
    items = []
    for record in records:
        match = pattern.search(record["text"])
        if match is None:
            continue
        start, answer = _span(match)
        if answer.strip() and start >= params.min_prompt_chars:
            items.append(ClozeItem(record["text"][:start], answer.strip()))
    return items


def cloze_candidates(train: Sequence[dict], params: ClozeParams) -> list[str]:
    """The `candidates` most frequent answers of the train split (ties: first seen)."""
    pattern = re.compile(str(params.pattern))
    answers = Counter()
    for record in train:
        match = pattern.search(record["text"])
        if match is not None and _span(match)[1].strip():
            answers[_span(match)[1].strip()] += 1
    return [answer for answer, _ in answers.most_common(params.candidates)]


def cloze_outcomes(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[ClozeItem],
    candidates: Sequence[str],
) -> list[bool]:
    """Per item: whether the model's top-scored candidate is the note's answer."""
    from privtune.evaluate import continuation_logprobs, encode_continuations, split_prompt

    tails: dict[str, list[list[int]]] = {}  # candidate ids per gap (a space, a newline, ...)
    outcomes = []
    for item in items:
        gap = split_prompt(item.prompt)[1]
        if gap not in tails:
            tails[gap] = encode_continuations(tokenizer, gap, candidates)
        scores = continuation_logprobs(model, tokenizer, item.prompt, candidates, tails[gap])
        outcomes.append(candidates[int(scores.argmax())] == item.answer)
    return outcomes


def cloze_accuracy(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[ClozeItem],
    candidates: Sequence[str],
    outcomes: Sequence[bool] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy of the model's choice among the candidates, with two baselines: chance
    (a uniform pick: coverage / candidates) and the majority answer of the train split.
    ``outcomes``: :func:`cloze_outcomes`, when already scored."""
    if outcomes is None:
        outcomes = cloze_outcomes(model, tokenizer, items, candidates)
    n = len(items)
    covered = sum(item.answer in candidates for item in items)
    return {
        "cloze_accuracy": sum(outcomes) / n,
        "cloze_chance": covered / (n * len(candidates)),
        "cloze_majority": sum(item.answer == candidates[0] for item in items) / n,
        "cloze_coverage": covered / n,
        "cloze_candidates": float(len(candidates)),
        "cloze_records": float(n),
    }


def _cloze_task(
    test: Sequence[dict], train: Sequence[dict], params: ClozeParams
) -> tuple[list[ClozeItem], list[str]]:
    items = cloze_items(test, params)
    candidates = cloze_candidates(train, params)
    if not items or len(candidates) < 2:
        raise DataError(
            "evaluate.cloze.pattern",
            f"the pattern marks an answer in {len(items)} test note(s) and gives "
            f"{len(candidates)} distinct answer(s) in the train split (at least 1 and 2 needed)",
            "check the pattern against your notes (its group must capture the answer) or set "
            "evaluate.task: null",
        )
    return items, candidates


def _cloze(
    model, tokenizer, test: Sequence[dict], train: Sequence[dict], params: ClozeParams
) -> Evaluation:
    items, candidates = _cloze_task(test, train, params)
    outcomes = cloze_outcomes(model, tokenizer, items, candidates)
    metrics = cloze_accuracy(model, tokenizer, items, candidates, outcomes)
    right = RecordScores.counts(outcomes)
    return metrics | {
        "downstream_accuracy": metrics["cloze_accuracy"],
        "downstream_chance": metrics["cloze_chance"],
        "downstream_records": metrics["cloze_records"],
    }, {"cloze_accuracy": right, "downstream_accuracy": right}


def _medication_task(test: Sequence[dict], strict: bool) -> list[dict]:
    from privtune.data.generator import CONDITIONS

    allowed = {c.icd10 for c in CONDITIONS}
    task = [r for r in test if r.get("med_prompt") and r.get("icd10") in allowed]
    if not task and strict:
        raise ConfigError(
            "evaluate.task",
            "`medication` needs the generated notes' hidden fields (diagnosis, drug prompt), "
            "which these test records do not have",
            "declare a task for your notes: `evaluate.task: cloze` with evaluate.cloze.pattern "
            "(README, 'Your own data'), or `evaluate.task: null`",
        )
    return task


def _medication(model, tokenizer, test: Sequence[dict], strict: bool) -> Evaluation:
    from privtune.data.generator import ALL_MEDICATION_NAMES, CONDITIONS
    from privtune.evaluate import medication_choices, medication_outcomes, medication_summary

    allowed = {c.icd10: c.medications for c in CONDITIONS}
    task = _medication_task(test, strict)
    if not task:
        return {}, {}
    choices = medication_choices(model, tokenizer, task, ALL_MEDICATION_NAMES)
    metrics = medication_summary(task, choices, ALL_MEDICATION_NAMES, allowed)
    consistent, exact = (
        RecordScores.counts(o) for o in medication_outcomes(task, choices, allowed)
    )
    return metrics | {
        "downstream_accuracy": metrics["medication_accuracy"],
        "downstream_chance": metrics["medication_chance"],
        "downstream_records": float(len(task)),
    }, {
        "medication_accuracy": consistent,
        "medication_exact_match": exact,
        "downstream_accuracy": consistent,
    }


def check_task(test: Sequence[dict], train: Sequence[dict], params: EvaluateParams) -> None:
    """Fail now, before a model is trained or loaded, when the declared task cannot run."""
    if params.task == "medication":
        _medication_task(test, strict=True)
    elif params.task == "cloze":
        _cloze_task(test, train, params.cloze)


def downstream_evaluation(
    model: torch.nn.Module,
    tokenizer,
    test: Sequence[dict],
    train: Sequence[dict] = (),
    params: EvaluateParams | None = None,
) -> Evaluation:
    """The declared task's metrics (`downstream_task` names it; None when none is declared)
    and the per-record parts of its accuracies (record_scores).

    Without ``params`` (benchmarks, older callers) the medication task runs where the records
    carry its fields and is skipped elsewhere; a declared task that cannot run is an error."""
    if params is None:
        return _medication(model, tokenizer, test, strict=False)
    if params.task is None:
        return {"downstream_task": None}, {}
    if params.task == "medication":
        metrics, scores = _medication(model, tokenizer, test, True)
        return {"downstream_task": "medication", **metrics}, scores
    metrics, scores = _cloze(model, tokenizer, test, train, params.cloze)
    return {"downstream_task": "cloze", **metrics}, scores
