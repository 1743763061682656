"""Secure aggregation on the Flower engine: Flower's SecAggPlusWorkflow and secaggplus_mod, end to end on Flower's
simulation runtime, against the exact sums of the same clients' clipped updates (the embedded engine's)."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedguard.io import load_tensors, read_ndjson

SECURE = {"secure_aggregation": "secagg+", "clip": 0.01}  # a small clip: the clients' updates are clipped


def _config(**privacy):
    return tiny_config(federation={"rounds": 2, "clients_per_round": 3}, privacy={**SECURE, **privacy})


def _run_both(cfg, tmp):
    """The Flower run (server side spied on: each round's replies, what the grid brought back, what the
    strategy received, the global adapter before and after) and the embedded run (each round's updates: the
    clipped updates in plain, to compute the exact sums)."""
    import fedguard.federated.server as server_mod
    import fedguard.flower.secagg as sa
    import fedguard.privacy.secagg as ps
    from fedguard.flower.simulation import run_flower_simulation
    from fedguard.simulation.runner import run_experiment

    seen = {"replies": [], "grid": [], "strategy": [], "rounds": [], "plain": []}
    exchange, send, aggregate_fit = sa.secure_exchange, sa.MeteredGrid.send_and_receive, sa.RoundStrategy.aggregate_fit
    aggregate_round, round_sum = server_mod.FederatedServer.aggregate_round, ps.secure_round_sum

    def spy_exchange(*args, **kwargs):
        replies = exchange(*args, **kwargs)
        seen["replies"].append(replies)
        return replies

    def spy_send(self, messages, *, timeout=None):
        replies = send(self, messages, timeout=timeout)
        seen["grid"].append((self.stages[-1], dict(self.clients), list(replies)))
        return replies

    def spy_aggregate_fit(self, server_round, results, failures):
        seen["strategy"].append(list(results))
        return aggregate_fit(self, server_round, results, failures)

    def spy_aggregate_round(self, server_round, global_adapter, *args, **kwargs):
        before = {k: t.clone() for k, t in global_adapter.items()}
        outcome = aggregate_round(self, server_round, global_adapter, *args, **kwargs)
        seen["rounds"].append((before, outcome.global_adapter))
        return outcome

    def spy_round_sum(updates, sent_global, settings, seed, dropped=()):
        out = round_sum(updates, sent_global, settings, seed, dropped)
        seen["plain"].append(({u.client_id: u for u in updates}, sent_global, settings, out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sa, "secure_exchange", spy_exchange)
        mp.setattr(sa.MeteredGrid, "send_and_receive", spy_send)
        mp.setattr(sa.RoundStrategy, "aggregate_fit", spy_aggregate_fit)
        mp.setattr(server_mod.FederatedServer, "aggregate_round", spy_aggregate_round)
        flower = run_flower_simulation(cfg, tmp / "flower").run_dir
        mp.setattr(ps, "secure_round_sum", spy_round_sum)
        embedded = run_experiment(cfg, tmp / "embedded", quiet=True).run_dir
    return flower, embedded, seen


def _exact(updates, sent_global, clients):
    """The plain sum of ``clients``' clipped updates (local - global, float64) and of their bits."""
    total = {k: sum(updates[c].tensors[k].double() - g.double() for c in clients) for k, g in sent_global.items()}
    return total, sum(float(updates[c].metrics.get("dp_unclipped", 0.0)) for c in clients)


def _plain_vector(update, sent_global):
    flat = [(update.tensors[k].double() - sent_global[k].double()).reshape(-1) for k in sorted(sent_global)]
    return np.append(torch.cat(flat).numpy(), float(update.metrics.get("dp_unclipped", 0.0)))


def _check_sums(seen):
    """Every round's Flower sum is the exact sum of the same clients' clipped updates within the quantisation
    error (one step 2c/Q per client, stochastic rounding)."""
    assert len(seen["replies"]) == len(seen["plain"]) == 2
    for replies, (updates, sent_global, settings, out) in zip(seen["replies"], seen["plain"]):
        summed = replies.summed
        assert summed.clients == out.clients and len(summed.clients) >= 2
        total, bits = _exact(updates, sent_global, summed.clients)
        bound = len(summed.clients) * 2 * settings.clipping_range / settings.quantization_range + 1e-12
        biggest = max(float(t.abs().max()) for t in total.values())
        assert biggest > 100 * bound  # the check below would see a sum scaled by 1/n (or anything but the sum)
        for k in total:
            assert summed.total[k].dtype == torch.float64 and summed.total[k].shape == sent_global[k].shape
            assert float((summed.total[k] - total[k]).abs().max()) <= bound, k
        assert abs(summed.unclipped - bits) <= bound


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    return _run_both(_config(), tmp_path_factory.mktemp("secagg"))


