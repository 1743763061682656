import pytest
import torch

from fedguard.aggregators import weighted_mean
from fedguard.federated.aggregation import FedAvg, build_aggregator
from fedguard.federated.server import FederatedServer
from fedguard.messages import ClientUpdate, ServerState
from fedguard.federated.validation import UpdateRejected, UpdateSpec, validate_update

GLOBAL = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}


def upd(cid, value, n=1, **over):
    t = {k: torch.full_like(v, float(value)) for k, v in GLOBAL.items()}
    return ClientUpdate(cid, over.pop("tensors", t), over.pop("num_examples", n), over.pop("metrics", {}))


def test_fedavg_is_the_example_weighted_mean():
    out = FedAvg().aggregate(GLOBAL, [upd("a", 1.0, 1), upd("b", 4.0, 3)], ServerState())
    for t in out.values():
        assert torch.allclose(t, torch.full_like(t, (1 * 1 + 4 * 3) / 4))
        assert t.dtype == torch.float32


def test_fedavg_client_weights_multiply_example_counts():
    out = FedAvg().aggregate(GLOBAL, [upd("a", 2.0, 1), upd("b", 10.0, 1)], ServerState(), client_weights=[1.0, 0.0])
    assert torch.equal(out["a.lora_A.weight"], torch.full((2, 3), 2.0))
    kept = FedAvg().aggregate(GLOBAL, [upd("a", 2.0)], ServerState(), client_weights=[0.0])
    assert torch.equal(kept["a.lora_A.weight"], GLOBAL["a.lora_A.weight"])


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([GLOBAL], [-1.0])
    with pytest.raises(ValueError):
        weighted_mean([GLOBAL], [float("nan")])


def test_unknown_aggregator():
    with pytest.raises(ValueError, match="unknown aggregator"):
        build_aggregator("nope")


SPEC = UpdateSpec.from_adapter(GLOBAL, max_bytes=1000)


@pytest.mark.parametrize("update,code", [
    (upd("a", 1, tensors={"a.lora_A.weight": torch.zeros(2, 3)}), "wrong_keys"),
    (upd("a", 1, tensors={**GLOBAL, "extra": torch.zeros(1)}), "wrong_keys"),
    (upd("a", 1, tensors={"a.lora_A.weight": torch.zeros(3, 2), "a.lora_B.weight": torch.zeros(3, 2)}), "wrong_shape"),
    (upd("a", 1, tensors={k: v.double() for k, v in GLOBAL.items()}), "wrong_dtype"),
    (upd("a", 1, tensors={k: v.half() for k, v in GLOBAL.items()}), "wrong_dtype"),
    (upd("a", float("nan")), "non_finite"),
    (upd("a", float("inf")), "non_finite"),
    (upd("a", 1, tensors={k: v.tolist() for k, v in GLOBAL.items()}), "bad_payload"),
    (upd("a", 1, num_examples=0), "bad_num_examples"),
    (upd("a", 1, num_examples=2.5), "bad_num_examples"),
    (upd("a", 1, num_examples=10**400), "bad_num_examples"),
    (upd("a", 1, tensors={**GLOBAL, 7: torch.zeros(1)}), "wrong_keys"),
    (upd("a", 1, metrics=["loss", 1.0]), "bad_metrics"),
    (upd("", 1), "bad_client_id"),
    (upd("a", 1, metrics={"loss": float("nan")}), "bad_metrics"),
])
def test_every_kind_of_bad_update_is_rejected(update, code):
    with pytest.raises(UpdateRejected) as info:
        validate_update(update, SPEC)
    assert info.value.code == code


def test_oversize_update_is_rejected():
    spec = UpdateSpec.from_adapter(GLOBAL, max_bytes=10)
    with pytest.raises(UpdateRejected, match="oversize"):
        validate_update(upd("a", 1), spec)


def test_round_goes_on_without_the_bad_updates():
    server = FederatedServer(FedAvg(), max_update_bytes=1 << 20)
    bad_shape = upd("c", 1, tensors={"a.lora_A.weight": torch.zeros(1), "a.lora_B.weight": torch.zeros(3, 2)})
    updates = [upd("a", 1.0), upd("b", 3.0), upd("n", float("nan")), bad_shape, upd("a", 100.0)]
    out = server.aggregate_round(1, GLOBAL, updates, ServerState())
    assert out.accepted == ["b"]  # "a" sent twice: neither message counts, and "a" is in one list only
    assert set(out.rejected) == {"n", "c", "a"}
    assert "duplicate" in out.rejected["a"] and "non_finite" in out.rejected["n"] and "wrong_shape" in out.rejected["c"]
    assert torch.allclose(out.global_adapter["a.lora_A.weight"], torch.full((2, 3), 3.0))
    assert out.state.round == 1


