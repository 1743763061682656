"""Sweeps: one base config, a grid of attacks x benign:malicious ratios x defense levels, one report.

Each cell is an ordinary run directory under the sweep folder; a cell that already finished is not
run again, so an interrupted sweep continues where it stopped. With ``jobs > 1`` cells run in
separate processes (each loads the model once); the probe is built before they start, so that
parallel cells share one cached probe instead of racing to build it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedguard.config import ConfigError, ExperimentConfig, build_config, differing_fields
from fedguard.factories import ensure_probe, needs_probe
from fedguard.reporting.runs import finished_run
from fedguard.reporting.sweep import REFERENCE, detection, write_sweep_report
from fedguard.run_dir import CONFIG_FILE, FINAL_METRICS_FILE, load_run_config
from fedguard.simulation.runner import run_experiment


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
                aggregator: str | None = None, name: str | None = None) -> ExperimentConfig:
    """One cell of the grid; ``attack`` (an attack kind) and ``aggregator`` also go into the run's name
    when given."""
    raw = base.model_dump(mode="json")
    raw.pop("sweep")  # a cell is one run: the grid (or study) it belongs to is not part of its config
    raw.pop("aggregator_study")
    tag = "".join(f"-{x}" for x in (aggregator, attack) if x)
    raw["name"] = name or f"{base.name}{tag}-{ratio.replace(':', 'to')}-{level}"
    raw["attack"]["malicious_clients"] = parse_ratio(ratio, base.federation.num_clients)
    if attack:
        raw["attack"]["kind"] = attack
    if aggregator:
        raw["server"]["aggregator"] = aggregator
    raw["defense"]["level"] = level
    return build_config(raw)


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
              aggregators: list[str] | None = None, benign_only: bool = False) -> Path:
    """Run every unfinished cell, then write the report; ``report_only`` reports the finished cells
    and runs nothing (to look at a sweep still running elsewhere). ``benign_only`` adds, per aggregator,
    one run with every client benign and no defense: the reference the attacked runs are compared with."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = base.federation.num_clients
    cells = [(attack, ratio, level, cell_config(base, ratio, level, attack, aggregator))
             for aggregator in (aggregators or [None]) for attack in (attacks or [None])
             for ratio in ratios for level in levels
             # the reference below is this cell (attack kind is moot without attackers)
             if not (benign_only and level == "none" and parse_ratio(ratio, n) == 0)]
    if benign_only:
        cells = [(REFERENCE, f"{n}:0", "none",
                  cell_config(base, f"{n}:0", "none", aggregator=aggregator,
                              name=f"{base.name}{'-' + aggregator if aggregator else ''}-benign-only"))
                 for aggregator in (aggregators or [None])] + cells
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
        row = finished_run(out_dir / cfg.name)
        rows.append({**row, "aggregator": cfg.server.aggregator, "attack": attack or cfg.attack.kind, "ratio": ratio,
                     "level": level, "malicious": cfg.attack.malicious_clients,
                     "detection": detection(row["records"])})
    return write_sweep_report(base, rows, out_dir)


def _run_parallel(todo: list[tuple[ExperimentConfig, Path]], jobs: int, quiet: bool) -> None:
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

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
