import json

import pytest
import torch

from conftest import run_cli, tiny_config
from fedguard.config import ConfigError
from fedguard.io import read_ndjson


def _study_config(**study):
    return tiny_config(
        federation={"num_clients": 5, "clients_per_round": 5, "rounds": 1},
        train={"local_steps": 2, "batch_size": 4, "lr": 1e-2, "lr_schedule": "constant"},
        server={"expected_malicious": 1},
        attack={"scale": 50.0},
        # tau from the held-out probe clients: the tiny model's random weights make a calibration pool meaningless
        probe={"clients_per_class": 4, "rounds": 1, "examples_per_client": 16, "calibration_clients": 0},
        aggregator_study={"scenarios": ["scaling@4:1", "data_poisoning@4:1"],
                          "aggregators": ["fedavg", "median", "multikrum"], "codecs": ["none", "int8"], **study},
    )


def test_study_compares_rules_on_the_same_updates_and_reuses_rows(tmp_path):
    from fedguard.recipes.aggregator_study import run_aggregator_study

    cfg = _study_config()
    out = tmp_path / "study"
    report = run_aggregator_study(cfg, out, quiet=True)
    rows = read_ndjson(out / "rows.ndjson")
    keys = [(r["scenario"], r["method"]) for r in rows]
    methods = ["fedavg", "median", "multikrum", "fedavg+probe", "benign_only"]
    assert keys == [("base", "base")] + [(s, m) for s in ("scaling@4:1", "data_poisoning@4:1") for m in methods] \
        + [("none@1:0", "codec:none"), ("none@1:0", "codec:int8"), ("none@1:0", "product")]
    by = {k: r for k, r in zip(keys, rows)}
    scaled = {m: by[("scaling@4:1", m)] for m in methods}
    bad = scaled["fedavg"]["malicious"]
    assert len(bad) == 1
    # Multi-Krum screens the x50 update out; median does not screen, so it has no detection.
    assert scaled["multikrum"]["detection"]["tpr"] == 1.0 and scaled["multikrum"]["detection"]["fpr"] == 0.0
    assert scaled["multikrum"]["screening"][str(bad[0])] == 0.0
    assert scaled["median"]["detection"] is None
    assert scaled["fedavg+probe"]["detection"]["tpr"] == 1.0
    assert str(bad[0]) not in scaled["benign_only"]["accepted"] and len(scaled["benign_only"]["accepted"]) == 4
    # Every rule read the same messages: one uplink size; the x50 update moves FedAvg away from the benign-only
    # result, while the screened mean is the benign-only result.
    assert len({r["bytes_up_mean"] for m, r in scaled.items() if m != "benign_only"}) == 1
    target = scaled["benign_only"]["eval"]["eval_loss"]
    assert scaled["multikrum"]["eval"]["eval_loss"] == pytest.approx(target, abs=1e-6)
    assert abs(scaled["fedavg"]["eval"]["eval_loss"] - target) > 1e-3
    # Wire formats: int8 is smaller than plain fp32 (on the tiny model the header is a large part of
    # it); product averaging reports the naive error.
    wire = {m: by[("none@1:0", m)] for m in ("codec:none", "codec:int8", "product")}
    assert wire["codec:int8"]["bytes_up_mean"] < 0.7 * wire["codec:none"]["bytes_up_mean"]
    assert wire["codec:int8"]["compression"] == "int8" and wire["product"]["compression"] == "none"
    assert wire["product"]["lora_aggregation"]["naive_rel"] > 0
    text = report.read_text()
    assert "## scaling@4:1" in text and "| multikrum |" in text and "Wire formats" in text
    assert "| method | scaling@4:1 | data_poisoning@4:1 |" in text  # the rules x scenarios summary
    assert (out / "refusal_rate.png").stat().st_size > 5000 and (out / "bytes_vs_utility.png").is_file()
    assert json.loads((out / "study.json").read_text())[0]["method"] == "base"

    # Rows already measured are reused; a narrower list reports only its rows.
    run_aggregator_study(cfg, out, quiet=True, scenarios=["scaling@4:1"], aggregators=["median"], codecs=[])
    assert len(read_ndjson(out / "rows.ndjson")) == len(rows)
    # The folder belongs to its config.
    with pytest.raises(ConfigError, match="seed"):
        run_aggregator_study(cfg.model_copy(update={"seed": cfg.seed + 1}), out, quiet=True)


