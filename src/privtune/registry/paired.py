"""Utility measured side by side, for a champion whose test numbers came from other data.

After a retrain on changed data, a challenger's test perplexity and the champion's come from
different test records, so the utility gate cannot compare the numbers they were registered
with. Promotion then measures both models again, now and with the same code, on the
challenger's test records that the champion neither trained nor validated on. The prepare stage
reshuffles every record when the corpus changes, so part of the new test split is usually old
training data; scoring the champion on its own training records would favour it.

The champion's train and valid splits are found by their md5 (its model card's
`data.split_md5`, written at registration): in this project's `data/prepared/` when they are
still the current ones, otherwise in the DVC cache, where the prepare stage's output put them
(DVC names cached files by the md5 of their bytes). The result, or the reason it could not be
made, is written on the challenger's version (`paired_utility`, JSON) and the utility gate
reads it from there.

Both models' numbers then come from the same records, so the gate can also say how sure the
difference is: each record's parts of the metric (record_scores) are resampled, the same
records for both models, and the gate reads the bootstrap interval (`utility_confidence`). On
unchanged data the two versions' registered evaluations already are of the same records: the
per-record scores logged with each version are compared without measuring again (a champion
registered before versions carried them is measured again instead).
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privtune import io
from privtune.config import PREPARED_DIR
from privtune.record_scores import (
    ARTIFACT,
    Difference,
    NotPaired,
    RecordScores,
    paired_difference,
    parse_scores,
    seed_of,
)
from privtune.registry.register import EVALUATED_ON_TAG, client, tracking_uri

if TYPE_CHECKING:
    from privtune.config import Gates, Params

PAIRED_TAG = "paired_utility"
PLOT_DIR = "promotion"  # in a version's logged model: its comparison with the champion
SEEN_SPLITS = ("train", "valid")  # what a model trained on, and chose its steps by


class Unavailable(Exception):
    """Why the two models could not be measured side by side (the gate quotes it)."""


@dataclass(frozen=True)
class Paired:
    """Both models' utility on the same records: those of the challenger's test split that
    the champion neither trained nor validated on (`excluded` of them it did)."""

    champion: str  # the champion's version these numbers were measured against
    evaluated_on: str  # the challenger's evaluated_on: the test data, tokenizer and task
    metric: str
    value: float | None = None  # the challenger's
    champion_value: float | None = None
    records: int = 0
    excluded: int = 0
    error: str | None = None  # set instead of the numbers when they could not be measured
    confidence: float | None = None  # of the interval of value - champion_value (None: none)
    low: float | None = None
    high: float | None = None
    measured: bool = True  # false: read from the two versions' registered per-record scores
    resamples: int | None = None  # of the interval
    # the measurement raised (out of memory, a store that did not answer): it may not happen
    # again, so the version is left to judge again rather than refused for good
    transient: bool = False

    def matches(self, champion: str, evaluated_on: str | None, gates: Gates) -> bool:
        """Whether this is the comparison the gates ask for, against this champion and data."""
        resamples = gates.utility_resamples if gates.utility_confidence is not None else None
        here = (self.champion, self.evaluated_on, self.metric, self.confidence, self.resamples)
        asked = (gates.utility_metric, gates.utility_confidence, resamples)
        return here == (champion, evaluated_on, *asked)

    def to_tag(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})


def read_paired(tags: dict[str, str]) -> Paired | None:
    """The paired measurement on a version's tags (None: none, or unreadable)."""
    try:
        return Paired(**json.loads(tags[PAIRED_TAG]))
    except (KeyError, TypeError, ValueError):
        return None


def other_data(gates: Gates, tags: dict[str, str], champion: Any | None) -> bool:
    """Whether the version's utility and the champion's come from other test data, tokenizer
    or task, and the gates do not compare them anyway (`utility_across_data`)."""
    if champion is None or gates.utility_across_data:
        return False
    mine, theirs = tags.get(EVALUATED_ON_TAG), dict(champion.tags).get(EVALUATED_ON_TAG)
    return bool(mine and theirs and mine != theirs)


