"""Sweeps: one base config, a grid of attacks x benign:malicious ratios x defense levels, one report.

Each cell is an ordinary run directory under the sweep folder; a cell that already finished is not
run again, so an interrupted sweep continues where it stopped. With ``jobs > 1`` cells run in
separate processes (each loads the model once); the probe is built before they start, so that
parallel cells share one cached probe instead of racing to build it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fedguard.config import ConfigError, ExperimentConfig, build_config, differing_fields
from fedguard.io import atomic_write_bytes, atomic_write_text, read_ndjson
from fedguard.reporting.figures import png_bytes, pyplot
from fedguard.simulation.runner import CONFIG_FILE, FINAL_METRICS_FILE, METRICS_FILE, load_run_config, run_experiment


def parse_ratio(text: str, num_clients: int) -> int:
    """'8:2' -> number of malicious clients out of ``num_clients``."""
    try:
        benign, malicious = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"ratio '{text}' must look like BENIGN:MALICIOUS, e.g. 8:2") from None
    if benign < 0 or malicious < 0 or benign + malicious == 0:
        raise ConfigError(f"ratio '{text}' needs non-negative parts that are not both zero")
    return round(num_clients * malicious / (benign + malicious))


def cell_config(base: ExperimentConfig, ratio: str, level: str, attack: str | None = None,
                aggregator: str | None = None) -> ExperimentConfig:
    """One cell of the grid; ``attack`` (an attack kind) and ``aggregator`` also go into the run's name
    when given."""
    raw = base.model_dump(mode="json")
    raw.pop("sweep")  # a cell is one run: the grid (or study) it belongs to is not part of its config
    raw.pop("aggregator_study")
    tag = "".join(f"-{x}" for x in (aggregator, attack) if x)
    raw["name"] = f"{base.name}{tag}-{ratio.replace(':', 'to')}-{level}"
    raw["attack"]["malicious_clients"] = parse_ratio(ratio, base.federation.num_clients)
    if attack:
        raw["attack"]["kind"] = attack
    if aggregator:
        raw["server"]["aggregator"] = aggregator
    raw["defense"]["level"] = level
    return build_config(raw)


def _detection(records: list[dict[str, Any]]) -> dict[str, float | None]:
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


def _run_cell(raw: dict[str, Any], run_dir: str, quiet: bool, threads: int) -> None:
    """Worker entry point (a fresh process): run one cell."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    run_dir_p = Path(run_dir)
    run_experiment(build_config(raw), run_dir_p, resume=run_dir_p.exists(), quiet=quiet)


def _check_same_config(cfg: ExperimentConfig, run_dir: Path) -> None:
    """A cell folder is reused (or resumed) only for the very config that made it."""
    if not (run_dir / CONFIG_FILE).is_file():
        return
    old = load_run_config(run_dir).model_dump(mode="json")
    new = cfg.model_dump(mode="json")
    if old != new:
        diff = differing_fields(old, new)
        raise ConfigError(f"{run_dir} was made by a different config ({', '.join(diff[:6])}"
                          f"{' ...' if len(diff) > 6 else ''} differ); pass another --out or remove that folder")


