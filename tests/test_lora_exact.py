"""Exact LoRA aggregation (lora_exact): every identity checked against dense float64 products."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.federated import lora_exact as le
from fedguard.model.keys import base_layer_key, module_of

PREFIX = "base_model.model.model.layers.{}.self_attn.{}_proj"
MODULES = (PREFIX.format(0, "q"), PREFIX.format(0, "v"), PREFIX.format(1, "q"))


def make_client(rank, seed, out=12, inn=10, modules=MODULES, shared_a=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in modules:
        state[m + ".lora_A.weight"] = (shared_a[m] if shared_a else torch.randn(rank, inn, generator=g, dtype=dtype) / math.sqrt(inn))
        state[m + ".lora_B.weight"] = 0.1 * torch.randn(out, rank, generator=g, dtype=dtype)
    return state


def dense_mean(clients, weights, scalings):
    """Σ p_k s_k B_k A_k per module, formed densely in float64 (the reference)."""
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    out = {}
    for m in le.split_pairs(clients[0]):
        out[m] = sum(float(pk) * sk * (c[m + ".lora_B.weight"].double() @ c[m + ".lora_A.weight"].double())
                     for pk, sk, c in zip(p, scalings, clients))
    return out


def dense(adapter, scaling):
    """``{module: scaling · B A}`` in float64 (the reference product)."""
    return {m: scaling * (p.B.double() @ p.A.double()) for m, p in le.split_pairs(adapter).items()}


def naive_mean(clients, weights):
    """FedAvg's separate A/B mean, tensor by tensor, in float64 (the reference for the naive error)."""
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    return {k: sum(float(pk) * c[k].double() for pk, c in zip(p, clients)) for k in clients[0]}


def rel(x, y):
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


# --- pairing -------------------------------------------------------------------------------------

def test_split_join_round_trip_and_peft_names():
    c = make_client(4, 0)
    pairs = le.split_pairs(c)
    assert list(pairs) == sorted(MODULES)
    p = pairs[MODULES[0]]
    assert (p.rank, p.in_features, p.out_features) == (4, 10, 12)
    assert p.A is c[MODULES[0] + ".lora_A.weight"]
    back = le.join_pairs(pairs)
    assert set(back) == set(c) and all(back[k] is c[k] for k in c)
    assert module_of(MODULES[0] + ".lora_B.weight") == MODULES[0]
    assert base_layer_key(MODULES[0]) == MODULES[0] + ".base_layer.weight"


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.pop(MODULES[0] + ".lora_B.weight"), "not its partner"),
    (lambda c: c.__setitem__("x.lora_magnitude_vector", torch.zeros(3)), "not a PEFT LoRA weight"),
    (lambda c: c.__setitem__(MODULES[0] + ".lora_B.weight", torch.zeros(12, 3)), "rank"),
    (lambda c: c.__setitem__(MODULES[0] + ".lora_A.weight", torch.zeros(4)), "2-D"),
])
def test_split_rejects_malformed(mutate, match):
    c = make_client(4, 0)
    mutate(c)
    with pytest.raises(ValueError, match=match):
        le.split_pairs(c)


def test_scaling():
    assert le.lora_scaling(16, 4) == 4.0 and le.lora_scaling(16, 4, rslora=True) == 8.0
    with pytest.raises(ValueError, match="rank"):
        le.lora_scaling(16, 0)


def test_weights_are_validated():
    cs = [make_client(2, 0), make_client(2, 1)]
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError):
            le.product_average(cs, bad, scalings=1.0, out_scaling=1.0)
    with pytest.raises(ValueError, match="scalings"):
        le.product_average(cs, None, scalings=[1.0], out_scaling=1.0)
    with pytest.raises(ValueError, match="different LoRA modules"):
        le.product_average([cs[0], make_client(2, 1, modules=MODULES[:2])], scalings=1.0, out_scaling=1.0)