class TrainingSet:
    """The records a model saw, asked whether it saw a text: the same text, or every line of
    it in one record (the prepare stage plants a canary as an extra line of a train record, so
    the planted copy of a note is not the note's text)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = set(texts)
        self.lines = [set(t.splitlines()) for t in texts]
        self.by_line: dict[str, list[int]] = {}
        for i, lines in enumerate(self.lines):
            for line in lines:
                self.by_line.setdefault(line, []).append(i)

    def __contains__(self, text: object) -> bool:
        if not isinstance(text, str):
            return False
        if text in self.texts:
            return True
        lines = text.splitlines()
        if not lines:
            return False
        return any(self.lines[i].issuperset(lines) for i in self.by_line.get(lines[0], ()))


def registered_scores(mlflow_client: Any, version: Any, uri: str) -> dict[str, Any]:
    """A version's registered per-record scores ({"evaluated_on", "scores"}; {} if none)."""
    from privtune.registry.card import version_json

    found = version_json(mlflow_client, version, uri, ARTIFACT)
    return found if isinstance(found, dict) and "scores" in found else {}


def _from_registered(scores: dict[str, Any], evaluated_on: str, metric: str) -> RecordScores | None:
    """The metric's per-record parts from registered scores of this evaluated_on (else None)."""
    try:
        on, parts = parse_scores(scores)
    except ValueError:  # none registered (an older version), or unreadable
        return None
    return parts.get(metric) if on == evaluated_on else None


def _split_file(root: Path, split: str, md5: str, version: str) -> Path:
    """A split of the champion's data: the project's own while it is unchanged, else the DVC
    cache's copy (DVC's API finds the cache wherever it is configured: a team's shared one)."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    path = root / PREPARED_DIR / f"{split}.jsonl"
    if path.is_file() and io.file_md5(path) == md5:
        return path
    what = f"v{version}'s {split} split (md5 {md5})"
    fetch = (
        f"{what} is neither {path.relative_to(root)} nor in the DVC cache: `dvc fetch "
        f"--all-commits` from the remote, or check out the commit v{version} was trained at "
        "and `dvc pull`"
    )
    try:
        with Repo(str(root)) as repo:
            if not repo.cache.local.exists(md5):
                raise Unavailable(fetch)
            path = Path(repo.cache.local.oid_to_path(md5))
    except NotDvcRepoError:
        raise Unavailable(f"{fetch} (this project is not a DVC repository)") from None
    except DvcException as err:
        raise Unavailable(f"{fetch} (DVC: {type(err).__name__})") from None
    if io.file_md5(path) != md5:
        raise Unavailable(f"{what} is corrupted in the DVC cache (md5 differs): fetch it again")
    return path


def _load(name: str, version: str, root: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a registered version, loaded as its users load it (pyfunc)."""
    import mlflow.pyfunc  # noqa: F401  (use_store hands back the mlflow module)
    from mlflow.exceptions import MlflowException

    from privtune.tracking import use_store

    try:
        with use_store(root) as mlflow:
            loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
    except (MlflowException, OSError, ValueError) as err:
        why = f"{type(err).__name__}: its artifacts"
        raise Unavailable(f"v{version} cannot be loaded from the registry ({why})") from None
    return loaded.model, loaded.tokenizer


