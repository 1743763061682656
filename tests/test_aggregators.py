"""Server aggregation rules: hand-computed cases, properties, defense-weight composition, resume, config."""

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedguard.aggregators import (
    Bulyan, DnC, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Flame, FoolsGold, GeoMed, Krum, Lasa,
    Median, MultiKrum, NormClip, Residual, TrimmedMean,
)
from fedguard.aggregators.foolsgold import foolsgold_weights
from fedguard.aggregators.lasa import sparsify
from fedguard.config import AggregatorName, ConfigError, ServerConfig, build_config
from fedguard.federated.aggregation import AGGREGATORS, build_aggregator
from fedguard.messages import ClientUpdate, ServerState
from fedguard.io import load_tensors, save_tensors

SQRT3 = math.sqrt(3.0)


# -- helpers -------------------------------------------------------------------------------------------------
def adapter(values, dtype=torch.float64):
    """A one-tensor adapter {"w": values}."""
    return {"w": torch.tensor(values, dtype=dtype).reshape(-1)}


def updates_of(rows, examples=None, ids=None):
    examples = examples or [1] * len(rows)
    ids = ids or [str(i) for i in range(len(rows))]
    return [ClientUpdate(cid, adapter(r), n) for cid, r, n in zip(ids, rows, examples)]


def run(rule, rows, weights=None, global_values=None, state=None, examples=None, ids=None):
    """The new global "w" (a float list) after ``rule`` aggregates the client vectors ``rows``."""
    global_values = global_values if global_values is not None else [0.0] * len(rows[0])
    out = rule.aggregate(adapter(global_values), updates_of(rows, examples, ids), state or ServerState(),
                         client_weights=weights)
    return out["w"].tolist()


def approx(values, rel=1e-9, abs=1e-9):
    return pytest.approx(values, rel=rel, abs=abs)


def every_rule(f=1, seed=0):
    """One instance of every registered rule, robust ones told to expect ``f`` attackers."""
    return {name: build_aggregator(ServerConfig(aggregator=name, expected_malicious=f), seed) for name in AGGREGATORS}


def random_rows(seed, n, d, scale=1.0):
    return (np.random.default_rng(seed).standard_normal((n, d)) * scale).tolist()


# -- hand-computed cases ---------------------------------------------------------------------------------------
def test_fedavg_and_fedprox_are_the_example_weighted_mean():
    rows = [[1.0, 2.0], [5.0, 6.0]]
    assert run(FedAvg(), rows, examples=[1, 3]) == approx([(1 + 15) / 4, (2 + 18) / 4])
    assert run(FedProx(0.5), rows, examples=[1, 3]) == approx([4.0, 5.0])
    # defense weights multiply the example counts: 1·1 and 3·(1/3)
    assert run(FedAvg(), rows, weights=[1.0, 1 / 3], examples=[1, 3]) == approx([3.0, 4.0])
    assert FedProx(0.5).client_config() == {"proximal_mu": 0.5} and FedAvg().client_config() == {}


def test_fedavgm_accumulates_server_momentum():
    rule, state = FedAvgM(lr=1.0, momentum=0.5), ServerState()
    assert run(rule, [[1.0], [3.0]], state=state) == approx([2.0])  # v = 2
    state.round = 1
    # next round, from global 2, the mean delta is 1: v = 0.5·2 + 1 = 2, global 4
    assert run(rule, [[3.0], [3.0]], global_values=[2.0], state=state) == approx([4.0])
    # lr scales the step: v = 2, step 0.5·2
    assert run(FedAvgM(lr=0.5, momentum=0.5), [[1.0], [3.0]]) == approx([1.0])


@pytest.mark.parametrize("rule, expected", [
    # Δ = 2, β1 = 0.5, τ = 1, η = 1: m = 1; v₋₁ = τ² = 1
    (FedAdagrad(lr=1.0, beta1=0.5, tau=1.0), 1 / (math.sqrt(1 + 4) + 1)),            # v = 1 + 4
    (FedAdam(lr=1.0, beta1=0.5, beta2=0.75, tau=1.0), 1 / (math.sqrt(1.75) + 1)),    # v = .75 + .25·4
    (FedYogi(lr=1.0, beta1=0.5, beta2=0.75, tau=1.0), 1 / (math.sqrt(2.0) + 1)),     # v = 1 − .25·4·sign(1 − 4)
])
def test_adaptive_server_optimisers_first_step(rule, expected):
    assert run(rule, [[1.0], [3.0]]) == approx([expected])


