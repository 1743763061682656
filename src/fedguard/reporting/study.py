"""The aggregator study's report: every rule on the same one-round updates, per scenario, and the wire formats
on the all-benign federation (study.md, study.json, *.png)."""

from __future__ import annotations

import json
from pathlib import Path

from fedguard.config import ExperimentConfig
from fedguard.evaluation.stats import format_rate, paired_refusals
from fedguard.io import atomic_write_bytes, atomic_write_text
from fedguard.reporting.figures import png_bytes, pyplot
from fedguard.reporting.format import number

# the study's rows: which method a row is, and the scenario of the wire-format section
BENIGN_ONLY = "benign_only"
PROBE_ROW = "fedavg+probe"
BENIGN_SCENARIO = "none@1:0"  # the wire-format section: every client benign
EVAL_SCALARS = ("refusal_rate", "compliance_rate", "neither_rate", "refusal_rate_keyword", "overrefusal_rate",
                "refusal_rate_triggered", "exact_match", "eval_loss", "perplexity", "harmful_n", "overrefusal_n",
                "refusal_triggered_n")


def _kb(n: float | None) -> float | None:
    return None if n is None else n / 1e3


def write_study_report(cfg: ExperimentConfig, rows: list[dict], out_dir: Path) -> Path:
    base = next((r for r in rows if r["method"] == "base"), None)
    rule_rows = [r for r in rows if r["scenario"] not in ("base", BENIGN_SCENARIO)]
    wire_rows = [r for r in rows if r["scenario"] == BENIGN_SCENARIO]
    b = (base or {}).get("eval", {})
    t = cfg.train
    lines = [f"# fedguard aggregator study: {cfg.name}", "",
             f"Model `{cfg.model.name_or_path}`, {cfg.federation.num_clients} clients, one round of {t.local_steps} "
             f"local steps (batch {t.batch_size}, lr {t.lr:g}) from the base adapter. In each scenario every rule "
             "aggregates the very same client updates, so the rows differ only by the rule. "
             f"Refusal = rule score on {cfg.eval.harmful_prompts} held-out harmful prompts (higher is safer); exact "
             f"match on {cfg.eval.benign_prompts} checkable prompts and held-out loss on {cfg.eval.loss_examples} "
             "benign examples measure utility. TPR / FPR: malicious / benign clients a rule screened out (kept in "
             "less than half of the aggregate) or the probe weighted below 0.5; – where a rule does not screen. "
             f"`benign_only` is FedAvg over the benign clients alone (the target); `{PROBE_ROW}` is FedAvg weighted "
             "by the LoRA-Probe (client level). Brackets: 95 % Wilson intervals; keyword rule: the Safe-FedLLM "
             "keyword rule on the same responses; *vs benign_only*: refusal difference in points, with the exact "
             "McNemar p on the same prompts. Expected attackers (server.expected_malicious): "
             f"{cfg.server.expected_malicious}.", "",
             f"Base model: refusal {format_rate(b, 'refusal_rate')} %, over-refusal "
             f"{format_rate(b, 'overrefusal_rate')} %, exact match {number(b.get('exact_match'))} %, "
             f"held-out loss {number(b.get('eval_loss'), 4)}.", ""]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rule_rows))
    lines += _summary_table(rule_rows, scenarios)
    for s in scenarios:
        sub = [r for r in rule_rows if r["scenario"] == s]
        secs = sub[0].get("client_seconds")
        lines += [f"## {s}", "",
                  f"Malicious clients: {sub[0].get('malicious')}. Local training: {number(secs)} s per client "
                  "(shared by every row).", "",
                  "| method | refusal % [95 % CI] | keyword rule % | over-refusal % [95 % CI] | vs benign_only | "
                  "refusal with trigger % | exact match % | held-out loss | TPR | FPR | aggregation ms | "
                  "uplink KB / client |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        target = next((r for r in sub if r["method"] == BENIGN_ONLY), None)
        for r in sub:
            ev, det = r["eval"], r.get("detection") or {}
            vs = None if target is None or r is target else paired_refusals(ev.get("refused"),
                                                                            target["eval"].get("refused"))
            vs_text = "–" if vs is None else (f"{ev['refusal_rate'] - target['eval']['refusal_rate']:+.1f} "
                                              f"(p {vs['p']:.2g})")
            lines.append(f"| {r['method']} | {format_rate(ev, 'refusal_rate')} | "
                         f"{number(ev.get('refusal_rate_keyword'))} | {format_rate(ev, 'overrefusal_rate')} | "
                         f"{vs_text} | {number(ev.get('refusal_rate_triggered'))} | {number(ev.get('exact_match'))} | "
                         f"{number(ev.get('eval_loss'), 4)} | {number(det.get('tpr'), 2)} | {number(det.get('fpr'), 2)} | "
                         f"{number(1e3 * r['aggregate_seconds'])} | {number(_kb(r['bytes_up_mean']))} |")
        lines.append("")
    if scenarios:
        for key, label, bars in _PLOTS:
            atomic_write_bytes(out_dir / f"{key}.png", _rules_plot(rule_rows, scenarios, key, label, b.get(key), bars))
        lines += [f"![{label} per rule]({key}.png)\n" for key, label, _ in _PLOTS]
    if wire_rows:
        plain = next((r for r in wire_rows if r["method"] == "codec:none"), None)
        lines += ["## Wire formats on the all-benign federation", "",
                  "One round, so error feedback has nothing to pay back yet: a lossy codec's error shows in full. "
                  "`product`: exact averaging of the products B_k A_k, re-factorised to rank r (relative error of "
                  "naive A/B averaging vs the exact mean in the last column).", "",
                  "| method | uplink bytes / client | vs plain | refusal % | exact match % | held-out loss | naive A/B error |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in wire_rows:
            ev = r["eval"]
            ratio = r["bytes_up_mean"] / plain["bytes_up_mean"] if plain else None
            naive = (r.get("lora_aggregation") or {}).get("naive_rel")
            lines.append(f"| {r['method']} | {r['bytes_up_mean']:,.0f} | {number(ratio, 3)}x | "
                         f"{number(ev.get('refusal_rate'))} | {number(ev.get('exact_match'))} | "
                         f"{number(ev.get('eval_loss'), 4)} | {number(naive, 4)} |")
        atomic_write_bytes(out_dir / "bytes_vs_utility.png", _wire_plot(wire_rows))
        lines += ["", "![bytes vs utility](bytes_vs_utility.png)", ""]
    report = out_dir / "study.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "study.json", json.dumps(
        [{**{k: v for k, v in r.items() if k != "eval"},
          "eval": {k: r["eval"].get(k) for k in EVAL_SCALARS if k in r["eval"]}} for r in rows],
        indent=2, sort_keys=True) + "\n")
    return report