class Champion:
    """The champion, read once per promotion however many candidates it is measured against:
    what it saw (from its card's split md5s) and its model, each when first needed."""

    def __init__(self, name: str, version: Any, root: Path) -> None:
        self.name, self.version, self.root = name, str(version.version), root
        self.registered = version
        self._seen: TrainingSet | Unavailable | None = None
        self._model: tuple[Any, Any] | None = None
        self._registered_scores: dict[str, Any] | None = None
        # (evaluated_on, metric) -> its value and per-record parts, measured now
        self.scores: dict[tuple[str, str], tuple[float, RecordScores | None]] = {}
        # version -> (its parts, the champion's, their difference): what was compared now
        self.compared: dict[str, tuple[RecordScores, RecordScores, Difference]] = {}

    def registered_scores(self) -> dict[str, Any]:
        """The per-record scores registered with it ({} for a version registered before)."""
        if self._registered_scores is None:
            uri = tracking_uri(self.root)
            found = registered_scores(client(self.root), self.registered, uri)
            self._registered_scores = found
        return self._registered_scores

    def seen(self) -> TrainingSet:
        if self._seen is None:
            try:
                self._seen = self._read_seen()
            except Unavailable as why:
                self._seen = why
        if isinstance(self._seen, Unavailable):
            raise self._seen
        return self._seen

    def _read_seen(self) -> TrainingSet:
        from privtune.registry.card import version_card

        card = version_card(client(self.root), self.registered, tracking_uri(self.root))
        md5s = card.get("data", {}).get("split_md5") or {}
        if any(split not in md5s for split in SEEN_SPLITS):
            raise Unavailable(
                f"champion v{self.version} was registered before model cards recorded the md5 "
                "of the splits it trained and validated on, so they cannot be kept out"
            )
        texts = []
        for split in SEEN_SPLITS:
            path = _split_file(self.root, split, md5s[split], self.version)
            texts += [r["text"] for r in io.read_jsonl(path)]
        return TrainingSet(texts)

    def model(self) -> tuple[Any, Any]:
        if self._model is None:
            self._model = _load(self.name, self.version, self.root)
        return self._model


def measure(
    name: str,
    version: Any,
    tags: dict[str, str],
    champion: Champion,
    gates: Gates,
    params: Params | None,
    *,
    measuring: bool = True,
) -> Paired | None:
    """Both models' utility on the same records, with the interval of their difference where
    the gates ask for one: from the two versions' registered per-record scores when they were
    evaluated on the same data, else measured now on the challenger's test records the
    champion did not see (None where that is needed and not ``measuring``). What went wrong,
    as `Paired.error`, when they cannot be compared (a library's message is withheld: it
    might quote a record)."""
    from privtune.tracking import error_summary

    mine = tags.get(EVALUATED_ON_TAG, "")
    number = str(version.version)
    confidence = gates.utility_confidence
    resamples = gates.utility_resamples if confidence is not None else None
    paired = Paired(
        champion.version, mine, gates.utility_metric, confidence=confidence, resamples=resamples
    )
    try:
        found = _registered(version, mine, champion, gates)
        if found is None:
            if not measuring:
                return None
            if not gates.reevaluate_champion:
                raise Unavailable(
                    "per-record scores are not registered with both versions (one was "
                    "registered before versions carried them) and registry.gates."
                    "reevaluate_champion is off: the two models are not measured again"
                )
            if params is None:
                params = _params(champion.root)
            found = _measure(name, number, mine, champion, gates, params)
    except Unavailable as why:
        return replace(paired, error=str(why))
    except Exception as err:  # not comparable is the safe verdict
        return replace(paired, error=f"measuring failed: {error_summary(err)}", transient=True)
    return replace(paired, **found)


def _interval(
    found: dict[str, Any],
    mine: RecordScores | None,
    theirs: RecordScores | None,
    gates: Gates,
    seed: int,
    champion: Champion,
    version: str,
) -> dict[str, Any]:
    """`found` with the paired-bootstrap interval of the difference, if the gates want one."""
    if gates.utility_confidence is None:
        return found
    if mine is None or theirs is None:
        raise Unavailable(
            f"no per-record parts of {gates.utility_metric} to resample (record_scores keeps "
            "test_perplexity and the task's accuracies)"
        )
    try:
        diff = paired_difference(
            mine,
            theirs,
            confidence=gates.utility_confidence,
            resamples=gates.utility_resamples,
            seed=seed,
        )
    except NotPaired as why:
        raise Unavailable(f"the two models' scores cannot be paired: {why}") from None
    champion.compared[version] = (mine, theirs, diff)  # for the plot
    return found | {"low": diff.low, "high": diff.high}