def test_adaptive_optimiser_second_step_uses_stored_moments():
    rule, state = FedAdam(lr=1.0, beta1=0.5, beta2=0.75, tau=1.0), ServerState()
    first = run(rule, [[2.0]], state=state)[0]
    state.round = 1
    second = run(rule, [[first + 2.0]], global_values=[first], state=state)[0]
    m, v = 0.5 * 1.0 + 0.5 * 2.0, 0.75 * 1.75 + 0.25 * 4.0  # m₁ = 1, v₁ = 1.75; Δ = 2 again
    assert second - first == pytest.approx(m / (math.sqrt(v) + 1.0), rel=1e-12)


# 1-D points 0, 1, 2, 6, 30 with f = 1: Krum sums the n − f − 2 = 2 smallest squared distances:
# 0 → 1 + 4 = 5, 1 → 1 + 1 = 2, 2 → 1 + 4 = 5, 6 → 16 + 25 = 41, 30 → 576 + 784 = 1360.
KRUM_POINTS = [[0.0], [1.0], [2.0], [6.0], [30.0]]


def test_krum_picks_the_lowest_score():
    assert run(Krum(expected_malicious=1), KRUM_POINTS) == [1.0]


def test_multikrum_averages_the_m_lowest_scores():
    assert run(MultiKrum(expected_malicious=1), KRUM_POINTS) == approx([(0 + 1 + 2 + 6) / 4])  # m = n − f = 4
    assert run(MultiKrum(expected_malicious=1, selected=3), KRUM_POINTS) == approx([1.0])
    # the selected set's mean carries the defense weights
    assert run(MultiKrum(expected_malicious=1, selected=3), KRUM_POINTS, weights=[1, 1, 2, 1, 1]) \
        == approx([(0 + 1 + 2 * 2) / 4])


def test_krum_neighbourhood_mean_is_the_safe_fedllm_variant():
    # unsquared distances to the n − f − 1 = 3 nearest plus self: 1 → 0+1+1+5 = 7 (2 ties, same group)
    assert run(Krum(expected_malicious=1, neighbourhood_mean=True), KRUM_POINTS) == approx([(0 + 1 + 2 + 6) / 4])


def test_bulyan_selects_with_krum_then_averages_values_closest_to_the_median():
    # n = 7, f = 1: Krum picks θ = 5 points (2, 3, 1, 6, 4; the outlier 100 never), their median is 3,
    # and the β = θ − 2f = 3 values closest to it (2, 3, 4) are averaged.
    points = [[0.0], [1.0], [2.0], [3.0], [4.0], [6.0], [100.0]]
    assert run(Bulyan(expected_malicious=1), points) == approx([3.0])
    # per coordinate: second coordinate mirrored
    points2 = [[p[0], -p[0]] for p in points]
    assert run(Bulyan(expected_malicious=1), points2) == approx([3.0, -3.0])


def test_median_is_coordinate_wise_and_weighted():
    rows = [[1.0, 10.0], [2.0, 20.0], [100.0, -5.0]]
    assert run(Median(), rows) == approx([2.0, 10.0])
    assert run(Median(), rows, weights=[1, 1, 3]) == approx([100.0, -5.0])  # 3/5 of the weight
    # cumulative weight hits exactly half at 2 (first coordinate: 1, 2 | 100) and at -5 (second:
    # -5 | 10, 20): midpoints with the next value
    assert run(Median(), rows, weights=[1, 1, 2]) == approx([(2 + 100) / 2, (-5 + 10) / 2])
    assert run(Median(), [[1.0], [2.0], [3.0], [10.0]]) == approx([2.5])  # even n: mean of the middle two


def test_trimmed_mean_drops_each_end_then_averages():
    rows = [[1.0], [2.0], [3.0], [4.0], [100.0]]
    assert run(TrimmedMean(ratio=0.2), rows) == approx([3.0])  # k = ⌊0.2·5⌋ = 1
    assert run(TrimmedMean(ratio=0.2), rows, weights=[1, 1, 1, 3, 1]) == approx([(2 + 3 + 3 * 4) / 5])
    assert run(TrimmedMean(count=2), rows) == approx([3.0])
    assert run(TrimmedMean(ratio=0.1), rows) == approx([22.0])  # k = 0: the plain mean