def test_lowrank_helpers_match_dense():
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(30, 7, generator=g, dtype=torch.float64), torch.randn(7, 20, generator=g, dtype=torch.float64)
    assert le.lowrank_fro(X, Y) == pytest.approx(float(torch.linalg.matrix_norm(X @ Y)), rel=1e-13)
    U, S, Vh = le.lowrank_svd(X, Y)
    assert torch.allclose(U @ torch.diag(S) @ Vh, X @ Y, atol=1e-12)
    assert torch.allclose(S, torch.linalg.svdvals(X @ Y)[:7], atol=1e-12)


# --- exact product averaging ---------------------------------------------------------------------

def test_full_rank_product_average_is_exact():
    ranks, weights, alpha = (2, 4, 8), [3.0, 1.0, 2.0], 16
    clients = [make_client(r, 10 + i) for i, r in enumerate(ranks)]
    scalings = [le.lora_scaling(alpha, r) for r in ranks]
    ref = dense_mean(clients, weights, scalings)
    out_scaling = le.lora_scaling(alpha, sum(ranks))
    agg = le.product_average(clients, weights, scalings=scalings, out_scaling=out_scaling, rank=sum(ranks),
                             dtype=torch.float64)
    got = dense(agg.adapter, agg.scaling)
    for m in ref:
        assert rel(got[m], ref[m]) < 1e-10
        assert agg.report.modules[m].refactor_rel < 1e-10
        assert agg.report.modules[m].naive_abs is None  # mixed ranks: naive averaging undefined
    assert agg.report.naive_rel is None and agg.report.refactor_rel < 1e-10
    # more rank than needed: zero padding, still exact
    wide = le.product_average(clients, weights, scalings=scalings, out_scaling=1.0, rank=20, dtype=torch.float64)
    assert wide.adapter[MODULES[0] + ".lora_A.weight"].shape == (20, 10)
    assert wide.report.refactor_rel < 1e-10


def test_rank_r_refactorisation_is_eckart_young_and_beats_naive():
    clients = [make_client(4, 20 + i) for i in range(5)]
    weights, s = [1, 2, 3, 4, 5], 2.0
    ref = dense_mean(clients, weights, [s] * 5)
    agg = le.product_average(clients, weights, scalings=s, out_scaling=s, dtype=torch.float64)
    naive_dense = dense(naive_mean(clients, weights), s)
    for m, M in ref.items():
        e = agg.report.modules[m]
        sv = torch.linalg.svdvals(M)
        tail = float(sv[4:].norm())
        assert e.refactor_abs == pytest.approx(tail, rel=1e-9)  # Eckart–Young: the tail singular values
        assert torch.allclose(torch.tensor(e.singular_values, dtype=torch.float64), sv[:20], atol=1e-12)
        # the stored factors reach that error, and the singular values are split symmetrically
        p = le.split_pairs(agg.adapter)[m]
        assert float(torch.linalg.matrix_norm(s * p.B @ p.A - M)) == pytest.approx(tail, rel=1e-9)
        assert torch.allclose(p.B.norm(dim=0), p.A.norm(dim=1), rtol=1e-10)
        # naive separate averaging: measurably wrong, and worse than the best rank-4 answer
        naive_err = float(torch.linalg.matrix_norm(naive_dense[m] - M))
        assert e.naive_abs == pytest.approx(naive_err, rel=1e-9)
        assert e.naive_rel > 0.1 and e.naive_abs > e.refactor_abs
    json.dumps(agg.report.to_dict())
    assert agg.report.naive_rel > agg.report.refactor_rel > 0


def test_naive_average_is_exact_when_a_is_shared():
    shared = {m: torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) for m in MODULES}
    clients = [make_client(4, 30 + i, shared_a=shared) for i in range(4)]
    agg = le.product_average(clients, [1, 1, 2, 5], scalings=0.5, out_scaling=0.5, dtype=torch.float64)
    assert agg.report.naive_rel < 1e-12
    assert agg.report.refactor_rel < 1e-12  # M = B̄ A has rank ≤ 4


