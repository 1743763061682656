"""Read user data (JSON, JSONL, CSV, Parquet, or Hugging Face ``datasets``) into ``Example``s.

Accepted row shapes:
* chat: ``messages`` = list of ``{"role", "content"}``, the last turn from the assistant;
* Alpaca-style: ``instruction`` (+ optional ``input``, ``system``) and ``response`` or ``output``;
* ``prompt`` + ``response`` (BeaverTails-style).
Optional columns: ``domain``, ``answer``. Every problem is reported with the file and row number.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fedguard.data.builtin import BUILTIN_SOURCES, split_of
from fedguard.data.schema import ROLES, DataError, Example, chat

# The evaluation sets shipped with fedguard (``fedguard.data.prompts`` reads them), refused here as any other
# source: name -> (file in fedguard/data/evalsets, example kind)
EVALSETS = {
    "builtin:harmful-heldout": ("harmful_heldout.jsonl", "harmful_prompt"),
    "builtin:overrefusal": ("overrefusal.jsonl", "benign"),
    "builtin:benign-heldout": ("benign_instructions.jsonl", "benign"),
}


def is_evalset(source: str) -> bool:
    return source in EVALSETS


# Rows of a user file are split by a hash of their prompt (or group): 5% held out for evaluation, 20% reserved
# for the defender's probe (so a file that serves both the federation and the probe never shares a row), the
# rest for training.
FILE_EVAL_PERCENT = 5
FILE_PROBE_PERCENT = 20


def _rows_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict):
        for key in ("data", "examples", "train", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows (or an object with a 'data' array)")
    yield from enumerate(data, start=1)


def _rows_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(f"{path}: row {lineno}: not UTF-8 text") from None
            if not line:
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {lineno}: invalid JSON ({exc.msg})") from None


def _rows_csv(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for lineno, row in enumerate(csv.DictReader(fh), start=2):  # line 1 is the header
                yield lineno, row
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None


def _rows_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet ({exc})") from None
    yield from enumerate(table.to_pylist(), start=1)


READERS = {".json": _rows_json, ".jsonl": _rows_jsonl, ".ndjson": _rows_jsonl, ".csv": _rows_csv, ".parquet": _rows_parquet}


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def row_to_example(row: Any, where: str, default_domain: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    domain = str(row.get("domain") or default_domain)
    answer = row.get("answer")
    answer = str(answer) if answer not in (None, "") else None
    if row.get("messages") is not None:
        msgs = row["messages"]
        if isinstance(msgs, str):
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError:
                raise DataError(f"{where}: field 'messages' is a string but not a JSON list") from None
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
        clean = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] must be {{'role': one of {list(ROLES)}, 'content': str}}")
            clean.append({"role": m["role"], "content": m["content"]})
        if clean[-1]["role"] != "assistant" or not clean[-1]["content"].strip():
            raise DataError(f"{where}: the last message must be a non-empty assistant turn")
        if not any(m["role"] == "user" for m in clean):
            raise DataError(f"{where}: messages contain no user turn")
        return Example(tuple(clean), domain=domain, answer=answer)
    # Columnar files (Parquet, CSV) give absent fields as None/empty: the first present one wins.
    prompt_key = next((k for k in ("instruction", "prompt") if row.get(k) is not None), None)
    resp_key = next((k for k in ("response", "output") if row.get(k) is not None), None)
    if prompt_key is None or resp_key is None:
        missing = "instruction (or prompt)" if prompt_key is None else "response (or output)"
        raise DataError(f"{where}: missing field {missing}; rows need 'messages' or instruction/response")
    prompt = _text(row, prompt_key, where)
    extra = row.get("input")
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    response = _text(row, resp_key, where)
    if not prompt.strip():
        raise DataError(f"{where}: field '{prompt_key}' is empty")
    if not response.strip():
        raise DataError(f"{where}: field '{resp_key}' is empty")
    system = row.get("system") if isinstance(row.get("system"), str) and row.get("system") else None
    return Example(chat(prompt, response, system), domain=domain, answer=answer)


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a JSON/JSONL/CSV/Parquet file, or ``hf:NAME[:SPLIT]``; missing, empty or unknown
    files are refused with the path named."""
    if str(path).startswith("hf:"):
        return hf_rows(str(path)[3:])
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(sorted(READERS))})")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    return reader(path)


def read_file(path: str | Path) -> list[Example]:
    path = Path(path)
    examples = [row_to_example(row, f"{path}: row {n}", path.stem) for n, row in read_rows(path)]
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def hf_rows(spec: str) -> Iterator[tuple[int, Any]]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"source 'hf:{spec}' needs the 'datasets' package (pip install 'fedguard[datasets]')") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # hub/network/format errors come in many types
        raise DataError(f"cannot load Hugging Face dataset '{name}' split '{split or 'train'}': {exc}") from None
    yield from enumerate(ds, start=1)


def _read_hf(spec: str) -> list[Example]:
    name = spec.partition(":")[0]
    return [row_to_example(row, f"hf:{name}: row {i}", name.split("/")[-1]) for i, row in hf_rows(spec)]


def _take(examples: Iterable[Example], split: str | None) -> list[Example]:
    if split is None:
        return list(examples)
    return [e for e in examples if split_of(e.group or e.prompt_text, FILE_EVAL_PERCENT, FILE_PROBE_PERCENT) == split]


def load_source(source: str, split: str | None, size: int, seed: int) -> list[Example]:
    """Examples of ``source`` for ``split`` ('train', 'eval', 'probe' or None for all).

    Built-in sources are generated with exactly ``size`` examples; files and datasets return all rows
    of the split (the caller samples).
    """
    if source in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[source](seed, size, split)
    if source.startswith("builtin:"):
        if is_evalset(source):
            raise DataError(f"'{source}' is an evaluation-only prompt set; it never serves as training, alignment "
                            "or probe data")
        raise DataError(f"unknown built-in source '{source}' (known: {', '.join(sorted(BUILTIN_SOURCES))})")
    examples = _read_hf(source[3:]) if source.startswith("hf:") else read_file(source)
    taken = _take(examples, split)
    if not taken:
        raise DataError(f"{source}: no examples left in the '{split}' split")
    return taken


def source_fingerprint(source: str | None) -> str | None:
    """What a source's data is, for cache keys: built-in sources by the text of the modules that generate them,
    files by their content, ``hf:`` names by name (the local datasets cache is not inspected)."""
    import hashlib

    if source is None or source.startswith("hf:"):
        return source
    h = hashlib.sha256()
    if source in BUILTIN_SOURCES:
        from importlib import resources

        for name in sorted(p.name for p in resources.files("fedguard.data").iterdir()
                           if p.name.startswith("builtin") and p.name.endswith(".py")):
            h.update((resources.files("fedguard.data") / name).read_bytes())
        return f"{source}:{h.hexdigest()[:16]}"
    path = Path(source)
    if not path.is_file():
        return source  # loading it will say what is wrong
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"file:{h.hexdigest()[:16]}"
