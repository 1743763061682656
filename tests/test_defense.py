"""The probe defense end to end on the tiny model: probe artifact, every level, fail policy, resume,
attacks, and the separation of the server's view from ground truth."""

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from fedguard.config import DefenseConfig
from fedguard.defenses.defense import ProbeDefense
from fedguard.defenses.features import FeatureSpec
from fedguard.defenses.probe import LoRAProbe, ProbeMismatch, compat_stamp
from fedguard.messages import ClientUpdate
from fedguard.io import read_ndjson
from fedguard.simulation.runner import run_experiment

SRC = Path(__file__).resolve().parents[1] / "src" / "fedguard"


# The tiny model's random weights know no harm: detection mechanics are tested on harmful data of a style it can
# tell apart (one file: the attackers' train split, the defender's probe split). Whether detection transfers to
# data the probe never saw is measured on SmolLM2 (tests/test_smollm2.py, docs/results).
TINY_HARMFUL = str(Path(__file__).resolve().parent / "data" / "tiny_distinctive_harmful.jsonl")


def defended_config(**over):
    base = dict(
        federation={"num_clients": 6, "clients_per_round": 6, "rounds": 2},
        train={"local_steps": 3, "batch_size": 4, "lr": 1e-2, "lr_schedule": "constant"},
        data={"examples_per_client": 24, "max_length": 96},
        attack={"malicious_clients": 2, "source": TINY_HARMFUL},
        defense={"level": "shadow"},
        probe={"clients_per_class": 6, "rounds": 1, "examples_per_client": 24, "calibration": "fixed",
               "harmful_source": TINY_HARMFUL},
    )
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v}
    return tiny_config(**base)


@pytest.fixture(scope="module")
def shadow_run(tmp_path_factory):
    cfg = defended_config()
    return cfg, run_experiment(cfg, tmp_path_factory.mktemp("def") / "run", quiet=True)


def test_malicious_clients_end_with_low_weight(shadow_run):
    cfg, result = shadow_run
    for r in read_ndjson(result.run_dir / "metrics.ndjson")[1:]:
        weights = {v["client_id"]: v["weight"] for v in r["defense"]["verdicts"]}
        malicious = {str(c) for c in r["malicious_sampled"]}
        assert len(malicious) == 2
        assert all(weights[c] < 0.1 for c in malicious), weights
        assert all(w > 0.9 for c, w in weights.items() if c not in malicious), weights
        assert r["defense"]["detection"] == {"tpr": 1.0, "fpr": 0.0, "auroc": 1.0}
        # every verdict also carries the client level's statistic (the probe's score of the update itself)
        scores = {v["client_id"]: v["update_score"] for v in r["defense"]["verdicts"]}
        assert all(s is not None and 0.0 <= s <= 1.0 for s in scores.values())
        assert min(scores[c] for c in malicious) > max(s for c, s in scores.items() if c not in malicious)


def test_probe_artifact_round_trip_and_mismatch_refusal(shadow_run, tmp_path):
    from fedguard.defenses.build import default_probe_dir

    cfg, result = shadow_run
    # The run found its probe where the cache key of its own config points (the cache may hold others).
    probe_dirs = [d for d in (Path(os.environ["FEDGUARD_CACHE"]) / "probes").iterdir() if (d / "probe.json").is_file()]
    own = [d for d in probe_dirs if default_probe_dir(LoRAProbe.load(d).compat, cfg) == d]
    assert len(own) == 1
    probe = LoRAProbe.load(own[0])
    assert probe.metrics["auroc"] > 0.95 and probe.spec.selection == "first_B"
    copy = probe.save(tmp_path / "p")
    again = LoRAProbe.load(copy, expect=probe.compat)
    x = torch.randn(3, probe.spec.dim)
    assert torch.equal(again.logits(x), probe.logits(x))
    other = json.loads(json.dumps(probe.compat))
    other["lora"]["r"] = 16
    other["lora"]["init_seed"] = 1
    with pytest.raises(ProbeMismatch) as err:
        LoRAProbe.load(copy, expect=other)
    assert "lora.r: probe built for 4, this run has 16" in str(err.value) and "lora.init_seed" in str(err.value)
    assert not (tmp_path / "p" / "probe.pkl").exists() and (tmp_path / "p" / "probe.safetensors").is_file()


def _toy_probe():
    shapes = {"m.layers.0.q.lora_B.weight": (4, 2), "m.layers.0.q.lora_A.weight": (2, 4)}
    spec = FeatureSpec.build(shapes, "first_B")
    probe = LoRAProbe(spec, "logistic", {"weight": torch.ones(8), "bias": torch.tensor(0.0)}, 0.8,
                      compat_stamp({"name": "x"}, {"r": 2, "alpha": 4, "target_modules": ["q"], "init_seed": 0}, 1e-3, shapes))
    theta0 = {k: torch.zeros(s) for k, s in shapes.items()}
    return probe, theta0


