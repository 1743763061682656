"""Evaluation prompt sets: built-in generators, the independently written sets shipped with fedguard, or a
user's file (JSON/JSONL/CSV/Parquet, or ``hf:NAME[:SPLIT]``).

Prompt sets are for evaluation only. The shipped sets (``data/evalsets/``, written by an author who did not
see the training corpora) are refused for any other use, so they never leak into training, alignment or
probe data.
"""

from __future__ import annotations

import json
from importlib import resources

from fedguard.data.builtin import BUILTIN_SOURCES
from fedguard.data.readers import EVALSETS, load_source, read_rows
from fedguard.data.schema import DataError, Example, chat
from fedguard.seeding import numpy_rng

PROMPT_KEYS = ("prompt", "goal", "instruction", "question", "behavior", "Behavior")
ANSWER_KEYS = ("answer", "target_answer", "reference")  # a checkable prompt's reference answer


def _evalset(source: str) -> list[Example]:
    name, kind = EVALSETS[source]
    text = (resources.files("fedguard.data") / "evalsets" / name).read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            meta = {k: row[k] for k in ("id", "style") if k in row}
            out.append(Example(chat(row["prompt"]), domain=row.get("category", "general"), kind=kind,
                               answer=row.get("answer"), meta={"category": row.get("category"), **meta}))
    return out


def _prompt_of(row, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    if row.get("messages") is not None:
        msgs = row["messages"]
        if isinstance(msgs, str):
            msgs = json.loads(msgs)
        users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1].get("content"), str):
            raise DataError(f"{where}: 'messages' has no user turn")
        prompt = users[-1]["content"]
    else:
        key = next((k for k in PROMPT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        if key is None:
            raise DataError(f"{where}: no prompt column (one of {', '.join(PROMPT_KEYS)}, or 'messages')")
        prompt = row[key]
    answer = next((row[k] for k in ANSWER_KEYS if row.get(k) not in (None, "")), None)
    category = row.get("category") or row.get("domain") or row.get("Category") or "general"
    return Example(chat(prompt), domain=str(category), answer=str(answer) if answer not in (None, "") else None,
                   meta={"category": str(category)})


def _file_prompts(source: str) -> list[Example]:
    out = [_prompt_of(row, f"{source}: row {n}") for n, row in read_rows(source)]
    if not out:
        raise DataError(f"{source}: no prompts")
    return out


def load_prompts(source: str, size: int, seed: int, kind: str = "harmful_prompt") -> list[Example]:
    """Up to ``size`` prompt-only examples of ``source`` (0: all of a file or shipped set; built-in generators
    give exactly ``size`` from their evaluation split), drawn with a seeded sample."""
    if source in BUILTIN_SOURCES:
        if size <= 0:
            return []
        return [Example(chat(e.prompt_text), domain=e.domain, kind=kind, answer=e.answer, group=e.group,
                        meta=dict(e.meta)) for e in load_source(source, "eval", size, seed)]
    examples = _evalset(source) if source in EVALSETS else _file_prompts(source)
    examples = [Example(e.messages, e.domain, kind, e.answer, e.group, e.meta) for e in examples]
    if 0 < size < len(examples):
        idx = sorted(numpy_rng(seed, "prompt-sample", source).choice(len(examples), size=size, replace=False).tolist())
        examples = [examples[i] for i in idx]
    return examples


def load_checkable_prompts(source: str, size: int, seed: int) -> list[Example]:
    """Up to ``size`` benign prompts of ``source`` that carry a reference answer (exact-match accuracy); a
    file with no answer column is an error, rows without an answer are skipped."""
    if source in BUILTIN_SOURCES:  # a generator: draw extra, since not every example is checkable
        pool = load_source(source, "eval", 4 * size, seed)
        return [e for e in pool if e.answer is not None][:size]
    examples = [e for e in load_prompts(source, 0, seed, "benign") if e.answer is not None]
    if not examples:
        raise DataError(f"eval.benign_source {source}: no row has a reference answer "
                        f"(a column named one of {', '.join(ANSWER_KEYS)}); exact match needs one")
    if 0 < size < len(examples):
        idx = sorted(numpy_rng(seed, "checkable-sample", source).choice(len(examples), size=size,
                                                                        replace=False).tolist())
        examples = [examples[i] for i in idx]
    return examples
