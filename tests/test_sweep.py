import pytest

from conftest import tiny_config
from fedguard.config import ConfigError
from fedguard.simulation.sweep import cell_config, parse_ratio, run_sweep


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