def test_geometric_median():
    # equilateral triangle: the centroid
    rows = [[0.0, 0.0], [2.0, 0.0], [1.0, SQRT3]]
    assert run(GeoMed(tol=0.0, max_iters=2000), rows) == approx([1.0, SQRT3 / 3], abs=1e-6)
    # on a line: the middle point, whatever the outlier
    assert run(GeoMed(), [[0.0], [1.0], [1e6]]) == approx([1.0], abs=1e-5)


def test_norm_clip():
    rows = [[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]]  # norms 5, 1, 2
    assert run(NormClip(bound=2.0), rows) == approx([(1.2 + 0 + 0) / 3, (1.6 + 1 + 2) / 3])
    assert run(NormClip(), rows) == approx([(1.2 + 0 + 0) / 3, (1.6 + 1 + 2) / 3])  # median norm 2


def test_flame_keeps_the_majority_cluster_and_clips_to_the_median_norm():
    rows = [[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [2.0, 0.0], [-10.0, 0.0]]
    s = math.sqrt(1.01)  # median of the norms 1, √1.01, √1.01, 2, 10
    # the opposite update is outside the cluster; [2, 0] is clipped to [s, 0]; no noise
    assert run(Flame(noise=0.0), rows) == approx([(3 + s) / 4, 0.0])
    assert run(Flame(noise=0.0, cluster_input="distance_rows"), rows) == approx([(3 + s) / 4, 0.0])


def test_flame_noise_is_seeded_and_scaled():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(20000)
    rows = [(base + 0.01 * rng.standard_normal(20000)).tolist() for _ in range(4)]
    plain = np.array(run(Flame(noise=0.0), rows))
    noisy = np.array(run(Flame(noise=0.01, seed=1), rows))
    again = np.array(run(Flame(noise=0.01, seed=1), rows))
    other = np.array(run(Flame(noise=0.01, seed=2), rows))
    later = np.array(run(Flame(noise=0.01, seed=1), rows, state=ServerState(round=4)))
    assert np.array_equal(noisy, again) and not np.allclose(noisy, other) and not np.allclose(noisy, later)
    norms = np.linalg.norm(np.array(rows), axis=1)
    sigma = 0.01 * float(np.median(norms))
    assert np.std(noisy - plain) == pytest.approx(sigma, rel=0.03)


def test_foolsgold_zeroes_sybils():
    # a and b are identical (sybils), c is unique: α = (0, 0, 1); the result is (0·a + 0·b + 1·c) / 3
    rows = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    assert run(FoolsGold(), rows) == approx([0.0, 1 / 3])
    # equally similar pairs: every α is 1 after the logit, so FedAvg's uniform mean
    assert run(FoolsGold(), [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]) == approx([2 / 3, 2 / 3])
    assert foolsgold_weights(torch.tensor([[1.0, 0.0]], dtype=torch.float64)).tolist() == [1.0]


def test_foolsgold_uses_the_accumulated_history():
    rule, state = FoolsGold(), ServerState()
    run(rule, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], ids=["a", "b", "c"], state=state)
    assert torch.equal(state.tensors["foolsgold/history/a"], torch.tensor([1.0, 0.0], dtype=torch.float64))
    state.round = 1
    # this round a and b send the same delta, but their histories [2, 1] and [1, 2] differ
    with_history = run(rule, [[1.0, 1.0], [1.0, 1.0]], ids=["a", "b"], state=state)
    without = run(FoolsGold(history=False), [[1.0, 1.0], [1.0, 1.0]], ids=["a", "b"])
    assert with_history == approx([1.0, 1.0]) and without == approx([0.0, 0.0])


def test_dnc_drops_the_highest_outlier_score():
    # one coordinate, b ≥ d so nothing is drawn: scores (x − 8.25)²; c·f = 1 drops 30
    assert run(DnC(expected_malicious=1), [[0.0], [1.0], [2.0], [30.0]]) == approx([1.0])
    assert run(DnC(expected_malicious=1, filter_frac=2.0), [[0.0], [1.0], [2.0], [30.0]]) == approx([1.5])


def test_dnc_subsampling_is_seeded():
    rows = random_rows(0, 8, 500)

    def dnc(seed, server_round=0):
        return run(DnC(expected_malicious=2, subsample=20, iterations=1, seed=seed), rows,
                   state=ServerState(round=server_round))

    assert dnc(9) == dnc(9)
    # other seeds and other rounds draw other coordinates, and so (here) drop other clients
    assert len({tuple(dnc(s)) for s in range(6)}) > 1
    assert len({tuple(dnc(9, r)) for r in range(6)}) > 1