def test_flower_secagg_sums_the_clients_clipped_updates(secure_run):
    flower, embedded, seen = secure_run
    records = read_ndjson(flower / "metrics.ndjson")
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        p = r["privacy"]
        assert (p["mode"], p["secure_aggregation"], p["clients"], p["dropped"]) == ("secure_aggregation", "secagg+",
                                                                                   3, [])
        assert p["bytes_up"] > 0 and p["bytes_down"] > 0 and r["rejected"] == {}
        assert sorted(r["accepted"]) == sorted(str(c) for c in r["sampled"])
        assert set(r["clients"]) == {str(c) for c in r["sampled"]}
        assert all("train_loss" in m and "dp_unclipped" not in m for m in r["clients"].values())
        assert set(r["transport_bytes"]) == {str(c) for c in r["sampled"]}
        assert all(t["up"] > 0 and t["down"] > 0 for t in r["transport_bytes"].values())
    _check_sums(seen)

    # the global adapter after round 1: global + (sum of the clients' clipped deltas) / count (FedAvg)
    before, after = seen["rounds"][0]
    updates, sent_global, settings, out = seen["plain"][0]
    total, _ = _exact(updates, sent_global, out.clients)
    step = 2 * settings.clipping_range / settings.quantization_range
    for k in before:
        expected = before[k].double() + total[k] / len(out.clients)
        assert float((after[k].double() - expected).abs().max()) <= step + 1e-6 * float(before[k].abs().max() + 1), k
    assert any(float((after[k] - before[k]).abs().max()) > 100 * step for k in before)

    # both engines sum the same clipped updates: the same adapter, within the quantisation error
    a = load_tensors(embedded / "final_adapter" / "adapter_model.safetensors")
    b = load_tensors(flower / "final_adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_the_flower_server_never_holds_one_clients_plain_update(secure_run):
    from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    _, _, seen = secure_run
    assert all(replies.messages == [] for replies in seen["replies"])
    # no reply any node sent the server carries an array: the mod cleared the plain vector from it
    for stage, _, replies in seen["grid"]:
        for reply in replies:
            assert not reply.has_error()
            assert all(len(record) == 0 for record in reply.content.array_records.values()), stage
    # what each node uploaded in the masking stage is a masked integer vector, unrelated to its quantised vector
    uploads = [(clients, replies) for stage, clients, replies in seen["grid"] if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(uploads) == 2
    for (clients, replies), (updates, sent_global, settings, _) in zip(uploads, seen["plain"]):
        for reply in replies:
            factor, masked = (bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][
                Key.MASKED_PARAMETERS])
            assert np.issubdtype(masked.dtype, np.integer) and factor.shape == (1,)
            plain = _plain_vector(updates[clients[reply.metadata.src_node_id]], sent_global)
            [q] = quantize([plain], settings.clipping_range, settings.quantization_range)
            assert masked.shape == q.shape and np.mean(np.abs(masked.astype(np.int64) - q) <= 1) < 0.01
    # the strategy receives the aggregate and nothing else: every result carries the same (mean) vector
    for results, replies in zip(seen["strategy"], seen["replies"]):
        assert len(results) == replies.summed.count
        first = results[0][1].parameters.tensors
        assert all(fitres.parameters.tensors == first for _, fitres in results)
        [mean] = parameters_to_ndarrays(results[0][1].parameters)
        flat = np.concatenate([replies.summed.total[k].reshape(-1).numpy() for k in sorted(replies.summed.total)])
        assert np.allclose(mean[:-1] * len(results), flat, rtol=0, atol=1e-12)


def test_flower_secagg_with_distributed_dp_and_dropouts(tmp_path):
    """Client-level DP (distributed noise) inside the secure sum, and one client of three dropping after key
    sharing each round: the workflow removes its masks from its neighbours' shares."""
    cfg = _config(client_dp="distributed", noise_multiplier=0.5, secagg_dropout=0.34)
    flower, embedded, seen = _run_both(cfg, tmp_path)
    for r in read_ndjson(flower / "metrics.ndjson")[1:]:
        p = r["privacy"]
        assert (p["mode"], p["secure_aggregation"], p["clients"], len(p["dropped"])) == ("distributed", "secagg+", 2, 1)
        assert p["epsilon"] > 0 and p["noise_multiplier"] == 0.5
        assert r["rejected"] == {p["dropped"][0]: "dropped out after key sharing (simulated); its masks were removed "
                                                  "from the sum"}
        assert sorted(r["accepted"]) == sorted(set(r["clients"])) and p["dropped"][0] not in r["accepted"]
    _check_sums(seen)
    a = load_tensors(embedded / "final_adapter" / "adapter_model.safetensors")
    b = load_tensors(flower / "final_adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_a_node_configured_for_secagg_never_answers_a_plain_train_message():
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedguard.flower.secagg import client_mod

    def call_next(msg, context):
        called.append(msg)
        return msg

    def node(cfg):
        return client_mod(lambda context: cfg, lambda context, c: 0)

    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    plain = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type="train")
    called = []
    node(tiny_config())(plain, context, call_next)  # secure aggregation off: the handler gets the message as is
    assert called == [plain]
    called = []
    with pytest.raises(KeyError, match="secaggplus_configs"):
        node(_config())(plain, context, call_next)
    assert called == []


def test_fewer_than_two_clients_with_a_node_sum_nothing_and_send_nothing():
    from types import SimpleNamespace

    from fedguard.factories import build_server
    from fedguard.flower.secagg import secure_exchange
    from fedguard.messages import ServerState

    cfg = _config()
    adapter = {"m.lora_A.weight": torch.zeros(4, 8), "m.lora_B.weight": torch.ones(8, 4)}
    instructions = build_server(cfg).configure(1, adapter, ServerState())
    first, *others = list(instructions)
    grid = SimpleNamespace(send_and_receive=lambda *a, **k: pytest.fail("nothing should be sent"))
    replies = secure_exchange(grid, cfg, {first: 11}, 1, instructions, SimpleNamespace(status=lambda text: None))
    assert replies.messages == [] and replies.summed.count == 0 and "skipped" in replies.summed.report
    assert all(float(t.abs().max()) == 0 and t.dtype == torch.float64 for t in replies.summed.total.values())
    assert replies.failed[first].startswith("secure_aggregation: 1 client(s) with a node")
    assert all(replies.failed[c].startswith("no_node") for c in others)
