"""Finished runs compared: a run folder as a comparison row, and two runs' refusal on the same prompts with the
exact paired test (`fedguard compare`, the sweep report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedguard.config import ConfigError
from fedguard.evaluation.stats import format_rate, paired_refusals
from fedguard.io import read_ndjson
from fedguard.run_dir import FINAL_METRICS_FILE, METRICS_FILE


def finished_run(run_dir: Path) -> dict[str, Any]:
    """A finished run as a comparison row: its final metrics and its per-round records."""
    final_path = run_dir / FINAL_METRICS_FILE
    if not final_path.is_file():
        raise ConfigError(f"{run_dir} is not a finished run (no {FINAL_METRICS_FILE})")
    return {"run": run_dir.name, "final": json.loads(final_path.read_text(encoding="utf-8")),
            "records": read_ndjson(run_dir / METRICS_FILE)}


def last_eval(row: dict[str, Any]) -> dict[str, Any]:
    """The last evaluation among a row's per-round records ({} when none)."""
    evals = [r["eval"] for r in row["records"] if "eval" in r]
    return evals[-1] if evals else {}


def versus(row: dict[str, Any], other: dict[str, Any] | None) -> dict[str, Any] | None:
    """Refusal of ``row`` minus ``other`` after the last round, with the paired test on the same prompts."""
    if other is None or other is row:
        return None
    a, b = row["final"].get("after", {}), other["final"].get("after", {})
    ea, eb = last_eval(row), last_eval(other)
    if ea.get("harmful_set") and eb.get("harmful_set") and ea["harmful_set"] != eb["harmful_set"]:
        return None  # other prompts (or order): no prompt-by-prompt test (runs from before the hash: by count)
    test = paired_refusals(ea.get("refused"), eb.get("refused"))
    if test is None or "refusal_rate" not in a or "refusal_rate" not in b:
        return None
    return {"delta": a["refusal_rate"] - b["refusal_rate"], **test}


def p_words(test: dict[str, Any], a: str, b: str) -> str:
    """A paired test in words: the discordant prompts and the exact McNemar p."""
    return (f"prompts refused only {a}: {test['only_a']}, only {b}: {test['only_b']}; exact McNemar "
            f"p = {test['p']:.2g}, {'beyond' if test['p'] < 0.05 else 'within'} noise at 5 %")


def compare_runs(a_dir: Path, b_dir: Path) -> list[str]:
    """Two finished runs side by side after their last round, with the paired test on the same prompts."""
    a, b = finished_run(a_dir), finished_run(b_dir)
    lines = []
    for r in (a, b):
        ev = r["final"].get("after", {})
        lines.append(f"{r['run']}: refusal {format_rate(ev, 'refusal_rate')} % (keyword rule "
                     f"{ev.get('refusal_rate_keyword', float('nan')):.1f} %), over-refusal "
                     f"{format_rate(ev, 'overrefusal_rate')} %, exact match {ev.get('exact_match', float('nan')):.1f} "
                     f"%, held-out loss {ev.get('eval_loss', float('nan')):.4f}")
    t = versus(a, b)
    if t is None:
        lines.append("not evaluated on the same harmful prompts: no prompt-by-prompt test")
    else:
        lines.append(f"{a['run']} vs {b['run']}: {t['delta']:+.1f} points ({p_words(t, a['run'], b['run'])})")
    return lines