def test_fill_seed_keeps_dead_directions_trainable():
    one = make_client(2, 40)
    plain = le.product_average([one], scalings=1.0, out_scaling=1.0, rank=4, dtype=torch.float64)
    filled = le.product_average([one], scalings=1.0, out_scaling=1.0, rank=4, dtype=torch.float64, fill_seed=7)
    m = MODULES[0]
    A0, A1 = plain.adapter[m + ".lora_A.weight"], filled.adapter[m + ".lora_A.weight"]
    assert torch.count_nonzero(A0[2:]) == 0 and bool((A1[2:] != 0).all())
    assert bool((A1[2:].abs() <= 1 / math.sqrt(10)).all())
    assert torch.count_nonzero(filled.adapter[m + ".lora_B.weight"][:, 2:]) == 0
    assert filled.report.refactor_rel < 1e-12


# --- FFA-LoRA -----------------------------------------------------------------------------------

def test_ffa_through_the_server_averages_products_exactly():
    """FFA-LoRA as the server runs it: clients send B only, FedAvg averages B with every A frozen."""
    from fedguard.federated.aggregation import FedAvg
    from fedguard.federated.compression import state_nbytes
    from fedguard.federated.server import FederatedServer
    from fedguard.federated.transport import WireSpec, downlink_nbytes
    from fedguard.messages import ClientUpdate, ServerState

    glob = make_client(4, 60, out=10, inn=10)
    frozen_a = {m: glob[m + ".lora_A.weight"] for m in MODULES}
    clients = [make_client(4, 61 + i, out=10, inn=10, shared_a=frozen_a) for i in range(3)]
    wire = WireSpec(lora_b_only=True)
    assert wire.sent_keys(glob) == sorted(k for k in glob if k.endswith(".lora_B.weight"))
    assert 2 * downlink_nbytes(glob, wire) == state_nbytes(glob)  # square modules: half the traffic
    rect = {"m.lora_A.weight": torch.zeros(4, 30), "m.lora_B.weight": torch.zeros(10, 4)}
    assert 4 * downlink_nbytes(rect, wire) == state_nbytes(rect)  # out / (in + out)
    weights, s = [1, 2, 3], 4.0
    updates = [ClientUpdate(str(i), wire.sent_view(c), n) for i, (c, n) in enumerate(zip(clients, weights))]
    out = FederatedServer(FedAvg(), 1 << 20, wire=wire).aggregate_round(1, glob, updates, ServerState())
    assert out.accepted == ["0", "1", "2"]
    ref, got = dense_mean(clients, weights, [s] * 3), dense(out.global_adapter, s)
    for m in MODULES:
        assert torch.equal(out.global_adapter[m + ".lora_A.weight"], glob[m + ".lora_A.weight"])
        assert rel(got[m], ref[m]) < 1e-13


# --- FLoRA --------------------------------------------------------------------------------------

def test_flora_stacking_is_exact_for_mixed_ranks():
    ranks, weights, alpha = (2, 4, 8), [5, 3, 2], 16
    clients = [make_client(r, 80 + i) for i, r in enumerate(ranks)]
    scalings = [le.lora_scaling(alpha, r) for r in ranks]
    assert scalings == [8.0, 4.0, 2.0]
    ref = dense_mean(clients, weights, scalings)
    for out_scaling in (1.0, le.lora_scaling(alpha, 14)):
        fl = le.flora_stack(clients, weights, scalings=scalings, out_scaling=out_scaling, dtype=torch.float64)
        assert fl.scaling == out_scaling and [r[MODULES[0]] for r in fl.ranks] == list(ranks)
        stacked = dense(fl.adapter, fl.scaling)
        for m in MODULES:
            assert fl.adapter[m + ".lora_A.weight"].shape == (14, 10)
            assert fl.adapter[m + ".lora_B.weight"].shape == (12, 14)
            assert rel(stacked[m], ref[m]) < 1e-13
            assert rel(fl.delta[m], ref[m]) < 1e-13
            # A blocks are the clients' own A, unchanged
            assert torch.equal(fl.adapter[m + ".lora_A.weight"][2:6], clients[1][m + ".lora_A.weight"])
    # default float32 adapter still represents the product to float32 precision
    fl32 = le.flora_stack(clients, weights, scalings=scalings)
    assert fl32.adapter[MODULES[0] + ".lora_A.weight"].dtype == torch.float32
    assert rel(dense(fl32.adapter, 1.0)[MODULES[0]], ref[MODULES[0]]) < 1e-6


