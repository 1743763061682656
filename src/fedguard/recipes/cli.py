"""`fedguard run | resume | report | compare | show-config | init | prepare-model | sweep | aggregator-study |
probe build`: runs, and the recipes and artifacts built from many runs.

Each handler imports what it runs when it runs (lazy imports), so `fedguard --help`, `show-config` and a config
error answer in 0.4 s instead of the 3 s that importing torch and transformers takes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedguard.config import DEFENSE_LEVELS, ConfigError, add_config_arguments, load_config, shipped_configs
from fedguard.io import atomic_write_text, read_ndjson
from fedguard.run_dir import FINAL_METRICS_FILE, METRICS_FILE, console_log, load_run_config


def register(sub) -> None:
    _run_parsers(sub)
    _study_parsers(sub)


def _run_parsers(sub) -> None:
    """One run: run, resume, report, compare; configs and the model: show-config, init, prepare-model."""
    run = sub.add_parser("run", help="run an experiment from a YAML config",
                         description="Run an experiment. Writes a run directory with the resolved config, "
                                     "per-round metrics (NDJSON), PEFT checkpoints, final metrics and a report.")
    add_config_arguments(run, help="experiment YAML, or a shipped config by name (tiny, default, ...)")
    run.add_argument("--run-dir", type=Path, default=None, help="write here instead of OUTPUT_DIR/NAME-TIMESTAMP")
    run.add_argument("--quiet", action="store_true", help="no progress bars or console logs (run.log still written)")
    run.add_argument("--engine", choices=("embedded", "flower-sim"), default="embedded",
                     help="embedded: every client in this process (default); flower-sim: Flower's ServerApp and "
                          "ClientApp through Flower's simulation runtime (Ray), the same result for the same config")
    run.add_argument("--stop-after-round", type=int, default=None, help=argparse.SUPPRESS)
    run.set_defaults(handler=_run)

    res = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint",
                         description="Continue a run from its last complete checkpoint; the result equals an "
                                     "uninterrupted run of the same config.")
    res.add_argument("run_dir", type=Path)
    res.add_argument("--quiet", action="store_true")
    res.add_argument("--stop-after-round", type=int, default=None, help=argparse.SUPPRESS)
    res.set_defaults(handler=_resume)

    rep = sub.add_parser("report", help="rebuild the report of a finished run from its metrics")
    rep.add_argument("run_dir", type=Path)
    rep.set_defaults(handler=_report)

    cmp_ = sub.add_parser("compare", help="two finished runs side by side, with the paired test on the same prompts")
    cmp_.add_argument("run_a", type=Path)
    cmp_.add_argument("run_b", type=Path)
    cmp_.set_defaults(handler=_compare)

    show = sub.add_parser("show-config", help="print the resolved, validated config (defaults filled in)")
    add_config_arguments(show, nargs="?", default=None, help="experiment YAML (omit for the defaults)")
    show.set_defaults(handler=_show_config)

    init = sub.add_parser("init", help="write the shipped example configs (tiny, default, ...) into a folder to edit")
    init.add_argument("dir", type=Path, nargs="?", default=Path("configs"))
    init.add_argument("--force", action="store_true", help="overwrite configs that are already there")
    init.set_defaults(handler=_init)
    prep = sub.add_parser("prepare-model", help="convert the embedded model to a cached safetensors folder")
    prep.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    prep.set_defaults(handler=_prepare_model)


def _study_parsers(sub) -> None:
    """Many runs and the artifacts they share: sweep, aggregator-study, probe build."""
    sw = sub.add_parser("sweep", help="benign:malicious ratios x defense levels, one comparison report",
                        description="Run one config over a grid of benign:malicious ratios and defense levels; "
                                    "writes every run plus sweep.md (table + plots). Finished cells are reused.")
    add_config_arguments(sw)
    sw.add_argument("--ratios", default=None, help="comma-separated BENIGN:MALICIOUS ratios (default: sweep.ratios)")
    sw.add_argument("--levels", default=None, help="comma-separated defense levels (default: sweep.levels)")
    sw.add_argument("--attacks", default=None,
                    help="comma-separated attack kinds (default: sweep.attacks, else attack.kind)")
    sw.add_argument("--aggregators", default=None,
                    help="comma-separated server.aggregator names (default: sweep.aggregators, else server.aggregator)")
    sw.add_argument("--jobs", type=int, default=1,
                    help="cells run in parallel processes (each loads the model; useful on a GPU or many cores)")
    sw.add_argument("--out", type=Path, default=None, help="sweep folder (default: OUTPUT_DIR/NAME-sweep)")
    sw.add_argument("--report-only", action="store_true", help="report the finished cells; run nothing")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(handler=_sweep)

    st = sub.add_parser("aggregator-study", help="every aggregation rule on the same one-round client updates",
                        description="Per scenario (ATTACK@BENIGN:MALICIOUS) every client trains once from the base "
                                    "adapter; each rule, the LoRA-Probe client level and the benign-only reference "
                                    "aggregate those same updates and are evaluated. Then wire formats vs utility on "
                                    "the all-benign federation. Writes study.md (tables + plots); rows already "
                                    "measured in --out are reused.")
    add_config_arguments(st)
    st.add_argument("--scenarios", default=None,
                    help="comma-separated ATTACK@BENIGN:MALICIOUS (default: aggregator_study.scenarios)")
    st.add_argument("--aggregators", default=None, help="comma-separated rules (default: aggregator_study.aggregators)")
    st.add_argument("--codecs", default=None, help="comma-separated wire formats, '' for none "
                                                   "(default: aggregator_study.codecs)")
    st.add_argument("--out", type=Path, default=None, help="study folder (default: OUTPUT_DIR/NAME)")
    st.add_argument("--quiet", action="store_true")
    st.set_defaults(handler=_aggregator_study)

    probe = sub.add_parser("probe", help="LoRA-Probe commands (build)")
    probe_sub = probe.add_subparsers(dest="probe_command", metavar="PROBE_COMMAND")
    pb = probe_sub.add_parser("build", help="train the LoRA-Probe for a run config (same model, LoRA, A-seed, lr)",
                              description="Generate labelled ΔLoRA features by local training from θ₀ on the built-in "
                                          "probe split (benign vs harmful), train the probe, report held-out "
                                          "AUROC / precision / recall / F1 / FPR, and save the artifact.")
    add_config_arguments(pb)
    pb.add_argument("--out", type=Path, default=None, help="artifact folder (default: the cache, keyed by config)")
    pb.add_argument("--compare-selections", action="store_true",
                    help="also report held-out detection for every feature selection on the same snapshots")
    pb.set_defaults(handler=_probe_build)
    probe.set_defaults(handler=lambda args: probe.print_help() or 2)


def _run(args) -> int:
    # lazy: the run loop imports torch and transformers (3 s); --help and config errors never need them
    from fedguard.simulation.runner import run_experiment

    cfg = load_config(args.config, args.overrides)
    if args.engine == "flower-sim":
        if args.stop_after_round is not None:
            raise ConfigError("--stop-after-round is for the embedded engine")
        # lazy: Flower and Ray, only for this engine
        from fedguard.flower.simulation import run_flower_simulation

        result = run_flower_simulation(cfg, args.run_dir)
    else:
        result = run_experiment(cfg, args.run_dir, stop_after_round=args.stop_after_round, quiet=args.quiet)
    print(f"report: {result.report}")
    print(f"run directory: {result.run_dir}")
    return 0


def _resume(args) -> int:
    # lazy: the run loop imports torch and transformers (3 s)
    from fedguard.simulation.runner import run_experiment

    cfg = load_run_config(args.run_dir)
    result = run_experiment(cfg, args.run_dir, resume=True, stop_after_round=args.stop_after_round, quiet=args.quiet)
    print(f"report: {result.report}")
    return 0


def _report(args) -> int:
    # lazy: the report draws with matplotlib
    from fedguard.reporting.report import write_report

    cfg = load_run_config(args.run_dir)
    final_path = args.run_dir / FINAL_METRICS_FILE
    if not final_path.is_file():
        raise ConfigError(f"{args.run_dir} has not finished (no {FINAL_METRICS_FILE}); resume it first")
    final = json.loads(final_path.read_text(encoding="utf-8"))
    print(write_report(args.run_dir, cfg, read_ndjson(args.run_dir / METRICS_FILE), final))
    return 0


def _compare(args) -> int:
    # lazy: reading runs imports torch (through fedguard.evaluation)
    from fedguard.reporting.runs import compare_runs

    print("\n".join(compare_runs(args.run_a, args.run_b)))
    return 0


def _show_config(args) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _init(args) -> int:
    args.dir.mkdir(parents=True, exist_ok=True)
    for name, text in shipped_configs().items():
        path = args.dir / f"{name}.yaml"
        if path.exists() and not args.force:
            print(f"kept {path} (exists; --force overwrites)")
            continue
        atomic_write_text(path, text)
        print(f"wrote {path}")
    return 0


def _prepare_model(args) -> int:
    # lazy: the registry converts with torch
    from fedguard.model.registry import resolve_model_path

    print(resolve_model_path(args.name))
    return 0


def _sweep(args) -> int:
    # lazy: the sweep runs the loop (torch)
    from fedguard.recipes.sweep import run_sweep

    cfg = load_config(args.config, args.overrides)

    def listed(flag: str | None, default):
        return [x.strip() for x in flag.split(",") if x.strip()] if flag else default

    levels = listed(args.levels, list(cfg.sweep.levels))
    bad = [lv for lv in levels if lv not in DEFENSE_LEVELS]
    if bad:
        raise ConfigError(f"--levels: unknown defense level(s) {bad}")
    out = args.out or Path(cfg.output_dir) / f"{cfg.name}-sweep"
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    t0 = time.perf_counter()
    report = run_sweep(cfg, listed(args.ratios, list(cfg.sweep.ratios)), levels, out, quiet=args.quiet,
                       attacks=listed(args.attacks, cfg.sweep.attacks), jobs=args.jobs,
                       aggregators=listed(args.aggregators, cfg.sweep.aggregators), report_only=args.report_only,
                       benign_only=cfg.sweep.benign_only)
    for line in json.loads((report.parent / "sweep.json").read_text(encoding="utf-8"))["headline"]:
        print(f"\n{line}")
    print(f"\nsweep report: {report}")
    print(f"done in {_duration(time.perf_counter() - t0)} (cells already finished are not run again)")
    return 0


def _duration(seconds: float) -> str:
    m, sec = divmod(round(seconds), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def _aggregator_study(args) -> int:
    # lazy: the study trains (torch)
    from fedguard.recipes.aggregator_study import run_aggregator_study

    cfg = load_config(args.config, args.overrides)

    def given(flag: str | None) -> list[str] | None:
        return None if flag is None else [x.strip() for x in flag.split(",") if x.strip()]

    out = args.out or Path(cfg.output_dir) / cfg.name
    report = run_aggregator_study(cfg, out, quiet=args.quiet, scenarios=given(args.scenarios),
                                  aggregators=given(args.aggregators), codecs=given(args.codecs))
    print(f"study report: {report}")
    return 0


def _probe_build(args) -> int:
    # lazy: the probe build trains on the model (torch, transformers)
    from fedguard.alignment import load_start_model
    from fedguard.defenses.build import build_probe
    from fedguard.federated.client import LocalTrainer
    from fedguard.model import attach_lora

    cfg, out, compare = load_config(args.config, args.overrides), args.out, args.compare_selections
    console_log()
    loaded = load_start_model(cfg.model)
    peft_model, slot = attach_lora(loaded.model, cfg.lora)
    theta0 = slot.read()
    probe, path, comparison = build_probe(cfg, loaded, LocalTrainer(loaded, peft_model, slot), theta0, out, compare)
    m = probe.metrics
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"probe: {path}")
    print(f"threshold tau {probe.threshold:.4f} ({m.get('calibration', 'fixed')})")
    for level in ("client", "shadow"):
        if f"{level}_level" in m:
            r = m[f"{level}_level"]
            print(f"  {level} level: tau {probe.threshold_for(level):.4f}; held-out clients TPR {f(r['recall'])}, "
                  f"FPR {f(r['fpr'])} ({r['tp'] + r['fn']} malicious, {r['fp'] + r['tn']} benign trainings)")
    print(f"unseen clients ({m['samples']['heldout']} step samples): AUROC {f(m['auroc'])}, TPR {f(m['recall'])}, "
          f"FPR {f(m['fpr'])} at tau; precision {f(m['precision'])}; benign-client FPR {f(m['benign_client_fpr'])}")
    for name, label in (("leave_categories_out", "unseen harm categories"), ("leave_styles_out", "unseen response styles")):
        r = m.get(name)
        if r:
            print(f"{label} ({len(r['folds'])} folds, worst fold): AUROC {f(r['auroc_min'])}, TPR {f(r['tpr_min'])}, "
                  f"FPR {f(r['fpr_max'])} at each fold's calibrated tau")
    if m.get("transfer_source"):
        t = m["transfer_source"]
        print(f"transfer to {t['source']} ({t['malicious_samples']} samples, never trained on): AUROC {f(t['auroc'])}, "
              f"TPR {f(t['tpr'])}, FPR {f(t['fpr'])} at tau")
    for sel, r in comparison.items():
        print(f"  selection {sel:<11} dim {r['dim']:>7}  AUROC {r['auroc']:.4f}  recall {r['recall']}  fpr {r['fpr']}")
    return 0
