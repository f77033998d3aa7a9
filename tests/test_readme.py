"""README's numbers are the committed outputs' numbers, and nothing in it is a placeholder."""

from __future__ import annotations

import re
from pathlib import Path

from privtune.config import load_params
from privtune.stages.report import summary_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(name: str) -> str:
    match = re.search(rf"<!-- {name}[^>]*-->\n(.*?)\n<!-- /{name} -->", README, re.S)
    assert match, f"README has no <!-- {name} --> block"
    return match.group(1).strip()


def test_results_table_is_what_privtune_summary_prints_for_the_committed_outputs():
    expected = summary_table(load_params(ROOT / "params.yaml"), ROOT, markdown=True)
    assert _block("results:default") == expected.strip(), (
        "README's results table differs from the committed metrics: rerun the pipeline "
        "(dvc repro) and paste `privtune summary --markdown` between the results markers"
    )


def test_no_placeholders():
    for marker in ("TODO", "TBD", "FIXME", "XXX", "placeholder", "lorem"):
        assert marker.lower() not in README.lower(), marker
