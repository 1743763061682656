"""End-to-end runs of the simulation on the tiny model: artifacts, export, resume after a hard kill."""

import json

import pytest
import torch
import yaml

from conftest import killed_and_resumed, run_cli, tiny_config
from fedguard.io import load_tensors, read_ndjson
from fedguard.simulation.runner import run_experiment


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cfg = tiny_config(eval={"every": 1}, checkpoint={"every": 1})
    run_dir = tmp_path_factory.mktemp("run") / "r"
    return cfg, run_experiment(cfg, run_dir, quiet=True)


def test_run_directory_has_every_artifact(finished_run):
    cfg, result = finished_run
    d = result.run_dir
    assert yaml.safe_load((d / "config.yaml").read_text())["lora"]["init_seed"] == 5
    records = read_ndjson(d / "metrics.ndjson")
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all("eval" in r for r in records)
    assert {"refusal_rate", "exact_match", "eval_loss", "perplexity"} <= set(records[-1]["eval"])
    final = json.loads((d / "final_metrics.json").read_text())
    assert final["rounds"] == 3 and final["before"] and final["after"]
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["round_0001", "round_0002", "round_0003"]
    report = (d / "report.md").read_text()
    assert "plots/overview.png" in report and (d / "plots" / "overview.png").stat().st_size > 10_000
    assert (d / "run.log").read_text().count("round 3/3") == 1


def test_checkpoint_adapters_load_with_peft(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedguard.model.registry import resolve_model_path

    _, result = finished_run
    ckpt = result.run_dir / "checkpoints" / "round_0003"
    final = result.run_dir / "final_adapter"
    saved = load_tensors(final / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in load_tensors(ckpt / "adapter_model.safetensors").items())
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-llama"))
    model = PeftModel.from_pretrained(base, str(final))
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if ".lora_B." in k)  # it trained


def test_same_config_same_result(finished_run, tmp_path):
    cfg, result = finished_run
    again = run_experiment(cfg, tmp_path / "again", quiet=True)
    a = load_tensors(result.run_dir / "final_adapter" / "adapter_model.safetensors")
    b = load_tensors(again.run_dir / "final_adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_hard_kill_gives_the_same_final_adapter(tmp_path):
    cfg = tiny_config(federation={"rounds": 4}, train={"optimizer_state": "keep"}, eval={"every": 2},
                      checkpoint={"every": 1})
    full, killed = killed_and_resumed(cfg, tmp_path)
    assert [p.name for p in sorted((killed / "checkpoints").iterdir())] == [f"round_000{i}" for i in range(1, 5)]
    ra, rb = read_ndjson(full / "metrics.ndjson"), read_ndjson(killed / "metrics.ndjson")
    assert [r["round"] for r in rb] == [0, 1, 2, 3, 4]
    assert [r["train_loss"] for r in ra[1:]] == [r["train_loss"] for r in rb[1:]]
    assert ra[-1]["eval"]["eval_loss"] == rb[-1]["eval"]["eval_loss"]


def test_resume_of_a_missing_run_is_a_clear_error(tmp_path):
    out = run_cli("resume", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "not a run directory" in out.stderr


def test_a_model_that_is_not_there_is_named_and_leaves_no_run_folder(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: x\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name_or_path: {tmp_path / 'no-such-model'}\n")
    done = run_cli("run", str(cfg))
    assert done.returncode == 2 and "model.name_or_path" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