def test_residual_reweighting_by_hand():
    # sorted y = 0, 1, 2, 3, 100 against 0..4: the repeated-median line is y = x; residuals 0, 0, 0, 0, 96;
    # the scale (median of |r| without the smallest) is 0, so confidences are 1, 1, 1, 1, 0; the outlier's
    # value is replaced by the line (4) and its score is 0: (0 + 1 + 2 + 3) / 4
    assert run(Residual(), [[0.0], [1.0], [2.0], [3.0], [100.0]]) == approx([1.5])
    # three points 0, 1, 10: slope 5, intercept −4, residuals 4, 0, 4, all within the Huber bound: the mean
    assert run(Residual(), [[0.0], [1.0], [10.0]]) == approx([11 / 3])


def test_lasa_screens_each_layer():
    def lasa_run(rule, rows):
        g = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
        ups = [ClientUpdate(str(i), {"a": torch.tensor(r[:2], dtype=torch.float64),
                                     "b": torch.tensor(r[2:], dtype=torch.float64)}, 1) for i, r in enumerate(rows)]
        out = rule.aggregate(g, ups, ServerState())
        return out["a"].tolist() + out["b"].tolist()

    # layer a: client 3 flips every sign (sign purity 0 against 1, MZ-score 2.3 > 1), so a = mean of 0..2;
    # layer b: everyone agrees; every full norm is 2, so nothing is clipped
    rows = [[1.0, 1.0, 1.0, 1.0]] * 3 + [[-1.0, -1.0, 1.0, 1.0]]
    assert lasa_run(Lasa(sparsity=0.0), rows) == approx([1.0, 1.0, 1.0, 1.0])
    assert sparsify(torch.tensor([[3.0, -1.0, 2.0, 0.5]]), 0.5).tolist() == [[3.0, 0.0, 2.0, 0.0]]


# -- properties ---------------------------------------------------------------------------------------------
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(name=st.sampled_from(sorted(AGGREGATORS)), seed=st.integers(0, 2**16), n=st.integers(3, 8),
       d=st.integers(1, 6), data=st.data())
def test_every_rule_is_permutation_invariant(name, seed, n, d, data):
    rows = random_rows(seed, n, d)
    order = data.draw(st.permutations(range(n)))
    ids = [f"c{i}" for i in range(n)]
    a = run(every_rule()[name], rows, ids=ids)
    b = run(every_rule()[name], [rows[i] for i in order], ids=[ids[i] for i in order])
    assert a == approx(b, rel=1e-9, abs=1e-9)


def benign_and_attackers(seed, benign, attackers, d, sign):
    rows = random_rows(seed, benign, d)
    return rows, rows + [[sign * 1e6] * d for _ in range(attackers)]


@PROPERTY
@given(seed=st.integers(0, 2**16), f=st.integers(1, 2), extra=st.integers(0, 3), d=st.integers(1, 5),
       sign=st.sampled_from([-1.0, 1.0]))
def test_robust_rules_stay_in_the_benign_range(seed, f, extra, d, sign):
    n = 4 * f + 3 + extra  # enough for Bulyan
    benign, rows = benign_and_attackers(seed, n - f, f, d, sign)
    low, high = np.min(benign, axis=0), np.max(benign, axis=0)
    rules = [Median(), TrimmedMean(count=f), TrimmedMean(ratio=(f + 0.5) / n), Krum(expected_malicious=f),
             MultiKrum(expected_malicious=f), Bulyan(expected_malicious=f)]
    for rule in rules:
        out = np.array(run(rule, rows))
        assert np.all(out >= low - 1e-9) and np.all(out <= high + 1e-9), rule.name


@PROPERTY
@given(seed=st.integers(0, 2**16), f=st.integers(1, 3), benign=st.integers(4, 8), d=st.integers(1, 5))
def test_geometric_median_breakdown_bound(seed, f, benign, d):
    """With at most a share α = f/n < ½ of the points farther than r from y, ‖geomed − y‖ ≤ C_α·r with
    C_α = (1−α)/√(1−2α) (Minsker 2015, Lemma 2.1); here y is the benign mean and r the benign radius."""
    n = benign + f
    if 2 * f >= n:
        return
    good, rows = benign_and_attackers(seed, benign, f, d, 1.0)
    y = np.mean(good, axis=0)
    r = np.max(np.linalg.norm(np.array(good) - y, axis=1))
    alpha = f / n
    out = np.array(run(GeoMed(), rows))
    assert np.linalg.norm(out - y) <= (1 - alpha) / math.sqrt(1 - 2 * alpha) * r * 1.01 + 1e-6