def _summary_table(rows: list[dict], scenarios: list[str]) -> list[str]:
    """Rules x scenarios: refusal % · held-out loss (docs/guide/aggregation.md's summary comes from here)."""
    if not scenarios:
        return []
    cell = {(r["scenario"], r["method"]): r["eval"] for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["## Summary: refusal % · held-out loss", "",
             "| method | " + " | ".join(scenarios) + " |", "|---|" + "---:|" * len(scenarios)]
    for m in methods:
        cells = [(f"{number(ev.get('refusal_rate'))} · {number(ev.get('eval_loss'), 3)}" if (ev := cell.get((s, m)))
                  else "–") for s in scenarios]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


# (metric, axis label, bars from 0 on a shared axis; else points on each panel's own axis, for a loss whose
# spread between rules is small next to the blow-ups some attacks cause)
_PLOTS = (("refusal_rate", "refusal rate (%)", True), ("eval_loss", "held-out loss", False))


def _rules_plot(rows: list[dict], scenarios: list[str], key: str, label: str, base_value, bars: bool) -> bytes:
    plt = pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = min(3, len(scenarios))
    nrows = (len(scenarios) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 0.32 * len(methods) * nrows + 1.2 * nrows),
                             sharex=bars, squeeze=False)
    flat = [ax for line in axes for ax in line]
    colours = ["tab:green" if m == BENIGN_ONLY else "tab:purple" if m == PROBE_ROW else "tab:blue" for m in methods]
    for ax, s in zip(flat, scenarios):
        vals = {r["method"]: r["eval"].get(key) for r in rows if r["scenario"] == s}
        ys = list(range(len(methods)))
        if bars:
            ax.barh(ys, [vals.get(m) or 0.0 for m in methods], color=colours)
        else:
            shown = [(y, vals[m], c) for y, m, c in zip(ys, methods, colours) if vals.get(m) is not None]
            ax.scatter([v for _, v, _ in shown], [y for y, _, _ in shown], c=[c for *_, c in shown], zorder=3)
        ax.set_yticks(ys, methods, fontsize=8)
        ax.invert_yaxis()
        if base_value is not None:
            ax.axvline(base_value, color="grey", ls="--", lw=1, label="base model")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(s, fontsize=10)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    for ax in flat[len(scenarios):]:
        ax.axis("off")
    fig.tight_layout()
    return png_bytes(fig)


def _wire_plot(rows: list[dict]) -> bytes:
    """Per wire format: uplink bytes (bars, log axis) beside held-out loss and exact match (points)."""
    plt = pyplot()
    names = [r["method"].removeprefix("codec:") for r in rows]
    ys = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.45 * len(rows) + 1.4), sharey=True)
    axes[0].barh(ys, [r["bytes_up_mean"] / 1e3 for r in rows], color="tab:blue")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("uplink KB per client per round (log)")
    for ax, key, label in ((axes[1], "eval_loss", "held-out loss"), (axes[2], "exact_match", "exact match (%)")):
        shown = [(y, r["eval"][key]) for y, r in zip(ys, rows) if r["eval"].get(key) is not None]
        ax.scatter([v for _, v in shown], [y for y, _ in shown], color="tab:orange", zorder=3)
        ax.set_xlabel(label)
    axes[0].set_yticks(ys, names, fontsize=9)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)
