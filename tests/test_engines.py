"""The round as role objects, and the Flower engine that runs the same objects."""

import subprocess
import sys

import pytest
import torch

from conftest import run_cli, tiny_config
from fedguard.io import load_tensors, read_ndjson


def test_messages_sit_at_the_bottom_of_the_import_graph():
    code = ("import sys, fedguard.messages; "
            "print(sorted(m for m in sys.modules if m.startswith('fedguard')), 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fedguard', 'fedguard.messages', 'fedguard.model', 'fedguard.model.keys'] False"


def test_one_clients_data_equals_its_entry_among_everyones(tiny_loaded):
    from fedguard.data.federation import build_client_data, build_one_client_data

    tok = tiny_loaded[0].tokenizer
    for cfg in (tiny_config(), tiny_config(data={"partition": {"method": "dirichlet", "alpha": 0.3}})):
        everyone = build_client_data(cfg, tok)
        for cid in (0, 3):
            one = build_one_client_data(cfg, tok, cid)
            assert one.client_id == cid and one.composition == everyone[cid].composition
            assert [e.input_ids for e in one.examples] == [e.input_ids for e in everyone[cid].examples]
    with pytest.raises(ValueError, match="not one of the federation's 4 clients"):
        build_one_client_data(cfg, tok, 4)


def test_client_state_round_trips_and_refuses_unknown_entries():
    from fedguard.federated.client import ClientState

    state = ClientState({"a::step": torch.tensor(3.0)}, {"b": torch.ones(2)})
    back = ClientState.from_state_dict(state.state_dict())
    assert torch.equal(back.optimizer["a::step"], torch.tensor(3.0)) and torch.equal(back.residual["b"], torch.ones(2))
    with pytest.raises(ValueError, match="unknown entries"):
        ClientState.from_state_dict({"weights/x": torch.ones(1)})


def test_configure_tells_each_sampled_client_its_round_and_downlink():
    from fedguard.factories import build_server
    from fedguard.federated.sampling import sample_clients
    from fedguard.messages import ServerState

    cfg = tiny_config(defense={"level": "audit"})
    server = build_server(cfg, None)
    adapter = {"m.lora_A.weight": torch.zeros(4, 8), "m.lora_B.weight": torch.zeros(8, 4)}
    ins = server.configure(2, adapter, ServerState(round=1))
    assert list(ins) == [str(c) for c in sample_clients(4, 2, cfg.seed, 2)]
    first = next(iter(ins.values()))
    assert first.config.server_round == 2 and first.global_adapter is adapter and first.flora_delta is None


def test_a_reply_that_is_not_an_update_is_refused_with_its_reason():
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedguard.flower import records
    from fedguard.messages import ClientUpdate

    good = ClientUpdate("1", {"m.lora_B.weight": torch.ones(2, 2)}, 7, {"train_loss": 1.5})
    back = records.update_from_reply(records.update_content(good), "1")
    assert back.num_examples == 7 and torch.equal(back.tensors["m.lora_B.weight"], torch.ones(2, 2))
    assert back.metrics == {"train_loss": 1.5} and back.payload is None
    blob = bytes(range(256)) * 40_000  # 10 MB: more than one of Flower's 5 MiB chunks
    packed = records.update_from_reply(records.update_content(ClientUpdate("1", {}, 7, payload=blob)), "1")
    assert packed.payload == blob and packed.tensors == {}
    # the client id is the roster's, whatever the content claims
    assert records.update_from_reply(records.update_content(good), "3").client_id == "3"
    with pytest.raises(ValueError, match="lacks the 'meta' record"):
        records.update_from_reply(RecordDict({records.ARRAYS: ArrayRecord({})}), "1")
    with pytest.raises(ValueError, match="num_examples"):
        records.update_from_reply(RecordDict({records.ARRAYS: ArrayRecord({}),
                                              records.META: ConfigRecord({"num_examples": "many"})}), "1")


@pytest.mark.parametrize("sections", [
    {"defense": {"level": "audit", "audit": {"harmful_examples": 4, "benign_examples": 4}}},
    {"lora": {"variant": "flora", "client_ranks": [2, 4, 4, 2]}},
    {"communication": {"compression": "topk", "topk_fraction": 0.1, "error_feedback": True},
     "train": {"optimizer_state": "keep"}, "attack": {"kind": "scaling", "malicious_clients": 1}},
], ids=["audit", "flora", "topk-feedback-keep-attack"])
def test_flower_simulation_gives_the_embedded_result(tmp_path, sections):
    """`fedguard run --engine flower-sim` (ServerApp + ClientApp on Ray, clients in another process) ends with
    the same adapter and the same per-round records as the embedded engine."""
    from fedguard.simulation.runner import run_experiment

    cfg = tiny_config(federation={"rounds": 3}, **sections)
    embedded = run_experiment(cfg, tmp_path / "embedded", quiet=True).run_dir
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    done = run_cli("run", str(path), "--engine", "flower-sim", "--run-dir", str(tmp_path / "flower"), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_tensors(embedded / "final_adapter" / "adapter_model.safetensors")
    b = load_tensors(tmp_path / "flower" / "final_adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_ndjson(embedded / "metrics.ndjson"), read_ndjson(tmp_path / "flower" / "metrics.ndjson")
    assert [r["round"] for r in rb] == [0, 1, 2, 3]
    for x, y in zip(ra[1:], rb[1:]):
        assert (x["sampled"], x["accepted"], x["rejected"]) == (y["sampled"], y["accepted"], y["rejected"])
        assert x["train_loss"] == y["train_loss"] and x["clients"].keys() == y["clients"].keys()
        assert set(y["transport_bytes"]) == {str(c) for c in y["sampled"]}
        assert all(t["up"] > 0 and t["down"] > 0 for t in y["transport_bytes"].values())
    if "flora" in str(sections):  # FLoRA's result is the merged update in the base weights
        da = load_tensors(embedded / "final_merged_delta.safetensors")
        db = load_tensors(tmp_path / "flower" / "final_merged_delta.safetensors")
        assert da and set(da) == set(db) and all(torch.equal(da[k], db[k]) for k in da)
        assert any(float(d.abs().max()) > 0 for d in da.values())


def test_a_checkpoint_restores_server_and_client_state_exactly(tmp_path):
    """What resume reads back is what was saved: server tensors and meta, each client's optimizer moments
    and error-feedback residual; and the run continues from the round after it."""
    from fedguard.federated.client import ClientState
    from fedguard.messages import ServerState
    from fedguard.simulation.checkpoint import list_checkpoints, load_checkpoint
    from fedguard.simulation.runner import _start_or_resume, run_experiment
    from fedguard.factories import build_server, load_resident

    cfg = tiny_config(federation={"rounds": 2}, train={"optimizer_state": "keep"},
                      server={"aggregator": "fedadam"},
                      communication={"compression": "topk", "topk_fraction": 0.1, "error_feedback": True})
    run = run_experiment(cfg, tmp_path / "r", quiet=True).run_dir
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    assert ckpt.round == 2 and ckpt.server_state.tensors  # FedAdam's moments
    assert ckpt.client_states and all(s.optimizer and s.residual for s in ckpt.client_states.values())
    resident = load_resident(cfg)
    server = build_server(cfg)
    start, adapter, state, clients, _ = _start_or_resume(cfg, run, True, resident, server)
    assert start == 3 and state.round == 2
    assert all(torch.equal(adapter[k], ckpt.global_adapter[k]) for k in adapter)
    assert state.tensors.keys() == ckpt.server_state.tensors.keys()
    assert all(torch.equal(state.tensors[k], ckpt.server_state.tensors[k]) for k in state.tensors)
    assert clients.keys() == ckpt.client_states.keys()
    for cid, st in clients.items():
        saved = ckpt.client_states[cid]
        assert isinstance(st, ClientState)
        for mine, theirs in ((st.optimizer, saved.optimizer), (st.residual, saved.residual)):
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    fresh = _start_or_resume(cfg, run, False, resident, server)
    assert fresh[0] == 1 and fresh[2] == ServerState() and fresh[3] == {}
    plain = tiny_config(federation={"rounds": 2}, train={"optimizer_state": "keep"}, server={"aggregator": "fedadam"})
    with pytest.raises(ValueError, match="keeps none"):  # the residual would be dropped without a word
        _start_or_resume(plain, run, True, resident, build_server(plain))


def test_a_node_with_its_own_file_trains_on_that_file(tiny_loaded, tmp_path):
    """`fedguard deploy supernode --data-path`: the node's data is its file, sampled from the config's seed."""
    import json
    from types import SimpleNamespace

    from fedguard.flower.client_app import _node_data, client_id_of

    path = tmp_path / "site.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}."}) + "\n"
                            for i in range(40)))
    cfg = tiny_config()
    ctx = SimpleNamespace(node_config={"partition-id": 2, "data-path": str(path)})
    assert client_id_of(ctx, cfg) == 2
    data = _node_data(cfg, tiny_loaded[0].tokenizer, 2, ctx)
    assert data.client_id == 2 and len(data) == cfg.data.examples_per_client
    again = _node_data(cfg, tiny_loaded[0].tokenizer, 2, ctx)
    assert [e.input_ids for e in data.examples] == [e.input_ids for e in again.examples]
    assert "plus" in tiny_loaded[0].tokenizer.decode(data.examples[0].input_ids)
    with pytest.raises(ValueError, match="partition-id 7 is not one of"):
        client_id_of(SimpleNamespace(node_config={"partition-id": 7}), cfg)


def test_the_offline_switches_are_the_ones_flower_and_ray_read():
    """Telemetry, the update check and Ray's usage statistics are off; the names are Flower's own."""
    import inspect

    from flwr.supercore import constant, telemetry

    from fedguard.flower import OFFLINE_ENV

    assert OFFLINE_ENV["FLWR_DISABLE_UPDATE_CHECK"] == "1" and constant.FLWR_DISABLE_UPDATE_CHECK in OFFLINE_ENV
    assert OFFLINE_ENV["FLWR_TELEMETRY_ENABLED"] == "0"
    assert '"FLWR_TELEMETRY_ENABLED"' in inspect.getsource(telemetry)
    assert OFFLINE_ENV["RAY_USAGE_STATS_ENABLED"] == "0"
