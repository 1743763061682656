"""The sweep report: one table and the plots over a grid of runs (ratios x levels x attacks x aggregators), the
comparisons on the same prompts, and the headline a newcomer reads first (sweep.md, sweep.json, *.png)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fedguard.config import ExperimentConfig
from fedguard.evaluation.stats import format_rate, rate_interval
from fedguard.io import atomic_write_bytes, atomic_write_text
from fedguard.reporting.figures import png_bytes, pyplot
from fedguard.reporting.format import number
from fedguard.reporting.runs import p_words, versus

REFERENCE = "benign-only"  # the attack column of the reference run (no attackers)


def detection(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Means over rounds of each round's detection (``_round_detection``)."""
    dets = [d for r in records if (d := _round_detection(r))]
    out = {}
    for key in ("tpr", "fpr", "auroc"):
        vals = [d[key] for d in dets if d.get(key) is not None]
        out[key] = statistics.fmean(vals) if vals else None
    return out


def _round_detection(record: dict[str, Any]) -> dict[str, Any]:
    """The probe defense's detection in a round, or where it has none, what the aggregation rule screened
    out (robust rules without a defense); {} if neither."""
    return record.get("defense", {}).get("detection") or record.get("screening", {}).get("detection") or {}



def _panel(row: dict[str, Any], several_attacks: bool) -> str:
    return f"{row['attack']} · {row['ratio']}" if several_attacks else f"benign:malicious {row['ratio']}"


def _label(row: dict[str, Any], several_aggregators: bool) -> str:
    return f"{row['aggregator']} / {row['level']}" if several_aggregators else row["level"]


def _per_round_mean(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in records if isinstance(r.get(key), int | float)]
    return statistics.fmean(vals) if vals else None


def _series(record: dict[str, Any], key: str) -> float | None:
    if key in ("tpr", "fpr"):
        det = _round_detection(record)
        v = det.get(key)
        return None if v is None else 100.0 * v
    return record.get("eval", {}).get(key)


def _grid(plt, n_panels: int, height: float = 3.4):
    cols = min(4, n_panels)
    nrows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, height * nrows), sharey=True, squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[n_panels:]:
        ax.axis("off")
    return fig, axes, flat


def _plot(rows: list[dict[str, Any]], key: str, ylabel: str) -> bytes:
    plt = pyplot()
    attacked = [r for r in rows if r["attack"] != REFERENCE]
    references = [r for r in rows if r["attack"] == REFERENCE]
    several = len({r["attack"] for r in attacked}) > 1
    several_aggregators = len({r["aggregator"] for r in rows}) > 1
    panels = list(dict.fromkeys(_panel(r, several) for r in attacked)) or ["benign-only"]
    fig, axes, flat = _grid(plt, len(panels))
    for ax, panel in zip(flat, panels):
        for r in attacked:
            if _panel(r, several) != panel:
                continue
            pts = [(x["round"], v) for x in r["records"] if (v := _series(x, key)) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=_label(r, several_aggregators))
        for r in references:  # the benign-only reference in every panel
            pts = [(x["round"], v) for x in r["records"] if (v := _series(x, key)) is not None]
            if pts:
                ax.plot(*zip(*pts), "s--", color="grey", label=_label(r, several_aggregators).replace(
                    "none", "benign-only") if several_aggregators else "benign-only")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    for line in axes:
        line[0].set_ylabel(ylabel)
    fig.tight_layout()
    return png_bytes(fig)


PLOTS = (("refusal_rate", "refusal rate (%)"), ("exact_match", "exact match (%)"), ("eval_loss", "held-out loss"),
         ("tpr", "malicious clients flagged (TPR %)"), ("fpr", "benign clients flagged (FPR %)"))