# -- defense weights ------------------------------------------------------------------------------------------
@PROPERTY
@given(name=st.sampled_from(sorted(AGGREGATORS)), seed=st.integers(0, 2**16), n=st.integers(3, 7),
       d=st.integers(1, 5), at=st.integers(0, 7))
def test_a_client_weighted_zero_has_no_influence(name, seed, n, d, at):
    rng = np.random.default_rng(seed)
    rows = random_rows(seed, n, d)
    weights = rng.uniform(0.2, 1.0, n).tolist()
    at = at % (n + 1)
    evil_rows = rows[:at] + [[1e6] * d] + rows[at:]
    evil_weights = weights[:at] + [0.0] + weights[at:]
    ids = [f"c{i}" for i in range(n)]
    evil_ids = ids[:at] + ["evil"] + ids[at:]
    clean_state, evil_state = ServerState(), ServerState()
    clean = run(every_rule()[name], rows, weights=weights, ids=ids, state=clean_state)
    dirty = run(every_rule()[name], evil_rows, weights=evil_weights, ids=evil_ids, state=evil_state)
    assert clean == approx(dirty, rel=1e-12, abs=1e-12)
    assert set(clean_state.tensors) == set(evil_state.tensors)  # no history for the excluded client
    assert all(torch.equal(clean_state.tensors[k], evil_state.tensors[k]) for k in clean_state.tensors)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_all_weights_zero_keeps_the_global_adapter_and_state(name):
    state = ServerState()
    assert run(every_rule()[name], [[1.0, 2.0], [3.0, 4.0]], weights=[0.0, 0.0], global_values=[5.0, 6.0],
               state=state) == [5.0, 6.0]
    assert state.tensors == {}


def test_bad_client_weights_are_refused():
    for weights in ([1.0], [1.0, -1.0], [1.0, float("nan")], [1.0, float("inf")]):
        with pytest.raises(ValueError, match="client weight"):
            run(Median(), [[1.0], [2.0]], weights=weights)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_results_keep_the_adapter_dtypes(name):
    g = {"a": torch.zeros(3, dtype=torch.bfloat16), "b": torch.zeros(2, 2, dtype=torch.float32)}
    ups = [ClientUpdate(str(i), {"a": torch.full((3,), float(i), dtype=torch.bfloat16),
                                 "b": torch.full((2, 2), float(i) * 0.5)}, 1 + i) for i in range(5)]
    out = every_rule()[name].aggregate(g, ups, ServerState())
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {k: (v.dtype, v.shape) for k, v in g.items()}


# -- too few updates for f --------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", [Krum(expected_malicious=3), MultiKrum(expected_malicious=3),
                                  Bulyan(expected_malicious=3), DnC(expected_malicious=9), TrimmedMean(count=4)],
                         ids=lambda r: r.name)
def test_too_few_updates_lower_f_with_a_warning(rule, caplog):
    rows = [[0.0], [1.0], [2.0], [3.0], [50.0]]
    with caplog.at_level(logging.WARNING, logger="fedguard"):
        out = run(rule, rows)
    assert math.isfinite(out[0])
    assert "too few" in caplog.text or "cannot trim" in caplog.text


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_updates_never_fail_a_round(name, n):
    out = run(every_rule(f=2)[name], [[1.0, -1.0], [3.0, 1.0]][:n])
    assert all(math.isfinite(v) for v in out)


# -- state survives a checkpoint --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: FedAdam(lr=0.1), lambda: FedAvgM(), lambda: FedYogi(), lambda: FoolsGold(),
                                  lambda: FedAdagrad()],
                         ids=["fedadam", "fedavgm", "fedyogi", "foolsgold", "fedadagrad"])
