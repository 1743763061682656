"""The transport boundary (encode on the client, decode on the server), byte metering and compressed runs."""

import math
import statistics

import pytest
import torch

from conftest import killed_and_resumed, tiny_config
from fedguard.config import ConfigError, build_config
from fedguard.federated.aggregation import FedAvg
from fedguard.federated.compression import CompressionSpec, ErrorFeedback, build_codec, payload_to_bytes
from fedguard.federated.server import FederatedServer
from fedguard.federated.transport import (
    WireSpec,
    decode_update,
    downlink_nbytes,
    encode_update,
    uplink_header_nbytes,
    uplink_nbytes,
)
from fedguard.messages import ClientUpdate, ServerState
from fedguard.federated.validation import UpdateRejected, UpdateSpec, validate_update
from fedguard.io import load_tensors, read_ndjson
from fedguard.simulation.runner import run_experiment


def _adapter(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"m.lora_A.weight": (4, 16), "m.lora_B.weight": (8, 4), "n.lora_A.weight": (4, 16),
              "n.lora_B.weight": (12, 4)}
    return {k: scale * torch.randn(s, generator=g) for k, s in shapes.items()}


GLOBAL = _adapter(0)
B_KEYS = ["m.lora_B.weight", "n.lora_B.weight"]


def _local(seed):
    return {k: v + d for (k, v), d in zip(GLOBAL.items(), _adapter(seed, 0.01).values())}


def _update(cid, seed, n=4):
    return ClientUpdate(cid, _local(seed), n, {"train_loss": 1.0})


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("kind", ["none", "fp16", "bf16", "int8", "int8_block", "topk"])
def test_encode_then_decode_gives_back_the_update_within_the_codec_bound(kind):
    spec = WireSpec(CompressionSpec(kind, block_size=16, topk_fraction=0.25), error_feedback=False)
    sent = encode_update(_update("1", 1), GLOBAL, spec)
    assert (sent.payload is None) == (kind == "none") and (sent.tensors == {}) == (kind != "none")
    assert sent.metrics == {"train_loss": 1.0} and sent.num_examples == 4
    back = decode_update(sent, GLOBAL, spec, 1 << 20)
    validate_update(back, UpdateSpec.from_adapter(GLOBAL, 1 << 20))
    local = _local(1)
    for k, t in back.tensors.items():
        err = (t - local[k]).abs().max().item()
        delta = local[k] - GLOBAL[k]
        m = delta.abs().max().item()  # the codecs' stated bounds, plus fp32 rounding of global + delta
        bound = {"none": 0, "fp16": m * 2**-11, "bf16": m * 2**-8, "int8": m / 254, "int8_block": m / 254,
                 "topk": m}[kind] + 1e-6
        assert err <= bound, (k, err, bound)
    if kind == "topk":  # exactly k = ceil(f n) entries moved per tensor
        for k, t in back.tensors.items():
            assert int((t != GLOBAL[k]).sum()) == math.ceil(0.25 * t.numel())
    if kind == "none":
        assert uplink_nbytes(sent) == _nbytes(GLOBAL) and uplink_header_nbytes(sent) == 0
    else:
        assert uplink_nbytes(sent) == len(sent.payload) > uplink_header_nbytes(sent) > 0


def test_ffa_wire_carries_lora_b_only_both_ways():
    spec = WireSpec(lora_b_only=True)
    sent = encode_update(_update("1", 1), GLOBAL, spec)
    assert sorted(sent.tensors) == B_KEYS
    b_bytes = _nbytes({k: GLOBAL[k] for k in B_KEYS})
    assert uplink_nbytes(sent) == b_bytes == downlink_nbytes(GLOBAL, spec)
    compressed = WireSpec(CompressionSpec("int8"), lora_b_only=True)
    back = decode_update(encode_update(_update("1", 1), GLOBAL, compressed), GLOBAL, compressed, 1 << 20)
    assert sorted(back.tensors) == B_KEYS


