"""Canary secrets: random strings planted in training records to measure memorisation.

Why: a canary planted ``r`` times is a controlled "private fact". After training, an attack
ranks its secret among random candidates from the same space (exposure); canaries planted more
often should be easier to extract, and held-out canaries (never planted) give the attack's
baseline. Every canary pairs a unique prefix (naming a fake MRN) with a secret of 9 random
digits, so the secret space has 10^9 equally likely members.

Randomness is derived from ``seed`` plus a per-purpose label, so using the same seed for the
note generator and for the canaries does not correlate their random streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

from privtune.io import atomic_file

SECRET_FORMAT: str = "ddd ddd ddd"
"""Shape of a secret: each ``d`` is a uniformly random digit, other characters are literal."""

SECRET_DIGITS: int = SECRET_FORMAT.count("d")
SECRET_SPACE_SIZE: int = 10**SECRET_DIGITS
_SECRET_RE = re.compile("".join(r"\d" if ch == "d" else re.escape(ch) for ch in SECRET_FORMAT))

IDENTIFIER_TEMPLATE: str = "MRN ####-####"
"""Default identifier a canary names (prepare.canaries.identifier): `#` a random digit, `@` a
random capital letter, anything else literal; set it to the corpus's own identifier style so
that canaries do not stand out from the notes (an outlier is easier to memorise and attack)."""

# Each prefix names a fake identifier so that all prefixes are distinct; none mentions a drug.
_PREFIX_TEMPLATES: tuple[str, ...] = (
    "Patient portal access code for {mrn} is ",
    "The key safe code at the home of the patient with {mrn} is ",
    "Telephone verification number agreed with {mrn}: ",
    "Emergency contact PIN recorded for {mrn} is ",
    "Pharmacy collection code issued to {mrn} is ",
    "Private insurance policy number for {mrn}: ",
)
# How the canary sentence is introduced inside a note (the counted text is canary.text).
_LINE_LABELS: tuple[str, ...] = ("Addendum: ", "Admin note: ", "Note added later: ", "")


def _rng(purpose: str, seed: int) -> random.Random:
    """A generator for one purpose; string seeds are hashed (SHA-512), so this is reproducible."""
    return random.Random(f"privtune.canaries/{purpose}/{seed}")


def random_identifier(rng: random.Random, template: str = IDENTIFIER_TEMPLATE) -> str:
    """``template`` with each `#` a random digit and each `@` a random capital letter."""
    digits, letters = "0123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "".join(
        rng.choice(digits) if ch == "#" else rng.choice(letters) if ch == "@" else ch
        for ch in template
    )


def format_secret(value: int) -> str:
    """Render an integer in ``[0, SECRET_SPACE_SIZE)`` in ``SECRET_FORMAT`` (zero-padded).

    Raises:
        ValueError: if ``value`` is outside the secret space.
    """
    if not 0 <= value < SECRET_SPACE_SIZE:
        raise ValueError(f"secret value {value} is outside [0, {SECRET_SPACE_SIZE})")
    digits = iter(f"{value:0{SECRET_DIGITS}d}")
    return "".join(next(digits) if ch == "d" else ch for ch in SECRET_FORMAT)


def is_valid_secret(secret: str) -> bool:
    """Whether ``secret`` belongs to the secret space (matches ``SECRET_FORMAT`` exactly)."""
    return isinstance(secret, str) and _SECRET_RE.fullmatch(secret) is not None


def random_secret(rng: random.Random) -> str:
    """One secret drawn uniformly from the same space as the canaries' secrets."""
    return format_secret(rng.randrange(SECRET_SPACE_SIZE))


