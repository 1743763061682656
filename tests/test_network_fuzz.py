"""What a network sends: arbitrary messages never end a round; each is rejected and named.

Hypothesis builds messages from a valid client update with one to three corruptions (keys, shapes, dtypes,
layouts, devices, values, counts, metrics, attachments, payload bytes, ids), sends them beside two honest
updates, with every defense level and every family of aggregation rules on, and checks that the round
completes, the honest clients count, every corrupted message is rejected under a name that is safe to log,
and nothing the server writes echoes what a client sent.
"""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from fedguard.config import DEFENSE_LEVELS, split_level
from fedguard.federated.server import REASON_CHARS, display_id
from fedguard.messages import ClientUpdate, ServerState

HONEST, OTHERS = ["0", "1"], ["2", "3"]  # the round's roster: two honest clients, two the fuzzer may speak for
GARBAGE_IDS = ["9", "../../etc/passwd\n{\"round\": 1}", "x" * 100_000, 7, None, ("a",), ""]


@pytest.fixture(scope="module")
def arena():
    from fedguard.defenses.features import FeatureSpec
    from fedguard.defenses.probe import LoRAProbe, compat_stamp
    from fedguard.factories import load_resident

    cfg = tiny_config(server={"max_update_mb": 1.0},
                      defense={"audit": {"harmful_examples": 4, "benign_examples": 2}, "evidence_min": 1})
    resident = load_resident(cfg)
    shapes = {k: tuple(v.shape) for k, v in resident.theta0.items()}
    spec = FeatureSpec.build(shapes, "first_B")
    g = torch.Generator().manual_seed(0)
    probe = LoRAProbe(spec, "logistic", {"weight": torch.randn(spec.dim, generator=g), "bias": torch.tensor(0.0)},
                      0.5, compat_stamp({"name": "tiny"}, {"r": 4}, 1e-3, shapes))
    return cfg, resident, probe


def _server(arena, aggregator: str, level: str):
    from fedguard.defenses.defense import Defense, ProbeDefense
    from fedguard.factories import build_audit, build_server

    cfg, resident, probe = arena
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"aggregator": aggregator}),
                                 "defense": cfg.defense.model_copy(update={"level": level})})
    probe_level, audit = split_level(level)
    defense = None
    if probe_level or audit:
        pd = ProbeDefense(cfg.defense, probe, resident.theta0, cfg.train.local_steps, 4, cfg.train.lr) \
            if probe_level else None
        defense = Defense(cfg.defense, pd, build_audit(cfg, resident) if audit else None)
    return build_server(cfg, defense), resident.theta0


