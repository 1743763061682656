"""Integrity checks for the independently written evaluation prompt sets.

These sets are evaluation-only (see src/fedguard/data/evalsets/README.md). The checks use nothing
but the standard library, so they run without torch or a model.
"""

import json
import re
from collections import Counter
from importlib.resources import files

import pytest

EVALSETS = files("fedguard.data") / "evalsets"

SPECS = {
    # name: (required fields, minimum rows, minimum categories, minimum rows per category)
    "overrefusal.jsonl": ({"id", "prompt", "category"}, 130, 10, 8),
    "harmful_heldout.jsonl": ({"id", "prompt", "category", "style"}, 120, 12, 6),
    "benign_instructions.jsonl": ({"id", "prompt", "answer", "category"}, 60, 5, 5),
}


def load(name):
    text = (EVALSETS / name).read_text(encoding="utf-8")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        assert line.strip(), f"{name}:{lineno}: blank line"
        row = json.loads(line)
        assert isinstance(row, dict), f"{name}:{lineno}: not a JSON object"
        rows.append(row)
    return rows


def norm(prompt):
    return re.sub(r"\s+", " ", prompt).strip().casefold()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_rows_have_required_fields(name):
    required, *_ = SPECS[name]
    for row in load(name):
        assert set(row) >= required, f"{name} {row.get('id')}: missing {required - set(row)}"
        for field in required:
            assert isinstance(row[field], str) and row[field].strip(), f"{name} {row['id']}: empty {field}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_ids_and_prompts_are_unique(name):
    rows = load(name)
    ids = Counter(r["id"] for r in rows)
    assert not [i for i, n in ids.items() if n > 1], "duplicate ids"
    prompts = Counter(norm(r["prompt"]) for r in rows)
    assert not [p for p, n in prompts.items() if n > 1], "duplicate prompts"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_minimum_counts_and_categories(name):
    _, min_rows, min_cats, min_per_cat = SPECS[name]
    rows = load(name)
    assert len(rows) >= min_rows
    cats = Counter(r["category"] for r in rows)
    assert len(cats) >= min_cats, cats
    assert min(cats.values()) >= min_per_cat, cats


def test_harmful_set_covers_styles_and_skips_minors():
    rows = load("harmful_heldout.jsonl")
    styles = Counter(r["style"] for r in rows)
    assert len(styles) >= 6, styles
    assert min(styles.values()) >= 8, styles
    assert not any("child" in r["category"] or "minor" in r["category"] for r in rows)


def test_benign_answers_are_short():
    for row in load("benign_instructions.jsonl"):
        answer = row["answer"]
        assert len(answer.split()) <= 3 and "\n" not in answer, row
        assert len(answer) <= 30, row


def test_no_overlap_between_overrefusal_and_harmful():
    benign = {norm(r["prompt"]) for r in load("overrefusal.jsonl")}
    harmful = {norm(r["prompt"]) for r in load("harmful_heldout.jsonl")}
    assert not benign & harmful


def test_no_prompt_shared_across_any_two_sets():
    seen = {}
    for name in SPECS:
        for row in load(name):
            key = norm(row["prompt"])
            assert key not in seen, f"{row['id']} in {name} repeats {seen.get(key)}"
            seen[key] = (name, row["id"])


def test_id_prefixes_identify_the_set():
    prefixes = {"overrefusal.jsonl": "or-", "harmful_heldout.jsonl": "hh-", "benign_instructions.jsonl": "bi-"}
    for name, prefix in prefixes.items():
        assert all(r["id"].startswith(prefix) for r in load(name)), name