def test_benign_updates_are_trained_once_and_handed_out_as_copies(tiny_loaded):
    from fedguard.data.federation import build_client_data
    from fedguard.federated.client import LocalTrainer
    from fedguard.messages import RoundConfig
    from fedguard.recipes.aggregator_study import _TrainOnce

    loaded, peft_model, slot = tiny_loaded
    cfg = tiny_config()
    clients = build_client_data(cfg, loaded.tokenizer)
    once = _TrainOnce(LocalTrainer(loaded, peft_model, slot))
    theta0 = slot.read()
    rc = RoundConfig(server_round=1, lr=1e-2, local_steps=2, batch_size=4, grad_accum=1, seed=3)
    a = once.train(theta0, rc, clients[0])
    a.tensors = {k: v * 0 for k, v in a.tensors.items()}  # what an attacker does to its copy
    b = once.train(theta0, rc, build_client_data(cfg, loaded.tokenizer)[0])  # same data, rebuilt
    c = once.train(theta0, rc, clients[1])
    assert (once.trained, once.reused) == (2, 1)
    fresh = LocalTrainer(loaded, peft_model, slot).train(theta0, rc, clients[0])
    assert all(torch.equal(b.tensors[k], fresh.tensors[k]) for k in fresh.tensors)
    assert not all(torch.equal(b.tensors[k], c.tensors[k]) for k in c.tensors)


def test_study_flags_are_validated(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(_study_config().to_yaml())
    bad = run_cli("aggregator-study", str(cfg_path), "--scenarios", "scaling@4-1", "--out", str(tmp_path / "s"))
    assert bad.returncode == 2 and "aggregator_study.scenarios" in bad.stderr
    bad = run_cli("aggregator-study", str(cfg_path), "--aggregators", "krumm", "--out", str(tmp_path / "s"))
    assert bad.returncode == 2 and "aggregator_study.aggregators" in bad.stderr
    with pytest.raises(ConfigError, match="distinct"):
        _study_config(codecs=["int8", "int8"])


def test_study_survives_scenarios_without_benign_or_malicious_clients_and_a_torn_row(tmp_path):
    from fedguard.recipes.aggregator_study import run_aggregator_study

    cfg = _study_config(scenarios=["scaling@1:0", "data_poisoning@0:1"], aggregators=["krum"], codecs=[],
                        product=False)
    out = tmp_path / "study"
    run_aggregator_study(cfg, out, quiet=True)
    rows = {(r["scenario"], r["method"]): r for r in read_ndjson(out / "rows.ndjson")}
    assert len(rows) == 1 + 2 * 3
    nobody = rows[("data_poisoning@0:1", "benign_only")]
    assert nobody["accepted"] == [] and nobody["bytes_up_mean"] is None
    assert rows[("scaling@1:0", "krum")]["detection"]["tpr"] is None  # no attacker to find
    # A hard kill can leave a torn last line; the rows after it must not be lost on the next run.
    with open(out / "rows.ndjson", "a") as f:
        f.write('{"scenario": "scal')
    run_aggregator_study(cfg, out, quiet=True, aggregators=["krum", "median"])
    again = read_ndjson(out / "rows.ndjson")
    assert len(again) == len(rows) + 2 and {r["method"] for r in again} >= {"median"}
    assert len(read_ndjson(out / "rows.ndjson")) == len(again)


def test_study_refuses_what_shared_updates_cannot_honour(tmp_path):
    from fedguard.recipes.aggregator_study import run_aggregator_study

    with pytest.raises(ConfigError, match="lora.variant"):
        run_aggregator_study(_study_config().model_copy(update={"lora": _study_config().lora.model_copy(
            update={"variant": "ffa"})}), tmp_path / "a", quiet=True)
    with pytest.raises(ConfigError, match="fedprox"):
        run_aggregator_study(_study_config(), tmp_path / "b", quiet=True, aggregators=["fedavg", "fedprox"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_study_weighs_the_same_updates_by_every_defense_level(tmp_path):
    """Probe levels and the behaviour audit as rows: clients attach a shadow branch once, each level reads what
    it asked for, and the audit and shadow+audit rows carry the audit's measurements."""
    from fedguard.recipes.aggregator_study import run_aggregator_study

    cfg = _study_config(scenarios=["data_poisoning@4:1"], aggregators=["fedavg"], codecs=[], product=False,
                        probe_level=False, defense_levels=["step", "shadow", "audit", "shadow+audit"])
    run_aggregator_study(cfg, tmp_path / "s", quiet=True)
    rows = {r["method"]: r for r in read_ndjson(tmp_path / "s" / "rows.ndjson") if r["scenario"] != "base"}
    assert list(rows) == ["fedavg", "fedavg+step", "fedavg+shadow", "fedavg+audit", "fedavg+shadow+audit",
                          "benign_only"]
    for m in ("fedavg+step", "fedavg+shadow", "fedavg+audit", "fedavg+shadow+audit"):
        assert set(rows[m]["detection"]) >= {"tpr", "fpr"}, m
        assert rows[m]["accepted"] == rows["fedavg"]["accepted"]  # every level saw every update
    assert rows["fedavg+step"]["detection"]["tpr"] == 1.0 and rows["fedavg+shadow"]["detection"]["tpr"] == 1.0