def test_ffa_server_accepts_b_only_updates_and_keeps_a():
    server = FederatedServer(FedAvg(), 1 << 20, wire=WireSpec(lora_b_only=True))
    b_only = lambda cid, seed: ClientUpdate(cid, {k: _local(seed)[k] for k in B_KEYS}, 2)  # noqa: E731
    with_a = ClientUpdate("a", _local(3), 2)
    missing_b = ClientUpdate("m", {B_KEYS[0]: _local(4)[B_KEYS[0]]}, 2)
    out = server.aggregate_round(1, GLOBAL, [b_only("1", 1), b_only("2", 2), with_a, missing_b], ServerState())
    assert out.accepted == ["1", "2"]
    assert out.rejected["a"].startswith("wrong_keys: 0 missing") and "2 unexpected" in out.rejected["a"]
    assert out.rejected["m"].startswith("wrong_keys: 1 missing")
    for k, t in out.global_adapter.items():
        if k in B_KEYS:
            assert torch.allclose(t, (_local(1)[k] + _local(2)[k]) / 2)
        else:
            assert torch.equal(t, GLOBAL[k])
    assert server.client_config(_round_config(), "1").train_lora_a is False


def _round_config():
    from fedguard.messages import RoundConfig

    return RoundConfig(server_round=1, lr=1e-3, local_steps=1, batch_size=1, grad_accum=1, seed=0)