def test_no_message_a_client_can_send_crashes_the_round():
    """Malformed in ways validation does not name still only reject their sender."""
    from fedguard.config import build_config
    from fedguard.federated.transport import WireSpec

    odd = [ClientUpdate("t", torch.zeros(3), 1, {}), ClientUpdate("k", {1: torch.zeros(1), "x": torch.zeros(1)}, 1, {}),
           ClientUpdate("m", dict(GLOBAL), 1, "not a dict"), ClientUpdate("e", dict(GLOBAL), 10**400, {})]
    plain = FederatedServer(FedAvg(), max_update_bytes=1 << 20)
    out = plain.aggregate_round(1, GLOBAL, [upd("a", 1.0), *odd], ServerState())
    assert out.accepted == ["a"] and set(out.rejected) == {"t", "k", "m", "e"}
    wire = WireSpec.from_config(build_config({"communication": {"compression": "int8"}}))
    compressed = FederatedServer(FedAvg(), max_update_bytes=1 << 20, wire=wire)
    both = ClientUpdate("p", torch.zeros(3), 1, {}, payload=b"\x00" * 16)
    out = compressed.aggregate_round(1, GLOBAL, [both], ServerState())
    assert set(out.rejected) == {"p"} and "bad_payload" in out.rejected["p"]


def test_no_valid_update_keeps_the_global_adapter():
    server = FederatedServer(FedAvg(), max_update_bytes=1 << 20)
    out = server.aggregate_round(2, GLOBAL, [upd("x", float("inf"))], ServerState())
    assert out.accepted == [] and torch.equal(out.global_adapter["a.lora_B.weight"], GLOBAL["a.lora_B.weight"])


def test_an_aggregation_strategy_from_outside_the_package_runs_a_round():
    """Adding a way of combining adapters is one class and one registration: the server runs it after its own
    validation (bad messages are still refused), and the DP and secure-sum wrappers refuse what they cannot sum."""
    from fedguard.federated.strategies import STRATEGIES, Aggregated, AggregationStrategy, register_strategy

    @register_strategy
    class LargestClient(AggregationStrategy):
        """The global adapter becomes the update of the client with the most examples."""
        name = "largest-client"

        def aggregate(self, r):
            if not r.accepted:
                return Aggregated({k: v.clone() for k, v in r.global_adapter.items()})
            top = max(r.accepted, key=lambda u: u.num_examples)
            return Aggregated(r.wire.full_view(top.tensors, r.global_adapter),
                              report={"method": self.name, "client": top.client_id})

    try:
        server = FederatedServer(FedAvg(), max_update_bytes=1 << 20, lora_aggregation="largest-client")
        out = server.aggregate_round(1, GLOBAL, [upd("a", 1.0, 3), upd("b", 5.0, 7), upd("n", float("nan"), 9)],
                                     ServerState())
        assert out.accepted == ["a", "b"] and set(out.rejected) == {"n"}
        assert out.lora_aggregation == {"method": "largest-client", "client": "b"}
        assert all(torch.equal(t, torch.full_like(t, 5.0)) for t in out.global_adapter.values())
        with pytest.raises(ValueError, match="needs naive LoRA aggregation"):
            FederatedServer(FedAvg(), 1 << 20, lora_aggregation="largest-client", secure_clip=1.0)
    finally:
        STRATEGIES.pop("largest-client")
    with pytest.raises(ValueError, match="unknown lora_aggregation 'largest-client' \\(known: flora, naive, product\\)"):
        FederatedServer(FedAvg(), 1 << 20, lora_aggregation="largest-client")


def test_a_secure_round_nobody_took_part_in_moves_nothing():
    """DP's Poisson sampling can draw no client: the secure server gets no sum and no update, and the round is the
    sum of nothing (a run crashed on it before)."""
    server = FederatedServer(FedAvg(), 1 << 20, secure_clip=1.0)
    out = server.aggregate_round(3, GLOBAL, [], ServerState())
    assert out.accepted == [] and out.privacy["clients"] == 0 and out.privacy["skipped"] == "no client took part"
    assert all(torch.equal(out.global_adapter[k], GLOBAL[k]) for k in GLOBAL)
