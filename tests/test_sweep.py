import pytest

from conftest import tiny_config
from fedguard.config import ConfigError
from fedguard.recipes.sweep import cell_config, parse_ratio, run_sweep


def test_ratio_parsing():
    assert [parse_ratio(r, 10) for r in ("10:0", "8:2", "5:5", "3:7")] == [0, 2, 5, 7]
    assert parse_ratio("1:1", 4) == 2
    for bad in ("8-2", "0:0", "-1:3"):
        with pytest.raises(ConfigError):
            parse_ratio(bad, 10)


def test_sweep_runs_every_cell_and_reuses_finished_ones(tmp_path):
    base = tiny_config(federation={"num_clients": 4, "clients_per_round": 4, "rounds": 1},
                       train={"local_steps": 2, "batch_size": 4, "lr": 1e-2, "lr_schedule": "constant"},
                       probe={"clients_per_class": 4, "rounds": 1, "examples_per_client": 16})
    assert cell_config(base, "2:2", "client").attack.malicious_clients == 2
    report = run_sweep(base, ["4:0", "2:2"], ["none", "client"], tmp_path / "sw", quiet=True)
    text = report.read_text()
    assert text.count("| 4:0 |") == 2 and text.count("| 2:2 |") == 2
    assert (tmp_path / "sw" / "refusal_rate.png").stat().st_size > 5000
    mtime = (tmp_path / "sw" / "t-2to2-client" / "final_metrics.json").stat().st_mtime
    run_sweep(base, ["2:2"], ["client"], tmp_path / "sw", quiet=True)
    assert (tmp_path / "sw" / "t-2to2-client" / "final_metrics.json").stat().st_mtime == mtime


def test_sweep_grid_from_config_attacks_aggregators_parallel_jobs_and_report_only(tmp_path):
    from test_defense import TINY_HARMFUL  # harmful data of a style the tiny model can tell apart

    base = tiny_config(federation={"num_clients": 4, "clients_per_round": 4, "rounds": 1},
                       train={"local_steps": 2, "batch_size": 4, "lr": 1e-2, "lr_schedule": "constant"},
                       attack={"source": TINY_HARMFUL},
                       probe={"clients_per_class": 4, "rounds": 1, "examples_per_client": 16,
                              "harmful_source": TINY_HARMFUL},
                       sweep={"ratios": ["2:2"], "levels": ["client"], "attacks": ["data_poisoning", "scaling"],
                              "aggregators": ["fedavg", "median"]})
    out = tmp_path / "sw"
    s = base.sweep
    with pytest.raises(ConfigError, match="no cell"):
        run_sweep(base, s.ratios, s.levels, out, quiet=True, attacks=s.attacks, report_only=True)
    report = run_sweep(base, s.ratios, s.levels, out, quiet=True, attacks=s.attacks, aggregators=s.aggregators,
                       jobs=2)
    rows = [line.split("|") for line in report.read_text().splitlines() if "| 2:2 | client |" in line]
    assert sorted((r[1].strip(), r[2].strip()) for r in rows) == [
        ("fedavg", "data_poisoning"), ("fedavg", "scaling"), ("median", "data_poisoning"), ("median", "scaling")]
    assert (out / "t-median-scaling-2to2-client" / "final_metrics.json").is_file()
    # Scaled updates are flagged by the client level in the parallel worker processes too.
    assert all(r[12].strip() == "1.00" for r in rows if r[2].strip() == "scaling")  # TPR
    assert all(float(r[15]) > 0 for r in rows)  # uplink KB per client per round
    # A cell folder made by another config is not silently reused.
    changed = base.model_copy(update={"seed": base.seed + 1})
    with pytest.raises(ConfigError, match="seed"):
        run_sweep(changed, ["2:2"], ["client"], out, quiet=True, attacks=["scaling"], aggregators=["median"])
    # The sweep section is not part of a cell: another grid reports the finished cells it shares.
    report = run_sweep(base, ["2:2"], ["client"], out, quiet=True, attacks=["scaling"], aggregators=["median"],
                       report_only=True)
    assert report.read_text().count("| 2:2 | client |") == 1