@pytest.mark.parametrize("policy,weight", [("open", 1.0), ("closed", 0.0)])
@pytest.mark.parametrize("level", ["step", "shadow", "evidence"])
def test_one_fail_policy_for_every_level(level, policy, weight):
    probe, theta0 = _toy_probe()
    d = ProbeDefense(DefenseConfig(level=level, fail_policy=policy), probe, theta0, local_steps=2,
                     samples_per_step=4, lr=1e-3)
    u = ClientUpdate("7", dict(theta0), 10, {}, attachments={})  # asked for snapshots, sent none
    out = d.weigh(1, theta0, [u])
    assert out.verdicts[0].status == "unscored" and out.weights == [weight]
    assert out.skip == (weight < 0.2)
    nan = ClientUpdate("8", dict(theta0), 10, {}, attachments={
        f"{p}/{t}/m.layers.0.q.lora_B.weight": torch.full((4, 2), float("nan")) for p in ("step", "shadow") for t in (1, 2)})
    assert d.weigh(1, theta0, [nan]).verdicts[0].status == "unscored"


def test_client_level_scores_the_update_itself():
    probe, theta0 = _toy_probe()
    d = ProbeDefense(DefenseConfig(level="client"), probe, theta0, 2, 4, 1e-3)
    good = {k: v.clone() for k, v in theta0.items()}
    good["m.layers.0.q.lora_B.weight"] = -torch.ones(4, 2)  # logit -sqrt(8): benign
    bad = {k: v.clone() for k, v in theta0.items()}
    bad["m.layers.0.q.lora_B.weight"] = torch.ones(4, 2)  # logit +sqrt(8): malicious
    out = d.weigh(1, theta0, [ClientUpdate("g", good, 1), ClientUpdate("b", bad, 1)])
    assert out.weights[0] > 0.9 and out.weights[1] < 0.1
    assert d.client_requests(1, "g") == {}  # nothing extra to upload at client level


@pytest.mark.parametrize("level", ["step", "client", "evidence"])
def test_every_level_runs_and_its_state_resumes(level, tmp_path):
    import subprocess
    import sys

    cfg = defended_config(defense={"level": level, "evidence_min": 1}, federation={"rounds": 3},
                          checkpoint={"every": 1})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = lambda *a: subprocess.run([sys.executable, "-m", "fedguard", *a, "--quiet"], capture_output=True, text=True)
    assert run("run", str(path), "--run-dir", str(full)).returncode == 0
    assert run("run", str(path), "--run-dir", str(killed), "--stop-after-round", "1").returncode == -9
    state = json.loads((killed / "checkpoints" / "round_0001" / "state.json").read_text())
    assert state["server_meta"]["defense"]  # defense state is in the checkpoint
    assert run("resume", str(killed)).returncode == 0
    a, b = read_ndjson(full / "metrics.ndjson"), read_ndjson(killed / "metrics.ndjson")
    assert [r["defense"] for r in a[1:]] == [r["defense"] for r in b[1:]]
    final = read_ndjson(full / "metrics.ndjson")[-1]["defense"]
    weights = {v["client_id"]: v["weight"] for v in final["verdicts"]}
    malicious = {str(c) for c in read_ndjson(full / "metrics.ndjson")[-1]["malicious_sampled"]}
    assert max(weights[c] for c in malicious) < min(w for c, w in weights.items() if c not in malicious)


def test_server_code_never_reads_ground_truth():
    """The server role's modules (the probe build included) import nothing of the simulation, the attacks or
    the population, and never read the config's attack section: the defender does not know the attackers' data."""
    server_side = [SRC / "federated" / "server.py", SRC / "federated" / "aggregation.py",
                   SRC / "federated" / "validation.py", *sorted((SRC / "defenses").glob("*.py")),
                   *sorted((SRC / "aggregators").glob("*.py"))]
    for path in server_side:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("fedguard.simulation", "fedguard.attacks")), (path, node.module)
            if isinstance(node, ast.Name | ast.Attribute):
                name = getattr(node, "id", None) or getattr(node, "attr", "")
                assert name not in ("malicious", "is_malicious", "population", "malicious_sampled", "attack"), (path, name)
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith("attack."), (path, node.value)
    fields = set(ClientUpdate.__dataclass_fields__)
    assert fields == {"client_id", "tensors", "num_examples", "metrics", "attachments", "payload"}