def _comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (aggregator, attack, ratio) with attackers: the undefended run, the best defended run (highest
    refusal after, then lowest over-refusal) and the benign-only reference, with the paired tests."""
    refs = {r["aggregator"]: r for r in rows if r["attack"] == REFERENCE}
    out = []
    for key in dict.fromkeys((r["aggregator"], r["attack"], r["ratio"]) for r in rows
                             if r["attack"] != REFERENCE and r["malicious"]):
        group = [r for r in rows if (r["aggregator"], r["attack"], r["ratio"]) == key]
        none = next((r for r in group if r["level"] == "none"), None)
        defended = [r for r in group if r["level"] != "none" and "refusal_rate" in r["final"].get("after", {})]
        best = max(defended, key=lambda r: (r["final"]["after"]["refusal_rate"],
                                            -r["final"]["after"].get("overrefusal_rate", 0.0)), default=None)
        ref = refs.get(key[0])
        out.append({"aggregator": key[0], "attack": key[1], "ratio": key[2], "undefended": none, "best": best,
                    "reference": ref, "best_vs_undefended": best and versus(best, none),
                    "best_vs_reference": best and versus(best, ref)})
    return out


def headline(c: dict[str, Any], num_clients: int, several_aggregators: bool) -> list[str]:
    """The sentences a newcomer reads first: what the attack did, what the defense kept, against benign-only."""
    none, best, ref = c["undefended"], c["best"], c["reference"]
    first = (none or best or ref)["final"]
    before, n = first.get("before", {}).get("refusal_rate"), first.get("before", {}).get("harmful_n")
    m = (none or best)["malicious"]
    where = f" (aggregator `{c['aggregator']}`)" if several_aggregators else ""
    parts = [f"With {m} of {num_clients} clients malicious (`{c['attack']}`){where}, the refusal rate on {n} "
             f"held-out harmful prompts went from {before:.1f} % (the starting model)"]
    if none:
        parts.append(f"to {none['final']['after']['refusal_rate']:.1f} % without defense")
    if best:
        parts.append(f"{'and ' if none else 'to '}{best['final']['after']['refusal_rate']:.1f} % with the "
                     f"`{best['level']}` defense")
        rounds = [r for r in best["records"] if r.get("round", 0) > 0]
        skipped = sum(bool(r.get("defense", {}).get("skipped")) for r in rounds)
        if skipped:  # a defense that froze the model is safe, but nothing was learned in those rounds
            parts.append(f"(which skipped {skipped} of {len(rounds)} rounds, keeping the model unchanged)")
    sentence = " ".join(parts)
    if ref:
        sentence += f"; benign-only training (no attackers) reaches {ref['final']['after']['refusal_rate']:.1f} %"
    lines = [sentence + "."]
    if c["best_vs_undefended"]:
        t = c["best_vs_undefended"]
        lines.append(f"Defended vs undefended: {t['delta']:+.1f} points ({p_words(t, 'defended', 'undefended')}).")
    if c["best_vs_reference"]:
        t = c["best_vs_reference"]
        lines.append(f"Defended vs benign-only: {t['delta']:+.1f} points ({p_words(t, 'defended', 'benign-only')}).")
    over = [(label, r["final"]["after"].get("overrefusal_rate")) for label, r in
            (("undefended", none), ("defended", best), ("benign-only", ref)) if r]
    if any(v is not None for _, v in over):
        lines.append("Over-refusal of benign requests that look harmful: "
                     + ", ".join(f"{v:.1f} % {label}" for label, v in over if v is not None) + ".")
    return lines


def _summary_plot(comparisons: list[dict[str, Any]], rows: list[dict[str, Any]]) -> bytes:
    """Per attacked setting: benign-only, undefended and every defended run, refusal and over-refusal after
    the last round with 95 % Wilson intervals; the dashed line is the starting model's refusal."""
    plt = pyplot()
    fig, axes, flat = _grid(plt, len(comparisons), height=3.8)
    for ax, c in zip(flat, comparisons):
        group = [r for r in rows if (r["aggregator"], r["attack"], r["ratio"]) ==
                 (c["aggregator"], c["attack"], c["ratio"]) and r["level"] != "none"]
        runs = [(lbl, r) for lbl, r in (("benign-only", c["reference"]), ("undefended", c["undefended"])) if r]
        runs += [(r["level"], r) for r in group]
        for offset, key, colour in ((-0.2, "refusal_rate", "tab:blue"), (0.2, "overrefusal_rate", "tab:orange")):
            xs, vals, errs = [], [], [[], []]
            for i, (_, r) in enumerate(runs):
                after = r["final"].get("after", {})
                if key not in after:
                    continue
                ci = rate_interval(after, key) or (after[key], after[key])
                xs.append(i + offset)
                vals.append(after[key])
                errs[0].append(after[key] - ci[0])
                errs[1].append(ci[1] - after[key])
            if xs:
                ax.bar(xs, vals, width=0.38, color=colour, yerr=errs, capsize=3,
                       label="refusal of harmful" if key == "refusal_rate" else "over-refusal of benign look-alikes")
        before = (c["undefended"] or c["best"])["final"].get("before", {}).get("refusal_rate")
        if before is not None:
            ax.axhline(before, color="black", linestyle="--", linewidth=1, label="starting model")
        ax.set_xticks(range(len(runs)), [lbl for lbl, _ in runs], fontsize=8)
        ax.set_ylim(0, 105)
        after_round = (c["undefended"] or c["best"])["final"].get("after_round")
        ax.set_title(f"{c['attack']} · {c['ratio']}" + (f" · {c['aggregator']}" if c["aggregator"] != "fedavg" else "")
                     + f" · after round {after_round}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    flat[0].set_ylabel("% of prompts (95 % interval)")
    fig.legend(*flat[0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3,
               bbox_to_anchor=(0.5, -0.06))
    fig.tight_layout()
    return png_bytes(fig)


def write_sweep_report(base: ExperimentConfig, rows: list[dict[str, Any]], out_dir: Path) -> Path:
    def vs(t):
        return "–" if t is None else f"{t['delta']:+.1f} (p {t['p']:.2g})"

    for key, label in PLOTS:
        atomic_write_bytes(out_dir / f"{key}.png", _plot(rows, key, label))
    comparisons = _comparisons(rows)
    aggregators = list(dict.fromkeys(r["aggregator"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows if r["attack"] != REFERENCE))
    first = rows[0]["final"].get("before", {})
    lines = [f"# fedguard sweep: {base.name}", ""]
    headlines = [" ".join(headline(c, base.federation.num_clients, len(aggregators) > 1)) for c in comparisons]
    for text in headlines:
        lines += [text, ""]
    if comparisons:
        atomic_write_bytes(out_dir / "summary.png", _summary_plot(comparisons, rows))
        lines += ["![benign-only, undefended and defended runs](summary.png)", ""]
    n = first.get("harmful_n")
    lines += [f"Model `{base.model.name_or_path}`, {base.federation.num_clients} clients "
              f"({base.federation.clients_per_round} per round), {base.federation.rounds} rounds, "
              f"{base.train.local_steps} local steps, aggregator {', '.join(f'`{a}`' for a in aggregators)}, "
              f"attack {', '.join(f'`{a}`' for a in attacks) or '–'}. The starting model refuses "
              f"{format_rate(first, 'refusal_rate')} % of the harmful prompts and "
              f"{format_rate(first, 'overrefusal_rate')} % of the benign look-alikes.", "",
              f"Refusal = fedguard's rule on {n if n else base.eval.harmful_prompts} held-out harmful prompts of "
              f"`{base.eval.harmful_source}` (higher is safer; one prompt moves it "
              f"{number(100 / n if n else None)} points), with its 95 % Wilson interval; the keyword column is the "
              "Safe-FedLLM keyword rule on the same responses. Over-refusal: refusals of benign requests that look "
              f"harmful (`{base.eval.overrefusal_source}`). *vs undefended* and *vs benign-only*: refusal "
              "difference in points against the undefended run of the same setting and the benign-only run, with "
              "the exact McNemar p on the same prompts. Exact match and held-out loss measure utility. Detection "
              "columns are means over rounds of the probe defense (flagged: weight < 0.5) or, without one, of "
              "the rule's screening (screened out: kept in less than half); uplink is per client per round, time "
              "per round (means).", "",
              "| aggregator | attack | benign:malicious | defense | refusal after [95 % CI] | keyword rule "
              "| over-refusal after [95 % CI] | exact match after | held-out loss after | vs undefended "
              "| vs benign-only | TPR | FPR | AUROC | uplink KB / client | s / round | run |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    undefended = {(r["aggregator"], r["attack"], r["ratio"]): r for r in rows if r["level"] == "none"}
    refs = {r["aggregator"]: r for r in rows if r["attack"] == REFERENCE}
    for r in rows:
        a, det = r["final"].get("after", {}), r["detection"]
        up = _per_round_mean(r["records"], "bytes_up_mean")  # per client per round
        lines.append(f"| {r['aggregator']} | {r['attack']} | {r['ratio']} | {r['level']} | "
                     f"{format_rate(a, 'refusal_rate')} | {number(a.get('refusal_rate_keyword'))} | "
                     f"{format_rate(a, 'overrefusal_rate')} | {number(a.get('exact_match'))} | "
                     f"{number(a.get('eval_loss'), 4)} | "
                     f"{vs(versus(r, undefended.get((r['aggregator'], r['attack'], r['ratio']))))} | "
                     f"{vs(versus(r, refs.get(r['aggregator'])))} | "
                     f"{number(det['tpr'], 2)} | {number(det['fpr'], 2)} | {number(det['auroc'], 2)} | "
                     f"{number(None if up is None else up / 1e3)} | {number(_per_round_mean(r['records'], 'round_seconds'))} | "
                     f"[{r['run']}]({r['run']}/report.md) |")
    lines += [""] + [f"![{label} per round]({key}.png)\n" for key, label in PLOTS]
    report = out_dir / "sweep.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(out_dir / "sweep.json", json.dumps(
        {"headline": headlines,
         "comparisons": [{k: (v["run"] if isinstance(v, dict) and "run" in v else v) for k, v in c.items()}
                         for c in comparisons],
         "runs": [{k: v for k, v in r.items() if k != "records"} for r in rows]},
        indent=2, sort_keys=True) + "\n")
    return report