def test_merge_delta():
    clients = [make_client(2, 90), make_client(4, 91)]
    fl = le.flora_stack(clients, scalings=[1.0, 0.5])
    base = {m: torch.randn(12, 10) for m in MODULES}
    merged = le.merge_delta(base, fl.delta)
    for m in MODULES:
        assert merged[m].dtype == torch.float32
        assert torch.allclose(merged[m].double(), base[m].double() + fl.delta[m], atol=1e-6)
    with pytest.raises(ValueError, match="no base weight"):
        le.merge_delta({}, fl.delta)
    with pytest.raises(ValueError, match="base weight"):
        le.merge_delta({m: torch.zeros(10, 12) for m in MODULES}, fl.delta)


def test_reinit_adapter_is_seeded_and_peft_like():
    from fedguard.model.lora import initial_adapter_state

    shapes = {k: tuple(v.shape) for k, v in make_client(4, 0).items()}
    a, b = le.reinit_adapter(shapes, 8, seed=3), le.reinit_adapter(shapes, 8, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = le.reinit_adapter(shapes, 8, seed=4)
    assert not torch.equal(a[MODULES[0] + ".lora_A.weight"], c[MODULES[0] + ".lora_A.weight"])
    for m in MODULES:
        A, B = a[m + ".lora_A.weight"], a[m + ".lora_B.weight"]
        assert A.shape == (8, 10) and B.shape == (12, 8) and A.dtype == torch.float32
        assert torch.count_nonzero(B) == 0
        assert float(A.abs().max()) <= 1 / math.sqrt(10) and float(A.std()) > 0.1
    same = le.reinit_adapter(shapes, 4, seed=5)
    ref = initial_adapter_state(shapes, 5)
    assert all(torch.equal(same[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="rank"):
        le.reinit_adapter(shapes, 0, seed=1)


# --- properties ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    out=st.integers(1, 9),
    inn=st.integers(1, 9),
    weights=st.lists(st.floats(0.05, 10.0), min_size=4, max_size=4),
    scalings=st.lists(st.floats(0.1, 8.0), min_size=4, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_exact_aggregation(ranks, out, inn, weights, scalings, seed):
    k = len(ranks)
    clients = [make_client(r, seed + i, out=out, inn=inn, modules=MODULES[:1]) for i, r in enumerate(ranks)]
    w, s = weights[:k], scalings[:k]
    M = dense_mean(clients, w, s)[MODULES[0]]
    scale = float(torch.linalg.matrix_norm(M)) + 1e-300

    full = le.product_average(clients, w, scalings=s, out_scaling=0.7, rank=sum(ranks), dtype=torch.float64)
    got = dense(full.adapter, 0.7)[MODULES[0]]
    assert float(torch.linalg.matrix_norm(got - M)) <= 1e-10 * scale

    fl = le.flora_stack(clients, w, scalings=s, out_scaling=0.7, dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(dense(fl.adapter, 0.7)[MODULES[0]] - M)) <= 1e-12 * scale

    r = min(ranks)
    trunc = le.product_average(clients, w, scalings=s, out_scaling=0.7, rank=r, dtype=torch.float64)
    tail = float(torch.linalg.svdvals(M)[r:].norm())
    assert trunc.report.modules[MODULES[0]].refactor_abs == pytest.approx(tail, rel=1e-7, abs=1e-12 * scale)
    if len(set(ranks)) == 1 and len(set(s)) == 1:
        same = le.product_average(clients, w, scalings=s, out_scaling=s[0], rank=r, dtype=torch.float64)
        e = same.report.modules[MODULES[0]]
        assert e.refactor_abs <= e.naive_abs + 1e-12 * scale  # SVD is the best rank-r answer