@dataclass(frozen=True)
class Canary:
    """One planted (or held-out) secret.

    Attributes:
        id: Stable name, ``canary-r<repetitions>-<nn>``.
        prefix: Text that precedes the secret; the attack prompts the model with it.
        secret: The random digits the attack tries to recover.
        repetitions: Number of training records that contain it; 0 means held out.
    """

    id: str
    prefix: str
    secret: str
    repetitions: int

    def __post_init__(self) -> None:
        if isinstance(self.repetitions, bool) or not isinstance(self.repetitions, int):
            raise ValueError(f"{self.id}: repetitions must be an int, got {self.repetitions!r}")
        if self.repetitions < 0:
            raise ValueError(f"{self.id}: repetitions must be >= 0, got {self.repetitions}")
        if not is_valid_secret(self.secret):
            raise ValueError(f"{self.id}: secret {self.secret!r} does not match {SECRET_FORMAT!r}")
        if not self.prefix:
            raise ValueError(f"{self.id}: prefix must not be empty")

    @property
    def text(self) -> str:
        """The full canary sentence as it appears in a record (without the final full stop)."""
        return self.prefix + self.secret


def make_canaries(
    repetitions: Sequence[int] = (1, 4, 16),
    per_repetition: int = 4,
    held_out: int = 8,
    seed: int = 0,
    identifier: str = IDENTIFIER_TEMPLATE,
) -> list[Canary]:
    """Unique canaries: per_repetition of each repetition count, plus held_out with repetitions=0.

    Each names a distinct random identifier of the shape ``identifier`` (see
    :func:`random_identifier`).

    All prefixes and secrets are distinct. The list is ordered by ``repetitions`` as given, then
    the held-out canaries; the same arguments always give the same canaries.

    Raises:
        ValueError: on a non-positive or repeated repetition count, or negative counts.
    """
    counts = list(repetitions)
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in counts):
        raise ValueError(
            f"repetitions must be positive integers, got {counts}; "
            "use held_out for canaries that are never inserted"
        )
    if len(set(counts)) != len(counts):
        raise ValueError(f"repetitions must not repeat a value, got {counts}")
    if per_repetition < 0 or held_out < 0:
        raise ValueError(
            f"per_repetition and held_out must be >= 0, got {per_repetition} and {held_out}"
        )
    rng = _rng("make", seed)
    mrns: set[str] = set()
    secrets: set[str] = set()
    canaries = []
    for count in [*counts, *([0] if held_out else [])]:
        for index in range(per_repetition if count else held_out):
            mrn = random_identifier(rng, identifier)
            while mrn in mrns:
                mrn = random_identifier(rng, identifier)
            secret = random_secret(rng)
            while secret in secrets:
                secret = random_secret(rng)
            mrns.add(mrn)
            secrets.add(secret)
            prefix = rng.choice(_PREFIX_TEMPLATES).format(mrn=mrn)
            canaries.append(Canary(f"canary-r{count}-{index + 1:02d}", prefix, secret, count))
    return canaries


def make_audit_canaries(
    m: int,
    seed: int,
    avoid: Collection[Canary] = (),
    inclusion_probability: float = 0.5,
    identifier: str = IDENTIFIER_TEMPLATE,
) -> list[Canary]:
    """m audit canaries with distinct prefixes and secrets, each independently IN w.p. 1/2.

    IN canaries have ``repetitions=1`` (add them to the training set as one record each,
    e.g. :func:`audit_records`), OUT canaries ``repetitions=0``. None shares a prefix or a
    secret with ``avoid`` (pass the ordinary canaries). Deterministic in ``(m, seed, avoid)``.
    """
    if m < 1:
        raise ValueError(f"m (number of audit canaries) must be >= 1, got {m}")
    if not 0 < inclusion_probability < 1:
        raise ValueError(f"inclusion_probability must be in (0, 1), got {inclusion_probability}")
    # A seed of its own, so the same `seed` as the ordinary canaries gives different canaries.
    derived = int.from_bytes(hashlib.sha256(f"privtune.audit/{seed}".encode()).digest()[:8], "big")
    taken = {c.prefix for c in avoid} | {c.secret for c in avoid}
    pool = make_canaries(
        (1,), per_repetition=m + len(avoid), held_out=0, seed=derived, identifier=identifier
    )
    fresh = [c for c in pool if c.prefix not in taken and c.secret not in taken][:m]
    coin = random.Random(f"privtune.audit/include/{seed}")
    return [
        replace(
            canary,
            id=f"audit-{index + 1:04d}",
            repetitions=int(coin.random() < inclusion_probability),
        )
        for index, canary in enumerate(fresh)
    ]