def _registered(version: Any, mine: str, champion: Champion, gates: Gates) -> dict[str, Any] | None:
    """The comparison from the per-record scores both versions were registered with, when
    both were evaluated on the same data (None: measure them)."""
    theirs_on = dict(champion.registered.tags).get(EVALUATED_ON_TAG)
    if gates.utility_confidence is None or not mine or mine != theirs_on:
        return None
    metric = gates.utility_metric
    uri = tracking_uri(champion.root)
    own = _from_registered(registered_scores(client(champion.root), version, uri), mine, metric)
    held = _from_registered(champion.registered_scores(), mine, metric)
    if own is None or held is None or len(own) != len(held):
        return None  # one of them was registered before versions carried them
    found = {
        "value": own.value(),
        "champion_value": held.value(),
        "records": len(own),
        "excluded": 0,
        "measured": False,
    }
    seed = seed_of(str(version.version), champion.version, mine, metric)
    return _interval(found, own, held, gates, seed, champion, str(version.version))


def _measure(
    name: str, version: str, mine: str, champion: Champion, gates: Gates, params: Params
) -> dict[str, Any]:
    from privtune.evaluate import evaluate_scored
    from privtune.modeling import position_limit, resolve_device
    from privtune.stages.common import evaluated_split, resolved_max_length
    from privtune.stages.evaluate import evaluated_on, task_train

    root, metric = champion.root, gates.utility_metric
    test = evaluated_split(root, params)
    max_length, candidates = resolved_max_length(params, root), task_train(params, root)
    seen = champion.seen()  # before any model is loaded: the cheap refusals first
    records = [r for r in test if r["text"] not in seen]
    if not records:
        raise Unavailable(
            f"every one of the {len(test)} test records was in champion v{champion.version}'s "
            "train or valid split: nothing is left to compare them on"
        )
    new = _load(name, version, root)
    here = evaluated_on(test, new[1], max_length, params, candidates)
    if here != mine:
        raise Unavailable(
            f"this project's test split, max_length or evaluate settings are not those "
            f"v{version} was evaluated on (evaluated_on {here} here, {mine} on v{version}): "
            "promote in the project that evaluated it"
        )
    old = champion.model()
    if old[1].get_vocab() != new[1].get_vocab():
        raise Unavailable(
            f"champion v{champion.version} has another tokenizer: per-token numbers such as "
            "perplexity do not compare across tokenizers"
        )
    if position_limit(old[0]) < max_length:
        raise Unavailable(
            f"champion v{champion.version} attends to {position_limit(old[0])} positions, "
            f"fewer than the {max_length} tokens per record v{version} was evaluated with"
        )
    device = resolve_device(params.finetune.device, "finetune.device")

    def score(which: str, model: Any, tokenizer: Any) -> tuple[float, RecordScores | None]:
        print(f"measuring {which} on {len(records)} test records", file=sys.stderr)
        found, parts = evaluate_scored(
            model.to(device),
            tokenizer,
            records,
            max_length,
            params.evaluate.batch_size,
            task=params.evaluate,
            train_records=candidates,
        )
        model.to("cpu")  # one model on the accelerator at a time
        if metric not in found:
            raise Unavailable(f"the evaluation measures no {metric} (registry.gates)")
        return float(found[metric]), parts.get(metric)

    value, own = score(f"v{version}", *new)
    # the candidates of one run share their test data: the champion is scored once for them
    key = (mine, metric)
    if key not in champion.scores:
        champion.scores[key] = score(f"champion v{champion.version}", *old)
    champion_value, held = champion.scores[key]
    found = {
        "value": value,
        "champion_value": champion_value,
        "records": len(records),
        "excluded": len(test) - len(records),
    }
    seed = seed_of(version, champion.version, mine, metric)
    return _interval(found, own, held, gates, seed, champion, version)


def _params(root: Path) -> Params:
    from privtune.config import load_params
    from privtune.errors import PrivtuneError

    try:
        return load_params(root / "params.yaml")
    except PrivtuneError as err:
        raise Unavailable(f"the project's params cannot be read ({err})") from None


