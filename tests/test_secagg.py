"""Secure aggregation (SecAgg+ on Flower's primitives, in process): exact-up-to-quantisation sums, dropout recovery,
masking, thresholds, reproducibility, input checks."""

from __future__ import annotations

import numpy as np
import pytest

from fedguard.privacy.secagg import (
    SecAggClient,
    SecAggServer,
    SecAggSettings,
    secure_sum,
)

DIM = 1000
SETTINGS = SecAggSettings(clipping_range=2.0)


def _vectors(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"c{i}": rng.uniform(-1.5, 1.5, DIM) for i in range(n)}


def _bound(n_survivors: int, settings: SecAggSettings) -> float:
    # Stochastic rounding moves each client's coordinate by less than one step 2c/T.
    return n_survivors * settings.clipping_range * 2 / settings.quantization_range


@pytest.mark.parametrize("dropped", [(), ("c1",), ("c1", "c4")])
def test_secure_sum_matches_plain_sum_with_dropouts(dropped):
    vectors = _vectors(7)
    out = secure_sum(vectors, SETTINGS, seed=1, dropped=dropped)
    survivors = sorted(set(vectors) - set(dropped))
    plain = np.sum([vectors[c] for c in survivors], axis=0)
    assert out.total.dtype == np.float64 and out.total.shape == (DIM,)
    assert np.max(np.abs(out.total - plain)) <= _bound(len(survivors), SETTINGS)
    assert out.survivors == survivors and out.dropped == sorted(dropped)
    # Every survivor uploads its masked vector (int64, DIM coordinates) on top of keys and shares.
    assert out.bytes_up > len(survivors) * DIM * 8 and out.bytes_down > 0


def test_secaggplus_graph_with_dropout():
    settings = SecAggSettings(clipping_range=2.0, share_fraction=0.5)
    vectors = _vectors(8, seed=3)
    server = SecAggServer(list(vectors), settings, seed=5)
    assert server.num_shares == 5 and server.threshold == 3  # odd share count below n, Flower's rule
    assert all(len(nb) == 5 for nb in server.neighbours.values())
    out = secure_sum(vectors, settings, seed=5, dropped=["c2"])
    plain = np.sum([v for c, v in vectors.items() if c != "c2"], axis=0)
    assert np.max(np.abs(out.total - plain)) <= _bound(7, settings)


def test_values_beyond_clipping_range_are_clipped():
    vectors = _vectors(5)
    vectors["c0"][:3] = [10.0, -10.0, 2.5]
    out = secure_sum(vectors, SETTINGS, seed=0)
    clipped = np.sum([np.clip(v, -2.0, 2.0) for v in vectors.values()], axis=0)
    assert np.max(np.abs(out.total - clipped)) <= _bound(5, SETTINGS)


def test_server_holds_only_masked_vectors():
    # Drive the stages by hand to look inside the server.
    vectors = _vectors(5)
    server = SecAggServer(list(vectors), SETTINGS, seed=0)
    clients = {nid: SecAggClient(name, nid, seed=0) for name, nid in server.node_ids.items()}
    keys = {nid: clients[nid].setup(cfg) for nid, cfg in server.setup().items()}
    encrypted = {nid: clients[nid].share_keys(pks) for nid, pks in server.collect_public_keys(keys).items()}
    forwarded = server.collect_encrypted_shares(encrypted)
    masked = {nid: clients[nid].mask(cts, vectors[clients[nid].client_id]) for nid, cts in forwarded.items()}
    requests = server.collect_masked_vectors(masked)

    for nid, stored in server.masked_vectors.items():
        quantized = clients[nid].quantized
        assert quantized is not None and stored.shape == quantized.shape
        assert np.mean(stored != quantized) > 0.99  # the mask hides the quantised vector
        assert stored.min() >= 0 and stored.max() < SETTINGS.modulus_range
        # Masked values look uniform on [0, M), whatever the (concentrated) quantised input.
        assert abs(stored.mean() / SETTINGS.modulus_range - 0.5) < 0.05

    total = server.unmask({nid: clients[nid].reveal_shares(a, d) for nid, (a, d) in requests.items()})
    assert np.max(np.abs(total - np.sum(list(vectors.values()), axis=0))) <= _bound(5, SETTINGS)


def test_client_refuses_to_reveal_both_secrets_of_a_peer():
    vectors = _vectors(3)
    server = SecAggServer(list(vectors), SETTINGS, seed=0)
    clients = {nid: SecAggClient(name, nid, seed=0) for name, nid in server.node_ids.items()}
    keys = {nid: clients[nid].setup(cfg) for nid, cfg in server.setup().items()}
    encrypted = {nid: clients[nid].share_keys(pks) for nid, pks in server.collect_public_keys(keys).items()}
    for nid, cts in server.collect_encrypted_shares(encrypted).items():
        clients[nid].mask(cts, vectors[clients[nid].client_id])
    with pytest.raises(ValueError, match="both surviving and dropped"):
        clients[1].reveal_shares([1, 2, 3], [2])


def test_too_many_dropouts_raise_naming_the_threshold():
    vectors = _vectors(7)  # 7 shares each, threshold round(0.67 * 7) = 5: at most 2 may drop
    with pytest.raises(ValueError, match="reconstruction threshold 5"):
        secure_sum(vectors, SETTINGS, seed=1, dropped=["c0", "c3", "c5"])


def test_same_seed_same_total_and_global_rng_untouched():
    vectors = _vectors(5)
    np.random.seed(123)
    before = np.random.get_state()
    a = secure_sum(vectors, SETTINGS, seed=7, dropped=["c2"])
    after = np.random.get_state()
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]
    np.random.seed(456)  # the caller's global RNG must not matter
    b = secure_sum(vectors, SETTINGS, seed=7, dropped=["c2"])
    assert np.array_equal(a.total, b.total)  # fresh keys each run; masks cancel, rounding is seeded
    c = secure_sum(vectors, SETTINGS, seed=8, dropped=["c2"])
    assert not np.array_equal(a.total, c.total)  # another seed rounds differently


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_raises(bad):
    vectors = _vectors(3)
    vectors["c1"][10] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        secure_sum(vectors, SETTINGS, seed=0)


def test_bad_shapes_and_too_few_clients_raise():
    vectors = _vectors(3)
    vectors["c2"] = vectors["c2"][:-1]
    with pytest.raises(ValueError, match="one length"):
        secure_sum(vectors, SETTINGS, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        secure_sum(_vectors(1), SETTINGS, seed=0)
    with pytest.raises(ValueError, match="not among"):
        secure_sum(_vectors(3), SETTINGS, seed=0, dropped=["nobody"])
    with pytest.raises(ValueError, match="modulus_range"):
        SecAggSettings(clipping_range=1.0, modulus_range=3 * 2**22)
