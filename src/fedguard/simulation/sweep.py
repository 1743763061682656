"""Sweeps: one base config, a grid of benign:malicious ratios x defense levels, one comparison report.

Each cell is an ordinary run directory under the sweep folder; a cell that already finished is not
run again, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fedguard.config import ConfigError, ExperimentConfig, build_config
from fedguard.io import atomic_write_bytes, atomic_write_text, read_ndjson
from fedguard.simulation.runner import FINAL_METRICS_FILE, METRICS_FILE, run_experiment


def parse_ratio(text: str, num_clients: int) -> int:
    """'8:2' -> number of malicious clients out of ``num_clients``."""
    try:
        benign, malicious = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"ratio '{text}' must look like BENIGN:MALICIOUS, e.g. 8:2") from None
    if benign < 0 or malicious < 0 or benign + malicious == 0:
        raise ConfigError(f"ratio '{text}' needs non-negative parts that are not both zero")
    return round(num_clients * malicious / (benign + malicious))


def cell_config(base: ExperimentConfig, ratio: str, level: str) -> ExperimentConfig:
    raw = base.model_dump(mode="json")
    raw["name"] = f"{base.name}-{ratio.replace(':', 'to')}-{level}"
    raw["attack"]["malicious_clients"] = parse_ratio(ratio, base.federation.num_clients)
    raw["defense"]["level"] = level
    return build_config(raw)


def _detection(records: list[dict[str, Any]]) -> dict[str, float | None]:
    dets = [r["defense"]["detection"] for r in records if r.get("defense", {}).get("detection")]
    out = {}
    for key in ("tpr", "fpr", "auroc"):
        vals = [d[key] for d in dets if d.get(key) is not None]
        out[key] = statistics.fmean(vals) if vals else None
    return out


def run_sweep(base: ExperimentConfig, ratios: list[str], levels: list[str], out_dir: Path, quiet: bool = False) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for ratio in ratios:
        for level in levels:
            cfg = cell_config(base, ratio, level)
            run_dir = out_dir / cfg.name
            if not (run_dir / FINAL_METRICS_FILE).is_file():
                run_experiment(cfg, run_dir, resume=run_dir.exists(), quiet=quiet)
            final = json.loads((run_dir / FINAL_METRICS_FILE).read_text())
            records = read_ndjson(run_dir / METRICS_FILE)
            rows.append({"ratio": ratio, "level": level, "run": cfg.name, "final": final, "records": records,
                         "detection": _detection(records)})
    return write_sweep_report(base, rows, out_dir)


def _plot(rows: list[dict[str, Any]], key: str, ylabel: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(dict.fromkeys(r["ratio"] for r in rows))
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 3.6), sharey=True, squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for r in rows:
            if r["ratio"] != ratio:
                continue
            pts = [(x["round"], x["eval"][key]) for x in r["records"] if key in x.get("eval", {})]
            if pts:
                ax.plot(*zip(*pts), "o-", label=r["level"])
        ax.set_title(f"benign:malicious {ratio}", fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_sweep_report(base: ExperimentConfig, rows: list[dict[str, Any]], out_dir: Path) -> Path:
    def f(v, nd=1):
        return "–" if v is None else f"{v:.{nd}f}"

    atomic_write_bytes(out_dir / "refusal_rate.png", _plot(rows, "refusal_rate", "refusal rate (%)"))
    atomic_write_bytes(out_dir / "exact_match.png", _plot(rows, "exact_match", "exact match (%)"))
    lines = [f"# fedguard sweep: {base.name}", "",
             f"Model `{base.model.name_or_path}`, {base.federation.num_clients} clients, {base.federation.rounds} rounds, "
             f"attack `{base.attack.kind}`. Detection columns are means over rounds (flagged: weight < 0.5).", "",
             "| benign:malicious | defense | refusal before | refusal after | exact match after | held-out loss after "
             "| TPR | FPR | AUROC | run |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        b, a, det = r["final"].get("before", {}), r["final"].get("after", {}), r["detection"]
        lines.append(f"| {r['ratio']} | {r['level']} | {f(b.get('refusal_rate'))} | {f(a.get('refusal_rate'))} | "
                     f"{f(a.get('exact_match'))} | {f(a.get('eval_loss'), 4)} | {f(det['tpr'], 2)} | {f(det['fpr'], 2)} | "
                     f"{f(det['auroc'], 2)} | [{r['run']}]({r['run']}/report.md) |")
    lines += ["", "![refusal rate per round](refusal_rate.png)", "", "![exact match per round](exact_match.png)", ""]
    report = out_dir / "sweep.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(out_dir / "sweep.json", json.dumps(
        [{k: v for k, v in r.items() if k != "records"} for r in rows], indent=2, sort_keys=True) + "\n")
    return report
