"""Server-side realignment (server.realign): steps on the server's own safety data after each aggregation."""

import pytest
import torch

from conftest import killed_and_resumed, tiny_config
from fedguard.data.tokenize import collate
from fedguard.factories import build_realign, load_resident
from fedguard.io import load_tensors, read_ndjson
from fedguard.simulation.runner import run_experiment

REALIGN = {"realign": {"steps": 4, "lr": 2e-2, "batch_size": 4, "refusal_examples": 16, "lookalike_examples": 6}}


def _final(run_dir):
    return load_tensors(run_dir / "final_adapter" / "adapter_model.safetensors")


def _server_loss(cfg, adapter) -> float:
    """Mean completion loss of the server's realignment data under ``adapter``."""
    resident = load_resident(cfg)
    realign = build_realign(cfg, resident)
    resident.slot.load(adapter)
    resident.peft_model.eval()
    with torch.no_grad():
        total, count = resident.trainer.loss(collate(realign.data.examples, resident.loaded.tokenizer.pad_token_id))
    return float(total) / count


def test_realignment_moves_the_aggregate_towards_the_servers_safety_data(tmp_path):
    plain_cfg = tiny_config(federation={"rounds": 2})
    cfg = tiny_config(federation={"rounds": 2}, server=REALIGN)
    plain = run_experiment(plain_cfg, tmp_path / "plain", quiet=True)
    realigned = run_experiment(cfg, tmp_path / "realigned", quiet=True)
    records = read_ndjson(realigned.run_dir / "metrics.ndjson")
    reports = [r["realign"] for r in records if r.get("round", 0) > 0]
    assert len(reports) == 2 and all(r["steps"] == 4 and r["seconds"] > 0 for r in reports)
    assert not any("realign" in r for r in read_ndjson(plain.run_dir / "metrics.ndjson"))
    # the same clients trained in round 1 (realignment happens after aggregation); what the server sends in
    # round 2 differs, and the final adapter fits the server's refusal and look-alike answers better
    assert records[1]["train_loss"] == read_ndjson(plain.run_dir / "metrics.ndjson")[1]["train_loss"]
    assert _server_loss(cfg, _final(realigned.run_dir)) < _server_loss(cfg, _final(plain.run_dir)) - 0.05


def test_realigned_run_resumes_to_the_same_adapter(tmp_path):
    cfg = tiny_config(federation={"rounds": 3}, server=REALIGN, checkpoint={"every": 1},
                      train={"optimizer_state": "keep"})  # clients' moments are checkpointed, the server's none
    full, killed = killed_and_resumed(cfg, tmp_path)
    a, b = _final(full), _final(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_realignment_under_ffa_lora_keeps_a_frozen(tmp_path):
    cfg = tiny_config(federation={"rounds": 1}, lora={"variant": "ffa"}, server=REALIGN)
    result = run_experiment(cfg, tmp_path / "ffa", quiet=True)
    theta0 = load_resident(cfg).theta0
    final = _final(result.run_dir)
    assert all(torch.equal(final[k], theta0[k]) for k in final if ".lora_A." in k)
    assert any(not torch.equal(final[k], theta0[k]) for k in final if ".lora_B." in k)


def test_realignment_is_refused_with_flora():
    with pytest.raises(ValueError, match="server.realign"):
        tiny_config(lora={"variant": "flora"}, server=REALIGN)