def audit_records(canaries: Sequence[Canary]) -> list[dict[str, str]]:
    """The training records of the IN audit canaries: one standalone sentence per record."""
    return [{"text": f"{c.text}."} for c in canaries if c.repetitions > 0]


def candidate_secrets(n: int, seed: int, exclude: Collection[str] = ()) -> list[str]:
    """n distinct random secrets not in ``exclude``, for ranking a canary's secret (exposure).

    Deterministic for a given ``(n, seed, exclude)``; drawn uniformly from the secret space.

    Raises:
        ValueError: if ``n`` is negative or larger than the secrets left after exclusion.
    """
    excluded = {s for s in exclude if is_valid_secret(s)}
    available = SECRET_SPACE_SIZE - len(excluded)
    if not 0 <= n <= available:
        raise ValueError(f"n must be in [0, {available}] (secret space minus exclude), got {n}")
    rng = _rng("candidates", seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        secret = random_secret(rng)
        if secret not in seen and secret not in excluded:
            seen.add(secret)
            out.append(secret)
    return out


def _insert_position(text: str, rng: random.Random, placement: str, max_offset: int) -> int:
    """A line start (after a newline, within ``max_offset`` characters), or the text's start
    when it has none there: a record is truncated to the model's context from its end, so a
    canary appended to a long one-line record would never be trained on."""
    if placement == "end":
        return len(text)
    starts = [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 <= max_offset]
    return rng.choice(starts) if starts else 0


def _plant(
    record: dict[str, str], canary: Canary, rng: random.Random, placement: str, max_offset: int
) -> None:
    """Insert the canary as its own line into ``record`` (a copy), keeping ``med_prompt`` valid."""
    text = record["text"]
    line = f"{rng.choice(_LINE_LABELS)}{canary.text}."
    pos = _insert_position(text, rng, placement, max_offset)
    if pos < len(text):
        inserted = line + "\n"  # pos is a line start: the canary becomes the line before it
    elif not text or text.endswith("\n"):
        inserted = line + ("\n" if text else "")
    else:
        inserted = "\n" + line
    record["text"] = text[:pos] + inserted + text[pos:]
    prompt = record.get("med_prompt")
    if isinstance(prompt, str) and text.startswith(prompt) and pos <= len(prompt):
        record["med_prompt"] = prompt[:pos] + inserted + prompt[pos:]


def insert_canaries(
    records: list[dict[str, str]],
    canaries: Sequence[Canary],
    seed: int,
    placement: Literal["line", "end"] = "line",
    max_offset: int = 600,
) -> list[dict[str, str]]:
    """Return new records (inputs untouched) with each canary inserted into r distinct records.

    A canary with ``repetitions=r`` becomes an extra line (e.g. ``Addendum: <canary.text>.``)
    in ``r`` distinct records; a record receives at most one canary; held-out canaries
    (``repetitions=0``) are never inserted. Other keys are kept. If a record has ``med_prompt``
    and the canary lands before the medication, ``med_prompt`` is extended so that
    ``text.startswith(med_prompt + medication)`` still holds.

    Args:
        records: Dicts with a ``text`` key.
        canaries: Canaries from :func:`make_canaries` (or loaded ones).
        seed: Chooses the records and the positions.
        placement: ``"line"`` puts the canary at a random line start, ``"end"`` appends it.
        max_offset: With ``"line"``, only line starts within this many characters are used
            (the record's start when there are none), so that truncating a record to the
            model's context keeps the canary (``prepare.canaries.max_offset``).

    Raises:
        ValueError: if there are fewer records than the planted canaries need, if an argument
            is invalid, or if a chosen record has no string ``text``.
    """
    if placement not in ("line", "end"):
        raise ValueError(f"placement must be 'line' or 'end', got {placement!r}")
    planted = [c for c in canaries if c.repetitions > 0]
    needed = sum(c.repetitions for c in planted)
    if needed > len(records):
        raise ValueError(
            f"inserting {len(planted)} canaries needs {needed} distinct records "
            f"(one canary per record) but only {len(records)} were given; "
            "lower the repetitions or per_repetition, or provide more records"
        )
    out = [dict(record) for record in records]
    rng = _rng("insert", seed)
    chosen = iter(rng.sample(range(len(records)), needed))
    for canary in planted:
        for _ in range(canary.repetitions):
            index = next(chosen)
            if not isinstance(out[index].get("text"), str):
                raise ValueError(f"record {index} has no string 'text' to insert a canary into")
            _plant(out[index], canary, rng, placement, max_offset)
    return out


def trained_occurrences(
    canaries: Sequence[Canary], train_texts: Sequence[str], tokenizer, max_length: int
) -> dict[str, int]:
    """Of each planted canary, the train records that hold it whole within the first
    ``max_length`` tokens of ``[bos] text`` (records are truncated there for training).

    Canaries are planted by characters before any tokenizer exists, so in a long record under
    a short ``base.max_length`` one can fall past the cut: the model never sees it, and its
    exposure and extraction say nothing about memorisation. (Counted on the text up to the
    secret's end: a merge across that cut can move the count by a token.)
    """
    counts = {}
    for canary in canaries:
        if canary.repetitions == 0:
            continue
        holding = [t for t in train_texts if canary.text in t]
        heads = [t[: t.index(canary.text) + len(canary.text)] for t in holding]
        ids = tokenizer(heads, add_special_tokens=False)["input_ids"] if heads else []
        counts[canary.id] = sum(len(tokens) + 1 <= max_length for tokens in ids)
    return counts


def planted_and_trained(
    canaries: Sequence[Canary], train_texts: Sequence[str], tokenizer, max_length: int
) -> tuple[int, int]:
    """Planted canary occurrences, and how many of them training sees (`trained_occurrences`
    summed): what the attack stage records and, with `privtune check`, warns of."""
    seen = trained_occurrences(canaries, train_texts, tokenizer, max_length)
    return sum(c.repetitions for c in canaries), sum(seen.values())


def unseen_canaries_warning(planted: int, trained: int, max_length: int) -> str | None:
    """What the attack stage (after training) and `privtune check` (before it) say when some
    planted canary occurrences lie past ``base.max_length`` tokens; counts only, no text."""
    if trained >= planted:
        return None
    return (
        f"warning: {planted - trained} of {planted} planted canary occurrences lie past "
        f"base.max_length = {max_length} tokens, so training never sees them and the "
        "canaries' exposure and extraction understate memorisation; raise base.max_length "
        "or lower prepare.canaries.max_offset (the characters from a note's start within "
        "which a canary's line is planted) and run `dvc repro`"
    )


def save_canaries(canaries: Sequence[Canary], path: str | os.PathLike[str]) -> None:
    """Write canaries (and ``SECRET_FORMAT``) as JSON, atomically, for the attack stage."""
    payload = {"secret_format": SECRET_FORMAT, "canaries": [asdict(c) for c in canaries]}
    with atomic_file(path, encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def load_canaries(path: str | os.PathLike[str]) -> list[Canary]:
    """Read canaries written by :func:`save_canaries`.

    Raises:
        ValueError: if the file was written for another secret format or is malformed.
    """
    with open(path, encoding="utf-8") as handle:
        payload = json.load(handle)
    if not isinstance(payload, dict) or not isinstance(payload.get("canaries"), list):
        raise ValueError(f"{path}: expected an object with a 'canaries' list")
    if payload.get("secret_format") != SECRET_FORMAT:
        raise ValueError(
            f"{path}: secret format {payload.get('secret_format')!r} differs from "
            f"{SECRET_FORMAT!r}; regenerate the canaries"
        )
    canaries = []
    for number, item in enumerate(payload["canaries"], start=1):
        try:
            canaries.append(
                Canary(
                    id=item["id"],
                    prefix=item["prefix"],
                    secret=item["secret"],
                    repetitions=item["repetitions"],
                )
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: canary {number} is malformed ({err!r})") from None
    return canaries