def pair_with_champion(
    name: str,
    versions: list[str],
    champion: Any | None,
    gates: Gates,
    root: Path,
    params: Params | None = None,
    *,
    measuring: bool = True,
) -> dict[str, Paired]:
    """Compare with the champion, on the same records, each version whose utility the gate
    cannot judge from the two registered numbers (other test data; or any, where it wants the
    interval of the difference), and write the result on it. Registered per-record scores are
    compared for every version; the two models are measured again (``measuring``) only for a
    version that passes every other gate (one refused anyway is not worth two evaluations). A
    comparison already there for this champion, data, metric and confidence is kept (a
    retried promotion does not measure twice). Returns what was compared now, by version."""
    from mlflow.exceptions import MlflowException

    from privtune.registry.promotion import evaluate_gates

    if champion is None:
        return {}
    mlflow_client, measured = client(root), {}
    held = Champion(name, champion, root)
    for number in versions:
        try:
            version = mlflow_client.get_model_version(name, number)
        except MlflowException:  # no such version: the promotion itself says so
            continue
        tags = dict(version.tags)
        if not needs_pairing(gates, tags, champion):
            continue
        failed = [g for g in evaluate_gates(gates, tags, champion) if not g.passed]
        refused = any(g.gate != "utility" for g in failed)
        done = read_paired(tags)
        current = done is not None and done.matches(held.version, tags.get(EVALUATED_ON_TAG), gates)
        if current and done.error is None:
            continue
        if other_data(gates, tags, champion) and measuring and not refused:
            print(
                f"v{number}: its utility and champion v{held.version}'s come from other "
                "test data; measuring both side by side on this project's test split",
                file=sys.stderr,
            )
        paired = measure(
            name, version, tags, held, gates, params, measuring=measuring and not refused
        )
        if paired is None:
            continue
        try:
            mlflow_client.set_model_version_tag(name, number, PAIRED_TAG, paired.to_tag())
        except MlflowException:  # the gate then refuses it as not compared, with that reason
            continue
        measured[number] = paired
        if number in held.compared:
            _log_plot(mlflow_client, version, held, gates.utility_metric, *held.compared[number])
    return measured


def _log_plot(
    mlflow_client: Any,
    version: Any,
    champion: Champion,
    metric: str,
    mine: RecordScores,
    theirs: RecordScores,
    diff: Difference,
) -> None:
    """The comparison as a figure in the version's logged model (`promotion/`), beside its
    card: what a reviewer opens from the version's page. A figure that cannot be logged is
    not worth a refused promotion: the gate's numbers are in the tag."""
    from mlflow.exceptions import MlflowException

    from privtune.plots import plot_paired
    from privtune.registry.card import logged_model_id

    model_id = logged_model_id(version)
    labels = (f"v{version.version}", f"champion v{champion.version}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{metric}-vs-champion-v{champion.version}.png"
        try:
            plot_paired(mine, theirs, diff, labels, metric, path)
            mlflow_client.log_model_artifact(model_id, str(path), PLOT_DIR)
        except (MlflowException, OSError, ValueError) as err:
            why = type(err).__name__
            print(f"v{version.version}: comparison plot not logged ({why})", file=sys.stderr)


def needs_pairing(gates: Gates, tags: dict[str, str], champion: Any | None) -> bool:
    """Whether the utility gate reads a paired comparison for this version: its numbers and
    the champion's come from other data (and may be measured again, unless a reviewer set
    `utility_across_data`), or the gate judges the difference by its interval. A version or
    champion from before `evaluated_on` existed is judged on the two numbers, as then."""
    if champion is None:
        return False
    mine, theirs = tags.get(EVALUATED_ON_TAG), dict(champion.tags).get(EVALUATED_ON_TAG)
    if not mine or not theirs:
        return False
    if mine != theirs:
        return gates.reevaluate_champion and not gates.utility_across_data
    return gates.utility_confidence is not None