def test_state_round_trips_through_safetensors(make, tmp_path):
    ids = ["client/7", "Ω-2", "3"]  # string ids, one with a slash and one non-ASCII
    rounds = [random_rows(r, 3, 4) for r in range(3)]

    def play(rule, state, global_values, rows, r):
        state.round = r
        return run(rule, rows, global_values=global_values, state=state, ids=ids)

    straight, state = [0.0] * 4, ServerState()
    rule = make()
    for r, rows in enumerate(rounds):
        straight = play(rule, state, straight, [[g + v for g, v in zip(straight, row)] for row in rows], r)

    resumed, state = [0.0] * 4, ServerState()
    rule = make()
    resumed = play(rule, state, resumed, [[g + v for g, v in zip(resumed, row)] for row in rounds[0]], 0)
    save_tensors(tmp_path / "state.safetensors", state.tensors)
    state, rule = ServerState(round=1, tensors=load_tensors(tmp_path / "state.safetensors")), make()
    for r, rows in enumerate(rounds[1:], start=1):
        resumed = play(rule, state, resumed, [[g + v for g, v in zip(resumed, row)] for row in rows], r)
    assert resumed == straight
    assert state.tensors and all(t.dtype == torch.float64 for t in state.tensors.values())


def test_state_of_another_adapter_shape_is_refused():
    state = ServerState(tensors={"fedadam/m": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="fedadam/m"):
        run(FedAdam(), [[1.0, 2.0]], state=state)


# -- config ------------------------------------------------------------------------------------------------
def test_config_names_every_registered_rule():
    from typing import get_args

    assert set(get_args(AggregatorName)) == set(AGGREGATORS)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"server\.aggregator"):
        build_config({"server": {"aggregator": "krumm"}})
    with pytest.raises(ConfigError, match=r"server\.trimmed_mean\.ratio: .*less than 0\.5"):
        build_config({"server": {"aggregator": "trimmed_mean", "trimmed_mean": {"ratio": 0.7}}})
    with pytest.raises(ConfigError, match=r"server\.fedopt\.tau"):
        build_config({"server": {"fedopt": {"tau": 0}}})
    with pytest.raises(ConfigError, match=r"server\.expected_malicious"):
        build_config({"server": {"expected_malicious": -1}})
    with pytest.raises(ConfigError, match=r"server\.dnc\.samples: unknown field"):
        build_config({"server": {"dnc": {"samples": 3}}})


def test_build_aggregator_passes_the_config_and_seed():
    cfg = build_config({"seed": 11, "server": {"aggregator": "dnc", "expected_malicious": 2,
                                               "dnc": {"iterations": 3, "subsample": 50}}})
    rule = build_aggregator(cfg.server, cfg.seed)
    assert (rule.f, rule.iterations, rule.subsample, rule.seed) == (2, 3, 50, 11)
    prox = build_aggregator(build_config({"server": {"aggregator": "fedprox", "fedprox": {"mu": 0.3}}}).server)
    assert prox.client_config() == {"proximal_mu": 0.3}
    with pytest.raises(ValueError, match="unknown aggregator"):
        build_aggregator("nope")


# -- FedProx on the client ------------------------------------------------------------------------------------
def test_fedprox_proximal_term_shrinks_the_client_update(tiny_loaded):
    from conftest import tiny_config
    from fedguard.data.federation import build_client_data
    from fedguard.federated.client import LocalTrainer
    from fedguard.federated.server import FederatedServer
    from fedguard.messages import RoundConfig
    from fedguard.model.lora import initial_adapter_state

    loaded, peft_model, slot = tiny_loaded
    client = build_client_data(tiny_config(), loaded.tokenizer)[0]
    trainer = LocalTrainer(loaded, peft_model, slot)
    theta0 = initial_adapter_state(slot.shapes(), 5)
    base = RoundConfig(server_round=1, lr=1e-2, local_steps=6, batch_size=4, grad_accum=1, seed=1, max_grad_norm=1.0)

    def update_norm(rc):
        update = trainer.train(theta0, rc, client)
        return math.sqrt(sum(float((update.tensors[k] - theta0[k]).square().sum()) for k in theta0)), update

    plain, plain_update = update_norm(base)
    rc = FederatedServer(FedProx(mu=0.0), 2**30).client_config(base, "0")
    zero, zero_update = update_norm(rc)
    assert rc.proximal_mu == 0.0 and all(torch.equal(plain_update.tensors[k], zero_update.tensors[k]) for k in theta0)
    rc = FederatedServer(FedProx(mu=100.0), 2**30).client_config(base, "0")
    assert rc.proximal_mu == 100.0
    proximal, _ = update_norm(rc)
    assert proximal < 0.5 * plain