def _corruptions(blob: bytes):
    yield "truncated", blob[: len(blob) // 2]
    yield "empty", b""
    yield "garbage header", b"\xff" * 16 + blob[16:]
    g = torch.Generator().manual_seed(0)
    for i in range(40):  # random byte flips anywhere: each either decodes to a valid update or is rejected
        b = bytearray(blob)
        pos = int(torch.randint(len(b), (1,), generator=g))
        b[pos] ^= 1 + int(torch.randint(255, (1,), generator=g))
        yield f"flip {pos}", bytes(b)


@pytest.mark.parametrize("kind", ["fp16", "int8", "int8_block", "topk"])
def test_a_corrupted_payload_is_rejected_never_raised(kind):
    spec = WireSpec(CompressionSpec(kind, block_size=16, topk_fraction=0.25), error_feedback=False)
    good = encode_update(_update("1", 1), GLOBAL, spec)
    full = UpdateSpec.from_adapter(GLOBAL, 1 << 20)
    rejected = 0
    for what, blob in _corruptions(good.payload):
        msg = ClientUpdate("1", {}, 4, payload=blob)
        try:
            validate_update(decode_update(msg, GLOBAL, spec, 1 << 20), full)
        except UpdateRejected as exc:
            assert exc.code in ("bad_payload", "non_finite"), (what, exc)
            rejected += 1
    assert rejected >= 3


def test_wrong_encodings_are_rejected_with_their_reason():
    int8 = WireSpec(CompressionSpec("int8"))
    fp16 = WireSpec(CompressionSpec("fp16"))
    plain = WireSpec()
    msg = encode_update(_update("1", 1), GLOBAL, int8)

    def reason(update, spec, max_bytes=1 << 20):
        with pytest.raises(UpdateRejected) as info:
            decode_update(update, GLOBAL, spec, max_bytes)
        return str(info.value)

    assert "encoded with codec 'int8'" in reason(msg, fp16)
    assert reason(msg, plain).startswith("wrong_encoding")
    assert reason(_update("1", 1), int8).startswith("wrong_encoding")
    assert "oversize" in reason(msg, int8, max_bytes=100)
    assert "both" in reason(ClientUpdate("1", _local(1), 4, payload=msg.payload), int8)
    assert "must be bytes" in reason(ClientUpdate("1", {}, 4, payload="text"), int8)
    other = {k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in GLOBAL.items()}
    shaped = ClientUpdate("1", {}, 4, payload=payload_to_bytes(build_codec("int8").encode(other)))
    assert "shape" in reason(shaped, int8)


def test_server_round_goes_on_after_a_corrupted_payload():
    spec = WireSpec(CompressionSpec("int8"))
    server = FederatedServer(FedAvg(), 1 << 20, wire=spec)
    a, b, c = (encode_update(_update(cid, seed), GLOBAL, spec) for cid, seed in (("a", 1), ("b", 2), ("c", 3)))
    b.payload = b.payload[:-40]
    out = server.aggregate_round(1, GLOBAL, [a, b, c], ServerState())
    assert out.accepted == ["a", "c"] and out.rejected["b"].startswith("bad_payload")
    decoded = [decode_update(u, GLOBAL, spec, 1 << 20).tensors for u in (a, c)]
    for k, t in out.global_adapter.items():
        assert torch.allclose(t, (decoded[0][k] + decoded[1][k]) / 2)


def test_error_feedback_memory_survives_a_checkpoint_round_trip():
    """A client's residual (its ``ClientState``) saved and loaded again sends the same bytes next time."""
    spec = WireSpec(CompressionSpec("topk", topk_fraction=0.1))
    memory = ErrorFeedback()
    encode_update(_update("1", 1), GLOBAL, spec, memory)
    saved = memory.state_dict()
    assert saved and all(t.abs().sum() > 0 for t in saved.values())
    restored = ErrorFeedback()
    restored.load_state_dict({k: t.clone() for k, t in saved.items()})
    assert encode_update(_update("1", 5), GLOBAL, spec, memory).payload == \
        encode_update(_update("1", 5), GLOBAL, spec, restored).payload
    # Nothing is lost, only delayed: what was decoded plus the memory is what the client trained.
    dec = decode_update(encode_update(_update("3", 3), GLOBAL, spec), GLOBAL, spec, 1 << 20)
    assert dec.tensors.keys() == GLOBAL.keys()


def test_an_update_that_cannot_be_encoded_is_a_clear_error():
    bad = ClientUpdate("1", {**_local(1), "m.lora_B.weight": torch.full((8, 4), float("nan"))}, 4)
    with pytest.raises(ValueError, match="NaN"):
        encode_update(bad, GLOBAL, WireSpec(CompressionSpec("int8")))
    with pytest.raises(ValueError, match="lacks 1 adapter tensors"):
        encode_update(ClientUpdate("1", {k: v for k, v in _local(1).items() if k != B_KEYS[0]}, 4), GLOBAL,
                      WireSpec())


@pytest.mark.parametrize("section,match", [
    ({"communication": {"compression": "zip"}}, r"communication\.compression"),
    ({"communication": {"topk_fraction": 0}}, r"communication\.topk_fraction"),
    ({"communication": {"block_size": 0}}, r"communication\.block_size"),
    ({"communication": {"ratio": 2}}, r"communication\.ratio: unknown field"),
    ({"lora": {"variant": "lora++"}}, r"lora\.variant"),
    ({"server": {"lora_aggregation": "mean"}}, r"server\.lora_aggregation"),
    ({"server": {"lora_aggregation": "product", "aggregator": "krum"}}, r"server\.lora_aggregation 'product' works "
                                                                          r"with server\.aggregator fedavg"),
    ({"server": {"lora_aggregation": "product"}, "lora": {"variant": "ffa"}}, r"needs lora\.variant 'standard'"),
])
def test_config_errors_name_the_field(section, match):
    with pytest.raises(ConfigError, match=match):
        build_config(section)


# -- runs on the tiny model -------------------------------------------------------------------------------
# r = 32 so that tensor data, not the per-tensor safetensors header, dominates a payload.
LORA = {"r": 32, "alpha": 64}
N_ENTRIES = 2 * (2 * 32 * 64) + 2 * (64 * 32 + 32 * 32)  # A of q and v, B of q (64 out) and v (32 out), 2 layers
SIZES = [32 * 64] * 4 + [64 * 32] * 2 + [32 * 32] * 2


def _traffic(run_dir):
    return [t for r in read_ndjson(run_dir / "metrics.ndjson")[1:] for t in r["communication"].values()]


@pytest.fixture(scope="module")
def codec_runs(tmp_path_factory):
    out = {}
    for kind in ("none", "fp16", "int8", "int8_block", "topk"):
        cfg = tiny_config(lora=LORA, federation={"rounds": 1}, communication={"compression": kind})
        out[kind] = run_experiment(cfg, tmp_path_factory.mktemp(kind) / "r", quiet=True)
    return out


def test_every_run_meters_bytes_per_client(codec_runs):
    result = codec_runs["none"]
    rec = read_ndjson(result.run_dir / "metrics.ndjson")[1]
    assert set(rec["communication"]) == {str(c) for c in rec["sampled"]}
    assert all(t == {"up": 4 * N_ENTRIES, "up_header": 0, "down": 4 * N_ENTRIES, "defense": 0}
               for t in rec["communication"].values())
    assert rec["bytes_up"] == 2 * 4 * N_ENTRIES and rec["bytes_up_mean"] == rec["bytes_down_mean"] == 4 * N_ENTRIES
    final = result.final_metrics
    assert final["bytes_up_total"] == final["bytes_down_total"] == 2 * 4 * N_ENTRIES
    assert final["bytes_up_per_client_round"] == 4 * N_ENTRIES and final["compression"] == "none"
    report = result.report.read_text()
    assert "## Communication" in report and "up KB/client" in report


def test_compressed_uplink_sizes(codec_runs):
    none = _traffic(codec_runs["none"].run_dir)[0]["up"]
    data = {kind: [t["up"] - t["up_header"] for t in _traffic(r.run_dir)] for kind, r in codec_runs.items()}
    ratio = {kind: statistics.fmean([t["up"] for t in _traffic(r.run_dir)]) / none for kind, r in codec_runs.items()}
    # tensor data exactly as each codec states it; the whole payload within a small header of that
    assert set(data["fp16"]) == {2 * N_ENTRIES}
    assert set(data["int8"]) == {N_ENTRIES + 4 * len(SIZES)}
    assert set(data["int8_block"]) == {N_ENTRIES + 4 * sum(-(-n // 256) for n in SIZES)}
    assert set(data["topk"]) == {8 * sum(math.ceil(0.01 * n) for n in SIZES)}
    assert 0.5 < ratio["fp16"] < 0.56 and 0.25 < ratio["int8"] < 0.31 and 0.25 < ratio["int8_block"] < 0.32
    assert abs(data["topk"][0] / none - 0.01 * 2) < 0.01  # ≈ fraction · 8 bytes per entry of 4
    assert ratio["topk"] < 0.1  # the header is most of a top-k payload at this size
    for kind in ("fp16", "int8", "int8_block", "topk"):
        final = codec_runs[kind].final_metrics
        assert final["compression"] == kind and final["after"]["eval_loss"] > 0
        assert read_ndjson(codec_runs[kind].run_dir / "metrics.ndjson")[1]["rejected"] == {}


def test_a_corrupted_payload_in_a_run_is_rejected_and_the_run_goes_on(tmp_path, monkeypatch):
    from fedguard.federated.client import Client
    from fedguard.federated.sampling import sample_clients

    honest_encode = Client.encode
    cfg = tiny_config(federation={"rounds": 2}, communication={"compression": "int8"})
    victim = str(sample_clients(4, 2, cfg.seed, 1)[0])

    def corrupting(self, update, start, rank, state):  # the network cuts the victim's message in half
        sent = honest_encode(self, update, start, rank, state)
        if update.client_id == victim:
            sent.payload = sent.payload[: len(sent.payload) // 2]
        return sent

    monkeypatch.setattr(Client, "encode", corrupting)
    result = run_experiment(cfg, tmp_path / "r", quiet=True)
    records = read_ndjson(result.run_dir / "metrics.ndjson")
    assert records[1]["rejected"][victim].startswith("bad_payload")
    assert len(records[1]["accepted"]) == 1 and result.final_metrics["rounds"] == 2
    assert "bad_payload" in result.report.read_text()


def test_resume_with_compression_and_error_feedback_is_exact(tmp_path):
    cfg = tiny_config(federation={"rounds": 4}, train={"optimizer_state": "keep"},
                      communication={"compression": "topk", "topk_fraction": 0.05, "error_feedback": True})
    full, killed = killed_and_resumed(cfg, tmp_path)
    memory = load_tensors(killed / "checkpoints" / "round_0002" / "client_feedback.safetensors")
    assert memory and all(float(t.abs().sum()) > 0 for t in memory.values())
    ra, rb = read_ndjson(full / "metrics.ndjson"), read_ndjson(killed / "metrics.ndjson")
    assert [r["round"] for r in rb] == [0, 1, 2, 3, 4]
    for x, y in zip(ra[1:], rb[1:]):
        assert x["train_loss"] == y["train_loss"] and x["communication"] == y["communication"]