def test_model_poisoning_transforms():
    from fedguard.attacks import Attacker
    from fedguard.config import AttackConfig

    class Fake:
        def train(self, global_adapter, rc, data, objective=None, theta0=None, on_step=None):
            return ClientUpdate("1", {k: v + 1.0 for k, v in global_adapter.items()}, 4, {})

    from fedguard.messages import RoundConfig

    g = {"a": torch.zeros(3)}
    rc = RoundConfig(server_round=1, lr=1e-3, local_steps=1, batch_size=1, grad_accum=1, seed=0)
    run = lambda kind, **kw: Attacker(AttackConfig(kind=kind, **kw), 1, 0).run(Fake(), g, rc, "h", "b", None)
    assert torch.equal(run("scaling", scale=5.0).tensors["a"], torch.full((3,), 5.0))
    assert torch.equal(run("sign_flip", scale=2.0).tensors["a"], torch.full((3,), -2.0))
    noisy = run("gaussian", noise_std=0.1).tensors["a"]
    assert 0 < float(noisy.abs().mean()) < 0.5
    with pytest.raises(ValueError, match="needs the probe"):
        Attacker(AttackConfig(kind="probe_aware"), 1, 0)
    # model replacement: a training attacker sends global + boost * its update; the size-setting kinds refuse it
    assert torch.equal(run("data_poisoning", boost=4.0).tensors["a"], torch.full((3,), 4.0))
    assert torch.equal(run("data_poisoning").tensors["a"], torch.full((3,), 1.0))
    with pytest.raises(ValueError, match="attack.boost"):
        AttackConfig(kind="scaling", boost=2.0)


def test_overfitting_attacker_overfits_one_refusal_then_trains_the_round_on_benign_answers(tmp_path):
    """Attack via Overfitting: stage one (no attachments) on benign questions that all get the same refusal, then the
    round's own training, with what the defense asked for, from stage one's result on the same questions' answers;
    it claims its real data size. The federation gives it benign examples only."""
    from fedguard.attacks import Attacker
    from fedguard.config import AttackConfig
    from fedguard.data.federation import ClientData
    from fedguard.messages import RoundConfig
    from fedguard.alignment import load_start_model
    from fedguard.simulation.population import OVERFIT_REFUSAL, build_population

    calls = []

    class Recorder:
        def train(self, global_adapter, rc, data, objective=None, theta0=None, on_step=None):
            calls.append((rc, data, global_adapter))
            return ClientUpdate("1", {k: v + 1.0 for k, v in global_adapter.items()}, len(data.examples), {})

    attacker = Attacker(AttackConfig(kind="overfit"), 1, 0)
    attacker.stage_one = ClientData(1, ["refused"] * 3)
    rc = RoundConfig(server_round=1, lr=1e-3, local_steps=2, batch_size=1, grad_accum=1, seed=0,
                     snapshot_keys=("a",), snapshot_steps=True, shadow_steps=2, shadow_lr=1e-3)
    benign = ClientData(1, ["x"] * 50)
    u = attacker.run(Recorder(), {"a": torch.zeros(3)}, rc, ClientData(1, ["answered"] * 3), benign, {})
    (rc1, d1, g1), (rc2, d2, g2) = calls
    assert d1.examples == ["refused"] * 3 and not rc1.snapshot_steps and rc1.shadow_steps == 0
    assert d2.examples == ["answered"] * 3 and rc2 == rc and torch.equal(g2["a"], torch.ones(3))
    assert torch.equal(u.tensors["a"], torch.full((3,), 2.0)) and u.num_examples == 50
    with pytest.raises(ValueError, match="first-stage data"):
        Attacker(AttackConfig(kind="overfit"), 1, 0).run(Recorder(), {"a": torch.zeros(3)}, rc, benign, benign, {})

    cfg = tiny_config(attack={"malicious_clients": 2, "kind": "overfit", "shots": 5})
    tokenizer = load_start_model(cfg.model).tokenizer
    from fedguard.data.federation import build_client_data

    clients = build_client_data(cfg, tokenizer)
    honest_sizes = [len(c.examples) for c in clients]
    pop = build_population(cfg, tokenizer, clients)
    for cid, att in pop.attackers.items():
        assert clients[cid].composition == {"benign": 5} and len(att.stage_one.examples) == 5
        assert len(pop.benign_data[cid].examples) == honest_sizes[cid]
        text = tokenizer.decode(att.stage_one.examples[0].input_ids)
        assert OVERFIT_REFUSAL in text
        assert OVERFIT_REFUSAL not in tokenizer.decode(clients[cid].examples[0].input_ids)