def _honest(cid: str, theta0, server, seed: int) -> ClientUpdate:
    """A well-formed update with every attachment the defense asks for."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    rc = server.client_config(server.plan.round_config(1), cid)
    attachments = {}
    for prefix, steps in (("step", rc.local_steps if rc.snapshot_steps else 0), ("shadow", rc.shadow_steps)):
        for t in range(1, steps + 1):
            for k in rc.snapshot_keys:
                attachments[f"{prefix}/{t}/{k}"] = 0.01 * t * torch.randn(theta0[k].shape, generator=g)
    return ClientUpdate(cid, tensors, 24, {"train_loss": 1.0}, attachments)


def _bad_tensor(kind: str, like: torch.Tensor):
    return {
        "shape": lambda: torch.zeros(like.shape[0] + 1, *like.shape[1:]),
        "fp16": lambda: like.half(),
        "int64": lambda: like.long(),
        "bool": lambda: like.bool(),
        "coo": lambda: like.to_sparse(),
        "csr": lambda: like.to_sparse_csr(),
        "meta": lambda: like.to("meta"),
        "nan": lambda: torch.full_like(like, math.nan),
        "inf": lambda: torch.full_like(like, -math.inf),
        "huge": lambda: torch.full_like(like, 1e30),
        "list": lambda: like.tolist(),
        "str": lambda: "A" * 10_000,
        "none": lambda: None,
        "0d": lambda: torch.tensor(1.0),
    }[kind]()


TENSOR_FAULTS = ["shape", "fp16", "int64", "bool", "coo", "csr", "meta", "nan", "inf", "huge", "list", "str", "none",
                 "0d"]
corruption = st.one_of(
    st.tuples(st.just("id"), st.sampled_from(GARBAGE_IDS)),
    st.tuples(st.just("duplicate"), st.sampled_from(HONEST)),
    st.tuples(st.just("tensor"), st.sampled_from(TENSOR_FAULTS)),
    st.tuples(st.just("keys"), st.sampled_from(["drop", "extra", "tuple", "int", "long", "not_a_dict"])),
    st.tuples(st.just("num_examples"), st.sampled_from([0, -1, 2**60, 1.5, True, "7", None])),
    st.tuples(st.just("metrics"), st.sampled_from(["tuple_key", "long_key", "million", "nan", "str", "not_a_dict"])),
    st.tuples(st.just("attachment"), st.sampled_from([*TENSOR_FAULTS, "name", "long_name", "unknown_key"])),
    st.tuples(st.just("payload"), st.binary(min_size=0, max_size=64)),
    st.tuples(st.just("oversize"), st.just(None)),
)


def _corrupt(update: ClientUpdate, faults) -> ClientUpdate:
    key = sorted(update.tensors)[0]
    for what, how in faults:
        if what == "id":
            update.client_id = how
        elif what == "duplicate":
            update.client_id = how
        elif what == "tensor" and isinstance(update.tensors, dict) and key in update.tensors:
            update.tensors[key] = _bad_tensor(how, update.tensors[key])
        elif what == "keys":
            t = update.tensors if isinstance(update.tensors, dict) else {}
            if how == "drop":
                t.pop(key, None)
            elif how == "extra":
                t["model.layers.9.evil.lora_A.weight"] = torch.zeros(2, 2)
            elif how == "tuple":
                t[("a", "b")] = torch.zeros(2, 2)
            elif how == "int":
                t[3] = torch.zeros(2, 2)
            elif how == "long":
                t["k" * 1_000_000] = torch.zeros(2, 2)
            else:
                update.tensors = list(t.values())
        elif what == "num_examples":
            update.num_examples = how
        elif what == "metrics":
            update.metrics = {"tuple_key": {("a", 1): 1.0}, "long_key": {"m" * 10_000_000: 1.0},
                              "million": {f"m{i}": 1.0 for i in range(1_000_000)}, "nan": {"loss": math.nan},
                              "str": {"loss": "x" * 10_000}, "not_a_dict": [1.0]}[how]
        elif what == "attachment":
            ref = next(iter(update.tensors.values())) if isinstance(update.tensors, dict) and update.tensors \
                else torch.zeros(2, 2)
            if not isinstance(ref, torch.Tensor) or ref.layout != torch.strided or ref.device.type != "cpu":
                ref = torch.zeros(2, 2)
            name = {"name": "step/one/" + key, "long_name": "step/1/" + "k" * 1_000_000,
                    "unknown_key": "step/1/model.nothing.lora_B.weight"}.get(how, f"step/1/{key}")
            value = torch.zeros_like(ref.float()) if how in ("name", "long_name", "unknown_key") \
                else _bad_tensor(how, torch.zeros(ref.shape))
            update.attachments = {**update.attachments, name: value}
        elif what == "payload":
            update.payload = how
        elif what == "oversize":
            update.attachments = {**update.attachments, f"shadow/1/{key}": torch.zeros(2**19, dtype=torch.float32)}
    return update


FAMILIES = ["fedavg", "fedadam", "krum", "multikrum", "bulyan", "median", "trimmed_mean", "geomed", "norm_clip",
            "flame", "foolsgold", "dnc", "residual", "lasa"]
SETTINGS = [(agg, "client+audit") for agg in FAMILIES] + [("fedavg", lv) for lv in DEFENSE_LEVELS]


@pytest.mark.parametrize("aggregator,level", SETTINGS, ids=[f"{a}-{lv}" for a, lv in SETTINGS])
def test_no_message_ends_a_round(arena, aggregator, level):
    server, theta0 = _server(arena, aggregator, level)

    @settings(max_examples=12, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(st.lists(corruption, min_size=1, max_size=3), min_size=1, max_size=2), st.integers(0, 1))
    def one_round(fault_lists, first_other):
        honest = [_honest(c, theta0, server, 10 + k) for k, c in enumerate(HONEST)]
        sent = []
        for k, faults in enumerate(fault_lists):
            cid = OTHERS[(first_other + k) % len(OTHERS)]
            sent.append(_corrupt(_honest(cid, theta0, server, 20 + k), faults))
        outcome = server.aggregate_round(1, theta0, honest + sent, ServerState(),
                                         sent_to=HONEST + OTHERS)
        knocked_out = {how for faults in fault_lists for what, how in faults if what == "duplicate"}
        assert set(outcome.accepted) == set(HONEST) - knocked_out
        for cid in knocked_out:  # two messages under one id: neither counts
            assert outcome.rejected[cid].startswith("duplicate")
        for u in sent:
            name = display_id(u.client_id)
            assert name in outcome.rejected and name not in outcome.accepted, (name, outcome.rejected)
        assert not set(outcome.accepted) & set(outcome.rejected)
        assert all(len(name) <= 64 for name in outcome.rejected)
        assert all(len(reason) <= REASON_CHARS for reason in outcome.rejected.values())
        json.dumps({"rejected": outcome.rejected, "accepted": outcome.accepted,
                    "verdicts": [v.to_json() for v in outcome.verdicts]}, allow_nan=False)
        assert all(bool(torch.isfinite(t).all()) for t in outcome.global_adapter.values())

    one_round()


def test_a_client_rejected_then_sending_again_is_not_accepted(arena):
    server, theta0 = _server(arena, "fedavg", "none")
    bad = _honest("2", theta0, server, 1)
    bad.num_examples = 0
    outcome = server.aggregate_round(1, theta0, [_honest("0", theta0, server, 2), bad, _honest("2", theta0, server, 3)],
                                     ServerState(), sent_to=HONEST + OTHERS)
    assert outcome.accepted == ["0"] and set(outcome.rejected) == {"2"}
    assert outcome.rejected["2"].startswith("duplicate")


def test_an_id_that_is_a_path_never_reaches_a_log_as_it_is(arena):
    server, theta0 = _server(arena, "fedavg", "none")
    evil = _honest("0", theta0, server, 1)
    evil.client_id = "../../etc/passwd\n{\"round\": 1}"
    outcome = server.aggregate_round(1, theta0, [evil], ServerState(), sent_to=HONEST + OTHERS)
    (name, reason), = outcome.rejected.items()
    assert name.startswith("invalid-id-") and "/" not in name and reason.startswith("unknown_client")