def test_sweep_config_section_is_validated():
    with pytest.raises(ConfigError, match="sweep.ratios"):
        tiny_config(sweep={"ratios": ["8-2"]})
    with pytest.raises(ConfigError, match="sweep.levels"):
        tiny_config(sweep={"levels": ["paranoid"]})


def test_sweep_compares_with_benign_only_on_the_same_prompts(tmp_path):
    """The reference run (every client benign, no defense), paired tests against it and against the undefended
    run, intervals, the headline and the summary figure."""
    import json

    base = tiny_config(federation={"num_clients": 4, "clients_per_round": 4, "rounds": 1},
                       train={"local_steps": 2, "batch_size": 4, "lr": 1e-2, "lr_schedule": "constant"},
                       attack={"kind": "scaling", "scale": 50.0},
                       eval={"harmful_prompts": 12, "overrefusal_prompts": 8, "benign_prompts": 4,
                             "loss_examples": 4, "max_new_tokens": 8},
                       probe={"clients_per_class": 4, "rounds": 1, "examples_per_client": 16})
    out = tmp_path / "sw"
    report = run_sweep(base, ["4:0", "2:2"], ["none", "client"], out, quiet=True, benign_only=True)
    summary = json.loads((out / "sweep.json").read_text())
    runs = {r["run"]: r for r in summary["runs"]}
    # 4:0 without defense is the reference itself: not run twice; 4:0 with the client level still runs
    assert set(runs) == {"t-benign-only", "t-4to0-client", "t-2to2-none", "t-2to2-client"}
    assert runs["t-benign-only"]["malicious"] == 0
    (c,) = summary["comparisons"]
    assert (c["undefended"], c["best"], c["reference"]) == ("t-2to2-none", "t-2to2-client", "t-benign-only")
    # the paired test counts prompts on which the two runs disagree, from their per-prompt verdicts
    refused = {name: [r for r in map(json.loads, (out / name / "metrics.ndjson").read_text().splitlines())
                      if "eval" in r][-1]["eval"]["refused"] for name in runs}
    a, b = refused["t-2to2-client"], refused["t-2to2-none"]
    t = c["best_vs_undefended"]
    assert (t["only_a"], t["only_b"]) == (sum(x > y for x, y in zip(a, b)), sum(y > x for x, y in zip(a, b)))
    assert 0.0 < t["p"] <= 1.0 and len(a) == 12
    (line,) = summary["headline"]
    assert line.startswith("With 2 of 4 clients malicious (`scaling`)") and "benign-only training" in line
    assert "exact McNemar p" in line
    text = report.read_text()
    assert text.startswith("# fedguard sweep: t\n\nWith 2 of 4 clients malicious")
    row = next(x.split("|") for x in text.splitlines() if "| 2:2 | client |" in x)
    assert row[5].strip().count("[") == 1 and row[10].strip().startswith(("+", "-"))  # interval; vs undefended
    assert (out / "summary.png").stat().st_size > 5000
    # Any two finished runs compare the same way; runs evaluated on other prompts are not paired.
    import shutil

    from fedguard.reporting.runs import compare_runs

    lines = compare_runs(out / "t-2to2-client", out / "t-2to2-none")
    assert lines[0].startswith("t-2to2-client: refusal") and "[" in lines[0]
    assert lines[-1].startswith(f"t-2to2-client vs t-2to2-none: {t['delta']:+.1f} points") and "McNemar" in lines[-1]
    other = tmp_path / "other"
    shutil.copytree(out / "t-2to2-none", other)
    records = [json.loads(x) for x in (other / "metrics.ndjson").read_text().splitlines()]
    records[-1]["eval"]["harmful_set"] = "another-set"
    (other / "metrics.ndjson").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert compare_runs(out / "t-2to2-client", other)[-1].startswith("not evaluated on the same harmful prompts")
    with pytest.raises(ConfigError, match="not a finished run"):
        compare_runs(out, other)
