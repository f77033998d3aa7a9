"""Utility measured side by side, for a champion whose test numbers came from other data.

After a retrain on changed data, a challenger's test perplexity and the champion's come from
different test records, so the utility gate cannot compare the numbers they were registered
with. Promotion then measures both models again, now and with the same code, on the
challenger's test records that the champion was **not** trained on. The prepare stage
reshuffles every record when the corpus changes, so part of the new test split is usually old
training data; scoring the champion on its own training records would favour it.

The champion's train split is found by its md5 (the tag `train_md5`, written at registration):
in this project's `data/prepared/` when it is still the current one, otherwise in the DVC cache,
where the prepare stage's output put it (DVC names cached files by the md5 of their bytes).
The result, or the reason it could not be made, is written on the challenger's version
(`paired_utility`, JSON) and the utility gate reads it from there.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privtune import io
from privtune.registry.register import EVALUATED_ON_TAG, TRAIN_FILE, TRAIN_TAG, client

if TYPE_CHECKING:
    from privtune.config import Gates, Params

PAIRED_TAG = "paired_utility"


class Unavailable(Exception):
    """Why the two models could not be measured side by side (the gate quotes it)."""


@dataclass(frozen=True)
class Paired:
    """Both models' utility on the same records: those of the challenger's test split that
    the champion was not trained on (`excluded` of them were)."""

    champion: str  # the champion's version these numbers were measured against
    evaluated_on: str  # the challenger's evaluated_on: the test data, tokenizer and task
    metric: str
    value: float | None = None  # the challenger's
    champion_value: float | None = None
    records: int = 0
    excluded: int = 0
    error: str | None = None  # set instead of the numbers when they could not be measured

    def matches(self, champion: str, evaluated_on: str | None, metric: str) -> bool:
        return (self.champion, self.evaluated_on, self.metric) == (champion, evaluated_on, metric)

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


def needs_pairing(gates: Gates, tags: dict[str, str], champion: Any | None) -> bool:
    """Whether the utility gate would refuse as not comparable unless both are measured."""
    return gates.reevaluate_champion and other_data(gates, tags, champion)


class TrainingSet:
    """The champion's training records, asked whether it saw a text: the same text, or every
    line of it in one record (the prepare stage plants a canary as an extra line of a train
    record, so the planted copy of a note is not the note's text)."""

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


def trained_on(root: Path, champion: Any) -> TrainingSet:
    """The champion's train split, found by its md5."""
    version = f"champion v{champion.version}"
    md5 = dict(champion.tags).get(TRAIN_TAG)
    if not md5:
        raise Unavailable(
            f"{version} was registered before versions recorded their train split "
            f"({TRAIN_TAG}), so its training records cannot be kept out of the comparison"
        )
    path = root / TRAIN_FILE
    if not (path.is_file() and io.file_md5(path) == md5):
        path = _cached(root, md5, version)
    return TrainingSet([r["text"] for r in io.read_jsonl(path)])


def _cached(root: Path, md5: str, version: str) -> Path:
    """The train split in the DVC cache (DVC's API finds the cache wherever it is configured:
    a shared cache directory is common on a team)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    split = f"{version}: its train split (md5 {md5})"
    fetch = (
        f"{split} is neither {TRAIN_FILE} nor in the DVC cache: `dvc fetch --all-commits` from "
        f"the remote, or check out the commit {version} was trained at and `dvc pull`"
    )
    try:
        with Repo(str(root)) as repo:
            if not repo.cache.local.exists(md5):
                raise Unavailable(fetch)
            path = Path(repo.cache.local.oid_to_path(md5))
    except NotDvcRepoError:
        raise Unavailable(f"{fetch} (this project is not a DVC repository)") from None
    if io.file_md5(path) != md5:
        raise Unavailable(f"{split} is corrupted in the DVC cache (md5 differs): fetch it again")
    return path


def _load(name: str, version: str, root: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a registered version, loaded as its users load it (pyfunc)."""
    import mlflow.pyfunc  # noqa: F401  (use_store hands back the mlflow module)
    from mlflow.exceptions import MlflowException

    from privtune.tracking import use_store

    try:
        with use_store(root) as mlflow, warnings.catch_warnings():
            # our predict has an explicit signature; transformers' own deprecation inside peft
            warnings.filterwarnings("ignore", ".*Add type hints to the `predict` method")
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
            loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
    except (MlflowException, OSError, ValueError) as err:
        raise Unavailable(f"v{version} cannot be loaded from the registry ({err})") from None
    return loaded.model, loaded.tokenizer


def measure(
    name: str,
    version: str,
    tags: dict[str, str],
    champion: Any,
    gates: Gates,
    params: Params,
    root: Path,
) -> Paired:
    """Both models' utility on the challenger's test records the champion did not train on;
    what went wrong, as `Paired.error`, when they cannot be measured alike."""
    mine = tags.get(EVALUATED_ON_TAG, "")
    paired = Paired(str(champion.version), mine, gates.utility_metric)
    try:
        found = _measure(name, version, mine, champion, gates.utility_metric, params, root)
    except Unavailable as why:
        return Paired(**(asdict(paired) | {"error": str(why)}))
    return Paired(**(asdict(paired) | found))


def _measure(
    name: str, version: str, mine: str, champion: Any, metric: str, params: Params, root: Path
) -> dict[str, Any]:
    from privtune.errors import PrivtuneError
    from privtune.evaluate import evaluate_model
    from privtune.modeling import resolve_device
    from privtune.stages.common import read_split, resolved_max_length
    from privtune.stages.evaluate import evaluated_on, task_train

    try:
        test = read_split(root, "test")
        max_length, candidates = resolved_max_length(params, root), task_train(params, root)
    except PrivtuneError as err:
        raise Unavailable(f"this project's prepared data cannot be read ({err})") from None
    if params.evaluate.max_records:
        test = test[: params.evaluate.max_records]
    new = _load(name, version, root)
    here = evaluated_on(test, new[1], max_length, params, candidates)
    if here != mine:
        raise Unavailable(
            f"this project's test split, max_length or evaluate settings are not those "
            f"v{version} was evaluated on (evaluated_on {here} here, {mine} on v{version}): "
            "promote in the project that evaluated it"
        )
    trained = trained_on(root, champion)
    records = [r for r in test if r["text"] not in trained]
    if not records:
        raise Unavailable(
            f"every one of the {len(test)} test records was in champion v{champion.version}'s "
            "train split: nothing is left to compare them on"
        )
    old = _load(name, str(champion.version), root)
    if old[1].get_vocab() != new[1].get_vocab():
        raise Unavailable(
            f"champion v{champion.version} has another tokenizer: per-token numbers such as "
            "perplexity do not compare across tokenizers"
        )
    device = resolve_device(params.finetune.device, "finetune.device")
    values = []
    for which, (model, tokenizer) in ((f"v{version}", new), (f"v{champion.version}", old)):
        print(f"measuring {which} on {len(records)} test records", file=sys.stderr)
        found = evaluate_model(
            model.to(device),
            tokenizer,
            records,
            max_length,
            params.evaluate.batch_size,
            task=params.evaluate,
            train_records=candidates,
        )
        if metric not in found:
            raise Unavailable(f"the evaluation measures no {metric} (registry.gates)")
        values.append(float(found[metric]))
    return {
        "value": values[0],
        "champion_value": values[1],
        "records": len(records),
        "excluded": len(test) - len(records),
    }


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
) -> None:
    """Measure each version whose utility the gate could not otherwise compare with the
    champion's, and write the result on it; a measurement already there for this champion,
    data and metric is kept (a retried promotion does not measure twice)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(root)
    for version in versions:
        try:
            tags = dict(mlflow_client.get_model_version(name, version).tags)
        except MlflowException:  # no such version: the promotion itself says so
            continue
        if not needs_pairing(gates, tags, champion):
            continue
        done = read_paired(tags)
        here = (str(champion.version), tags.get(EVALUATED_ON_TAG), gates.utility_metric)
        if done is not None and done.error is None and done.matches(*here):
            continue
        try:
            found = params or _params(root)
        except Unavailable as why:
            paired = Paired(*here, error=str(why))  # type: ignore[arg-type]
        else:
            print(
                f"v{version}: its utility and champion v{champion.version}'s come from other "
                "test data; measuring both side by side on this project's test split",
                file=sys.stderr,
            )
            paired = measure(name, version, tags, champion, gates, found, root)
        mlflow_client.set_model_version_tag(name, version, PAIRED_TAG, paired.to_tag())
