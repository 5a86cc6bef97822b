"""docs/bad-input.md lists every refused input with the message trajlab gives today."""

from __future__ import annotations

from pathlib import Path

from bad_input_catalogue import generate

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"


def test_the_catalogue_in_the_docs_is_current():
    now = generate()
    assert DOC.read_text() == now, (
        "docs/bad-input.md is out of date: regenerate it with "
        "`python tests/bad_input_catalogue.py > docs/bad-input.md` and read the diff")
    for line in now.splitlines():
        if line.startswith("| ") and "accepted" in line:
            raise AssertionError(f"a bad input is accepted: {line}")