def run_sweep(base: ExperimentConfig, ratios: list[str], levels: list[str], out_dir: Path, quiet: bool = False,
              attacks: list[str] | None = None, jobs: int = 1, report_only: bool = False,
              aggregators: list[str] | None = None) -> Path:
    """Run every unfinished cell, then write the report; ``report_only`` reports the finished cells
    and runs nothing (to look at a sweep still running elsewhere)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = [(attack, ratio, level, cell_config(base, ratio, level, attack, aggregator))
             for aggregator in (aggregators or [None]) for attack in (attacks or [None])
             for ratio in ratios for level in levels]
    for *_, cfg in cells:
        _check_same_config(cfg, out_dir / cfg.name)
    todo = [(cfg, out_dir / cfg.name) for *_, cfg in cells if not (out_dir / cfg.name / FINAL_METRICS_FILE).is_file()]
    if report_only:
        cells = [c for c in cells if not any(c[3] is cfg for cfg, _ in todo)]
        if not cells:
            raise ConfigError(f"no cell of this sweep has finished in {out_dir}")
    elif jobs > 1 and len(todo) > 1:
        _run_parallel(todo, jobs, quiet)
    else:
        for cfg, run_dir in todo:
            run_experiment(cfg, run_dir, resume=run_dir.exists(), quiet=quiet)
    rows = []
    for attack, ratio, level, cfg in cells:
        run_dir = out_dir / cfg.name
        final = json.loads((run_dir / FINAL_METRICS_FILE).read_text())
        records = read_ndjson(run_dir / METRICS_FILE)
        rows.append({"aggregator": cfg.server.aggregator, "attack": attack or cfg.attack.kind, "ratio": ratio,
                     "level": level, "run": cfg.name,
                     "final": final, "records": records, "detection": _detection(records)})
    return write_sweep_report(base, rows, out_dir)


def _run_parallel(todo: list[tuple[ExperimentConfig, Path]], jobs: int, quiet: bool) -> None:
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    from fedguard.simulation.runner import ensure_probe, needs_probe

    # Cells differ only in attack, ratio, level and aggregator, none of which the probe depends on, so
    # they share one probe: build it once, here,
    # before the workers look for it in the cache.
    first = next((c for c, _ in todo if needs_probe(c)), None)
    if first is not None:
        ensure_probe(first)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_run_cell, cfg.model_dump(mode="json"), str(run_dir), True, threads)
                   for cfg, run_dir in todo]
        for fut in futures:
            fut.result()  # a failed cell fails the sweep, with its traceback


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


def _plot(rows: list[dict[str, Any]], key: str, ylabel: str) -> bytes:
    plt = pyplot()
    several = len({r["attack"] for r in rows}) > 1
    several_aggregators = len({r["aggregator"] for r in rows}) > 1
    panels = list(dict.fromkeys(_panel(r, several) for r in rows))
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), sharey=True, squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax, panel in zip(flat, panels):
        for r in rows:
            if _panel(r, several) != panel:
                continue
            pts = [(x["round"], v) for x in r["records"] if (v := _series(x, key)) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=_label(r, several_aggregators))
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    for ax in flat[len(panels):]:
        ax.axis("off")
    for line in axes:
        line[0].set_ylabel(ylabel)
    fig.tight_layout()
    return png_bytes(fig)


PLOTS = (("refusal_rate", "refusal rate (%)"), ("exact_match", "exact match (%)"), ("eval_loss", "held-out loss"),
         ("tpr", "malicious clients flagged (TPR %)"), ("fpr", "benign clients flagged (FPR %)"))


def write_sweep_report(base: ExperimentConfig, rows: list[dict[str, Any]], out_dir: Path) -> Path:
    def f(v, nd=1):
        return "–" if v is None else f"{v:.{nd}f}"

    for key, label in PLOTS:
        atomic_write_bytes(out_dir / f"{key}.png", _plot(rows, key, label))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    aggregators = list(dict.fromkeys(r["aggregator"] for r in rows))
    lines = [f"# fedguard sweep: {base.name}", "",
             f"Model `{base.model.name_or_path}`, {base.federation.num_clients} clients "
             f"({base.federation.clients_per_round} per round), {base.federation.rounds} rounds, "
             f"{base.train.local_steps} local steps, aggregator {', '.join(f'`{a}`' for a in aggregators)}, "
             f"attack {', '.join(f'`{a}`' for a in attacks)}. Refusal rate = rule score on "
             f"{base.eval.harmful_prompts} held-out harmful prompts (higher is safer); exact match and held-out loss "
             "measure utility. Detection columns are means over rounds of the probe defense (flagged: weight < 0.5) "
             "or, without one, of the rule's screening (screened out: kept in less than half); uplink is per "
             "client per round, time per round (means).", "",
             "| aggregator | attack | benign:malicious | defense | refusal before | refusal after | over-refusal after "
             "| exact match after | held-out loss after | TPR | FPR | AUROC | uplink KB / client | s / round | run |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        b, a, det = r["final"].get("before", {}), r["final"].get("after", {}), r["detection"]
        up = _per_round_mean(r["records"], "bytes_up_mean")  # per client per round
        lines.append(f"| {r['aggregator']} | {r['attack']} | {r['ratio']} | {r['level']} | {f(b.get('refusal_rate'))} | "
                     f"{f(a.get('refusal_rate'))} | {f(a.get('overrefusal_rate'))} | {f(a.get('exact_match'))} | "
                     f"{f(a.get('eval_loss'), 4)} | "
                     f"{f(det['tpr'], 2)} | {f(det['fpr'], 2)} | {f(det['auroc'], 2)} | "
                     f"{f(None if up is None else up / 1e3)} | {f(_per_round_mean(r['records'], 'round_seconds'))} | "
                     f"[{r['run']}]({r['run']}/report.md) |")
    lines += [""] + [f"![{label} per round]({key}.png)\n" for key, label in PLOTS]
    report = out_dir / "sweep.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(out_dir / "sweep.json", json.dumps(
        [{k: v for k, v in r.items() if k != "records"} for r in rows], indent=2, sort_keys=True) + "\n")
    return report
