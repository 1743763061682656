"""Exact LoRA aggregation in the server and in runs: FFA-LoRA (B only, A frozen), product averaging, FLoRA."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from fedguard.data.federation import ClientData
from fedguard.data.schema import Example, chat
from fedguard.data.tokenize import tokenize_example
from fedguard.federated.aggregation import FedAvg
from fedguard.federated.client import LocalTrainer
from fedguard.model.keys import is_lora_a
from fedguard.federated.lora_exact import lora_scaling, product_average, reinit_adapter
from fedguard.federated.server import FederatedServer
from fedguard.federated.strategies import flora_merged
from fedguard.messages import ClientUpdate, RoundConfig, ServerState
from fedguard.io import load_tensors, read_ndjson
from fedguard.model.lora import embed_rank, initial_adapter_state, truncate_rank
from fedguard.simulation.runner import run_experiment


def test_ffa_local_training_moves_b_only_and_keeps_optimizer_state_for_b(tiny_loaded):
    loaded, peft_model, slot = tiny_loaded
    data = ClientData(0, [tokenize_example(loaded.tokenizer, Example(chat("Say the code.", "It is 7312.")), 64)] * 8)
    theta0 = initial_adapter_state(slot.shapes(), 5)
    trainer = LocalTrainer(loaded, peft_model, slot, keep_optimizer_state=True)
    rc = RoundConfig(server_round=1, lr=1e-2, local_steps=3, batch_size=4, grad_accum=1, seed=1, weight_decay=0.1,
                     train_lora_a=False)
    try:
        first = trainer.train(theta0, rc, data)
        second = trainer.train(first.tensors, rc, data)  # restores the kept (B-only) optimizer state
    finally:
        slot.set_lora_a_trainable(True)  # the fixture is shared with other tests
    for k in theta0:
        moved = not torch.equal(second.tensors[k], theta0[k])
        assert moved != is_lora_a(k), k
    saved = trainer.client_optimizer_states["0"]
    assert saved and all(".lora_B." in k for k in saved)


def _pairs(seed, r=2):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(r, 6, generator=g), "m.lora_B.weight": torch.randn(5, r, generator=g)}


class _Weights:
    """A stand-in defense that hands out fixed weights."""

    def __init__(self, weights):
        self.weights = weights

    def client_requests(self, server_round, client_id):
        return {}

    def weigh(self, server_round, global_adapter, updates):
        return SimpleNamespace(weights=self.weights, verdicts=[], skip=False, mean_weight=1.0)

    def state_dict(self):
        return {}


def test_product_averaging_is_the_fedavg_weighted_mean_of_products():
    glob = _pairs(0)
    updates = [ClientUpdate(str(i), _pairs(i + 1), n) for i, n in enumerate((1, 3, 2))]
    s = lora_scaling(8, 2)
    server = FederatedServer(FedAvg(), 1 << 20, _Weights([1.0, 0.5, 0.0]), lora_aggregation="product",
                             lora_alpha=8, seed=7)
    out = server.aggregate_round(1, glob, updates, ServerState())
    # examples × defense weight: 1, 1.5 and 0 (the third client drops out)
    expected = product_average([u.tensors for u in updates[:2]], [1.0, 1.5], scalings=s, out_scaling=s, rank=2)
    for k, t in out.global_adapter.items():
        assert torch.allclose(t, expected.adapter[k], atol=1e-6), k
    report = out.lora_aggregation
    assert report["naive_rel"] == pytest.approx(expected.report.naive_rel)
    assert report["refactor_rel"] == pytest.approx(expected.report.refactor_rel)
    assert report["naive_rel"] > report["refactor_rel"] > 0  # rank 4 mean cut to rank 2; naive is worse still
    mean = sum(w * s * (u.tensors["m.lora_B.weight"] @ u.tensors["m.lora_A.weight"]).double()
               for w, u in zip((0.4, 0.6), updates))
    got = s * (out.global_adapter["m.lora_B.weight"] @ out.global_adapter["m.lora_A.weight"]).double()
    tail = torch.linalg.svdvals(mean)[2:]  # Eckart–Young: the refactorisation error is the dropped tail
    assert math.isclose(float(torch.linalg.matrix_norm(got - mean)), float(tail.norm()), rel_tol=1e-5)


def test_product_averaging_with_every_weight_zero_keeps_the_global_adapter():
    glob = _pairs(0)
    server = FederatedServer(FedAvg(), 1 << 20, _Weights([0.0]), lora_aggregation="product", lora_alpha=8)
    out = server.aggregate_round(1, glob, [ClientUpdate("1", _pairs(1), 1)], ServerState())
    assert all(torch.equal(out.global_adapter[k], glob[k]) for k in glob) and out.lora_aggregation is None


def _theta0(cfg, shapes):
    return initial_adapter_state(shapes, cfg.lora.init_seed)


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_ffa_run_sends_b_only_and_never_moves_a(compression, tmp_path):
    cfg = tiny_config(lora={"variant": "ffa"}, federation={"rounds": 2}, train={"optimizer_state": "keep"},
                      communication={"compression": compression})
    result = run_experiment(cfg, tmp_path / "r", quiet=True)
    final = load_tensors(result.run_dir / "final_adapter" / "adapter_model.safetensors")
    theta0 = _theta0(cfg, {k: tuple(v.shape) for k, v in final.items()})
    b_bytes = sum(t.numel() * 4 for k, t in final.items() if not is_lora_a(k))
    assert b_bytes < 0.5 * sum(t.numel() * 4 for t in final.values())  # v_proj's B is smaller than its A
    for k, t in final.items():
        if is_lora_a(k):
            assert torch.equal(t, theta0[k]), k
        else:
            assert float(t.abs().sum()) > 0, k  # B trained
    for r in read_ndjson(result.run_dir / "metrics.ndjson")[1:]:
        assert r["accepted"] and not r["rejected"]
        for t in r["communication"].values():
            assert t["down"] == b_bytes
            if compression == "none":
                assert t["up"] == b_bytes
            else:
                assert t["up"] - t["up_header"] == b_bytes // 4 + 4 * 4  # int8 codes + one scale per B tensor
    assert result.final_metrics["lora_variant"] == "ffa"
    assert "FFA-LoRA" in result.report.read_text()


def test_product_averaging_run_records_the_naive_error(tmp_path):
    cfg = tiny_config(server={"lora_aggregation": "product"}, federation={"rounds": 2})
    result = run_experiment(cfg, tmp_path / "r", quiet=True)
    records = read_ndjson(result.run_dir / "metrics.ndjson")[1:]
    for r in records:
        agg = r["lora_aggregation"]
        assert agg["naive_rel"] > 0 and 0 <= agg["refactor_rel"] < 1 and agg["exact_norm"] > 0
    final = result.final_metrics
    assert final["mean_naive_rel"] > 0 and final["lora_aggregation"] == "product" and final["rounds"] == 2
    report = result.report.read_text()
    assert "Exact LoRA aggregation (product averaging)" in report and "naive A/B averaging" in report
    adapter = load_tensors(result.run_dir / "final_adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


# -- FLoRA ---------------------------------------------------------------------------------------------------
def test_a_lower_rank_embedded_in_the_resident_adapter_trains_as_that_rank(tiny_loaded):
    loaded, peft_model, slot = tiny_loaded
    data = ClientData(0, [tokenize_example(loaded.tokenizer, Example(chat("Say the code.", "It is 7312.")), 64)] * 8)
    start = embed_rank(reinit_adapter(slot.shapes(), 2, seed=11), 4)
    rc = RoundConfig(server_round=1, lr=1e-2, local_steps=4, batch_size=4, grad_accum=1, seed=1, weight_decay=0.1)
    trainer = LocalTrainer(loaded, peft_model, slot)
    with slot.scaled(lora_scaling(8, 2)):
        assert all(m.scaling["default"] == 4.0 for m in peft_model.modules() if hasattr(m, "lora_A"))
        update = trainer.train(start, rc, data)
    assert all(m.scaling["default"] == 2.0 for m in peft_model.modules() if hasattr(m, "lora_A"))  # restored
    for k, t in update.tensors.items():
        pad = t[2:] if is_lora_a(k) else t[:, 2:]
        assert float(pad.abs().max()) == 0.0, k  # the padding never trains
    own = truncate_rank(update.tensors, 2)
    assert any(not torch.equal(own[k], v) for k, v in truncate_rank(start, 2).items() if not is_lora_a(k))


def test_flora_server_stacks_clients_of_different_ranks_exactly():
    glob = _pairs(0, r=3)
    a, b = _pairs(1, r=1), _pairs(2, r=3)
    server = FederatedServer(FedAvg(), 1 << 20, lora_aggregation="flora", lora_alpha=6)
    state = ServerState()
    assert server.downlink_nbytes(glob, state, "a") == 0  # round 1: nothing merged yet
    too_big, mixed = _pairs(3, r=4), {**_pairs(4, r=2), "m.lora_B.weight": torch.zeros(5, 3)}
    out = server.aggregate_round(1, glob, [ClientUpdate("a", a, 1), ClientUpdate("b", b, 3),
                                           ClientUpdate("c", too_big, 1), ClientUpdate("d", mixed, 1)], state)
    assert out.accepted == ["a", "b"] and out.rejected["c"].startswith("wrong_rank")
    assert out.rejected["d"].startswith("wrong_shape")
    exact = sum(p * (6 / u["m.lora_A.weight"].shape[0]) * (u["m.lora_B.weight"] @ u["m.lora_A.weight"]).double()
                for p, u in ((0.25, a), (0.75, b)))
    assert torch.allclose(flora_merged(out.state)["m"], exact, atol=1e-12)
    assert all(torch.equal(out.global_adapter[k], glob[k]) for k in glob)
    # The stacked rank-4 adapter in fp32 is larger than the dense 5 x 6 ΔW here, so a client fetches that.
    stack1, dense = 4 * (1 + 3) * (6 + 5), 4 * 6 * 5
    assert server.downlink_nbytes(glob, out.state, "a") == min(stack1, dense) == dense
    assert out.lora_aggregation["ranks"] == {"a": 1, "b": 3} and out.lora_aggregation["stacked_rank"] == 4
    again = server.aggregate_round(2, glob, [ClientUpdate("a", a, 1)], out.state)
    a_alone = 6 * (a["m.lora_B.weight"] @ a["m.lora_A.weight"]).double()
    assert torch.allclose(flora_merged(again.state)["m"], exact + a_alone)
    # Next round a fetches only round 2's rank-1 stack (smaller than the dense ΔW); b sat round 2 out and
    # needs both stacks, or the dense ΔW, whichever is smaller; so does a client that never took part.
    stack2 = 4 * 1 * (6 + 5)
    assert server.downlink_nbytes(glob, again.state, "a") == stack2 < dense
    assert server.downlink_nbytes(glob, again.state, "b") == min(stack1 + stack2, dense)
    assert server.downlink_nbytes(glob, again.state, "new") == min(stack1 + stack2, dense)
    # A client the downlink went to counts as synced even if its update never arrived.
    third = server.aggregate_round(3, glob, [ClientUpdate("a", a, 1)], again.state, sent_to=["a", "b"])
    assert server.downlink_nbytes(glob, third.state, "b") == server.downlink_nbytes(glob, third.state, "a") == stack2


def _flora_config(rounds):
    return tiny_config(lora={"variant": "flora", "client_ranks": [1, 2, 3, 4]}, federation={"rounds": rounds},
                       train={"lr_schedule": "constant"})


def test_flora_run_merges_into_the_base_and_resumes_exactly(tmp_path):
    full = run_experiment(_flora_config(3), tmp_path / "full", quiet=True)
    records = read_ndjson(full.run_dir / "metrics.ndjson")[1:]
    ranks = [1, 2, 3, 4]
    per_rank = 4 * 2 * ((64 + 64) + (64 + 32))  # fp32 × 2 layers × (in + out) of q_proj and v_proj, per rank
    for r in records:
        assert not r["rejected"] and r["lora_aggregation"]["stacked_rank"] == sum(
            ranks[int(c)] for c in r["accepted"])
        for cid, t in r["communication"].items():
            assert t["up"] == ranks[int(cid)] * per_rank
    assert records[0]["bytes_down"] == 0
    assert records[1]["bytes_down_mean"] == records[0]["lora_aggregation"]["stacked_rank"] * per_rank
    delta = load_tensors(full.run_dir / "final_merged_delta.safetensors")
    assert delta and all(float(t.abs().sum()) > 0 for t in delta.values())
    adapter = load_tensors(full.run_dir / "final_adapter" / "adapter_model.safetensors")
    assert all(float(t.abs().sum()) == 0 for k, t in adapter.items() if not is_lora_a(k))  # all of it is merged
    # Two rounds, then a third resumed from the checkpoint (constant lr: the first two rounds are the same run).
    part = tmp_path / "part"
    run_experiment(_flora_config(2), part, quiet=True)
    resumed = run_experiment(_flora_config(3), part, resume=True, quiet=True)
    again = load_tensors(resumed.run_dir / "final_merged_delta.safetensors")
    assert all(torch.equal(again[k], delta[k]) for k in delta)
    assert read_ndjson(part / "metrics.ndjson")[3]["train_loss"] == records[2]["train_loss"]
    assert resumed.final_metrics["after"]["eval_loss"] == full.final_metrics["after"]["eval_loss"]


@pytest.mark.parametrize("raw,match", [
    ({"lora": {"client_ranks": [1, 2]}}, r"lora: .*client_ranks is only used with variant 'flora'"),
    ({"lora": {"variant": "flora", "r": 4, "client_ranks": [1, 5]}}, r"lora: .*between 1 and r = 4"),
    ({"lora": {"variant": "flora", "client_ranks": [1, 2]}}, r"lora\.client_ranks lists 2 ranks but "
                                                                r"federation\.num_clients is 10"),
    ({"lora": {"variant": "flora"}, "server": {"aggregator": "median"}}, r"lora\.variant 'flora' works with "
                                                                           r"server\.aggregator fedavg"),
    ({"lora": {"variant": "flora"}, "defense": {"level": "client"}}, r"does not support defense\.level 'client'"),
    ({"lora": {"variant": "flora"}, "communication": {"compression": "int8"}}, r"needs communication\.compression"),
    ({"lora": {"variant": "flora"}, "train": {"optimizer_state": "keep"}}, r"train\.optimizer_state 'keep'"),
    ({"server": {"lora_aggregation": "product"}, "train": {"optimizer_state": "keep"}},
     r"train\.optimizer_state 'keep'"),
])
def test_flora_config_errors_name_the_field(raw, match):
    from fedguard.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=match):
        build_config(raw)
