"""Screening: which clients a robust rule let count, per round, and its TPR/FPR against ground truth."""

import pytest
import torch

from conftest import tiny_config
from fedguard.aggregators import Bulyan, DnC, FedAvg, Flame, FoolsGold, Krum, Lasa, Median, MultiKrum
from fedguard.config import ServerConfig
from fedguard.federated.aggregation import AGGREGATORS, build_aggregator
from fedguard.federated.server import FederatedServer
from fedguard.messages import ClientUpdate, ServerState
from fedguard.io import read_ndjson
from fedguard.run_dir import METRICS_FILE
from fedguard.simulation.metrics import screening_summary
from fedguard.simulation.runner import run_experiment
from fedguard.reporting.sweep import _series, detection

SCREENING_RULES = {"krum", "multikrum", "bulyan", "flame", "dnc", "foolsgold", "lasa"}


def screen(rule, rows, ids=None, weights=None, state=None):
    """``rule.screening`` after it aggregates the one-tensor client vectors ``rows`` (ids "0", "1", ...)."""
    ids = ids or [str(i) for i in range(len(rows))]
    updates = [ClientUpdate(cid, {"w": torch.tensor(r, dtype=torch.float64)}, 1) for cid, r in zip(ids, rows)]
    rule.aggregate({"w": torch.zeros(len(rows[0]), dtype=torch.float64)}, updates, state or ServerState(),
                   client_weights=weights)
    return rule.screening


# six benign deltas near [1, 0] and one far-off attacker (id "6")
BENIGN = [[1.0, 0.0], [1.1, 0.1], [0.9, -0.1], [1.0, 0.2], [1.05, -0.05], [0.95, 0.05]]
ATTACKED = BENIGN + [[-30.0, 30.0]]


def test_krum_keeps_one_benign_delta():
    kept = screen(Krum(expected_malicious=1), ATTACKED)
    assert set(kept) == {str(i) for i in range(7)} and kept["6"] == 0.0
    assert sorted(kept.values()) == [0.0] * 6 + [1.0]


def test_krum_neighbourhood_mean_keeps_the_averaged_group():
    # KRUM_POINTS of test_aggregators: the group of 1 is {0, 1, 2, 6}
    kept = screen(Krum(expected_malicious=1, neighbourhood_mean=True), [[0.0], [1.0], [2.0], [6.0], [30.0]])
    assert kept == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0, "4": 0.0}


def test_multikrum_keeps_the_m_chosen():
    kept = screen(MultiKrum(expected_malicious=1), ATTACKED)  # m = n − f = 6: every benign delta
    assert kept == {**{str(i): 1.0 for i in range(6)}, "6": 0.0}
    # selected = 3 of [0, 1, 2, 6, 30]: 0, 1, 2
    assert screen(MultiKrum(expected_malicious=1, selected=3), [[0.0], [1.0], [2.0], [6.0], [30.0]]) \
        == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0, "4": 0.0}


def test_krum_rules_keep_everyone_when_too_few_to_rank():
    for rule in (Krum(expected_malicious=1), MultiKrum(expected_malicious=1)):
        assert screen(rule, [[0.0], [100.0]]) == {"0": 1.0, "1": 1.0}


def test_bulyan_keeps_the_krum_picked_set():
    # as in test_aggregators: n = 7, f = 1, Krum picks θ = 5 values (2, 3, 1, 6, 4), neither 0 nor 100
    kept = screen(Bulyan(expected_malicious=1), [[0.0], [1.0], [2.0], [3.0], [4.0], [6.0], [100.0]])
    assert kept == {"0": 0.0, "1": 1.0, "2": 1.0, "3": 1.0, "4": 1.0, "5": 1.0, "6": 0.0}
    assert screen(Bulyan(expected_malicious=1), ATTACKED)["6"] == 0.0


def test_flame_keeps_the_majority_cluster():
    rows = [[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [2.0, 0.0], [-10.0, 0.0]]  # the last points the other way
    assert screen(Flame(noise=0.0), rows) == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0, "4": 0.0}


def test_dnc_keeps_all_but_the_outlier_and_everyone_when_it_drops_none():
    rows = [[0.0], [1.0], [2.0], [30.0]]
    assert screen(DnC(expected_malicious=1), rows) == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0}
    assert screen(DnC(expected_malicious=0), rows) == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0}


def test_foolsgold_share_is_alpha():
    # two identical sybils get α = 0, the unique client α = 1 (test_aggregators)
    kept = screen(FoolsGold(), [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], ids=["evil1", "evil2", "good"])
    assert kept == {"evil1": 0.0, "evil2": 0.0, "good": 1.0}


def test_lasa_share_is_the_fraction_of_layers_chosen_in():
    def lasa_screen(rows):
        g = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
        ups = [ClientUpdate(str(i), {"a": torch.tensor(r[:2], dtype=torch.float64),
                                     "b": torch.tensor(r[2:], dtype=torch.float64)}, 1) for i, r in enumerate(rows)]
        rule = Lasa(sparsity=0.0)
        rule.aggregate(g, ups, ServerState())
        return rule.screening

    # client 3 flips its signs in layer a only (screened there), then in both layers
    assert lasa_screen([[1.0, 1.0, 1.0, 1.0]] * 3 + [[-1.0, -1.0, 1.0, 1.0]]) == \
        {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.5}
    assert lasa_screen([[1.0, 1.0, 1.0, 1.0]] * 3 + [[-1.0, -1.0, -1.0, -1.0]]) == \
        {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_only_screening_rules_report_screening(name):
    rows = [[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.2, 0.1], [0.0, -0.3]]
    kept = screen(build_aggregator(ServerConfig(aggregator=name, expected_malicious=1), 0), rows)
    if name not in SCREENING_RULES:
        assert kept is None
    else:
        assert set(kept) == {str(i) for i in range(5)} and all(0.0 <= s <= 1.0 for s in kept.values())
    assert screen(Median(), rows) is None and screen(FedAvg(), rows) is None


def test_screening_is_reset_by_every_call():
    rule = Krum(expected_malicious=1)
    screen(rule, ATTACKED)
    assert set(screen(rule, [[0.0], [1.0], [2.0], [30.0], [1.5]], ids=list("abcde"))) == set("abcde")
    # every client weighted 0: nothing screened, and not the last round's map either
    assert screen(rule, ATTACKED, weights=[0.0] * 7) is None


def test_a_client_weighted_zero_is_not_in_the_map():
    kept = screen(MultiKrum(expected_malicious=1), ATTACKED, weights=[1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert set(kept) == {"0", "2", "3", "4", "5", "6"} and kept["6"] == 0.0


def _lora_update(cid, value):
    return ClientUpdate(cid, {"m.lora_A.weight": torch.full((2, 3), value), "m.lora_B.weight": torch.full((3, 2), value)}, 1)


def test_server_reports_the_rule_screening_in_the_naive_path_only():
    glob = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(3, 2)}
    updates = [_lora_update(str(i), v) for i, v in enumerate((0.1, 0.2, 0.15, 0.12, 9.0))]
    out = FederatedServer(MultiKrum(expected_malicious=1), 1 << 20).aggregate_round(1, glob, updates, ServerState())
    assert out.screening == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0, "4": 0.0}
    plain = FederatedServer(FedAvg(), 1 << 20).aggregate_round(1, glob, updates, ServerState())
    assert plain.screening is None
    product = FederatedServer(MultiKrum(expected_malicious=1), 1 << 20, lora_aggregation="product", lora_alpha=8)
    assert product.aggregate_round(1, glob, updates, ServerState()).screening is None


class _Population:
    def __init__(self, malicious):
        self.malicious = {str(c) for c in malicious}

    def is_malicious(self, client_id):
        return str(client_id) in self.malicious


def test_screening_summary_against_ground_truth():
    population = _Population(["3", "4"])
    # screened out (share < 0.5): 2, 3 and 4 → TPR 2/2, FPR 1/3
    summary = screening_summary({"0": 1.0, "1": 0.5, "2": 0.0, "3": 0.0, "4": 0.25}, population)
    assert summary["tpr"] == 1.0 and summary["fpr"] == pytest.approx(1 / 3)
    # AUROC by 1 − share: malicious 1.0, 0.75 against benign 0.0, 0.5, 1.0: 4.5 of 6 pairs
    assert summary["auroc"] == pytest.approx(4.5 / 6)
    benign_only = screening_summary({"0": 1.0, "1": 0.0}, population)
    assert benign_only == {"tpr": None, "fpr": 0.5}  # no malicious client: no TPR, no AUROC
    assert screening_summary(None, population) == {} and screening_summary({}, population) == {}


def test_sweep_detection_falls_back_to_screening():
    screened = {"screening": {"detection": {"tpr": 1.0, "fpr": 0.0, "auroc": 1.0}}}
    probed = {"defense": {"detection": {"tpr": 0.5, "fpr": 0.5}}}
    assert detection([screened, {"round": 0}]) == {"tpr": 1.0, "fpr": 0.0, "auroc": 1.0}
    # the probe defense's detection wins where a round has both
    assert detection([{**screened, **probed}]) == {"tpr": 0.5, "fpr": 0.5, "auroc": None}
    assert _series(screened, "tpr") == 100.0 and _series({**screened, **probed}, "fpr") == 50.0
    assert _series({"round": 1}, "tpr") is None


def test_a_run_with_multikrum_records_screening(tmp_path):
    cfg = tiny_config(federation={"num_clients": 5, "clients_per_round": 5, "rounds": 1}, train={"local_steps": 1},
                      server={"aggregator": "multikrum", "expected_malicious": 1},
                      attack={"malicious_clients": 1, "kind": "scaling"})
    run_experiment(cfg, tmp_path / "r", quiet=True)
    rounds = [r for r in read_ndjson(tmp_path / "r" / METRICS_FILE) if r["round"] > 0]
    assert len(rounds) == 1
    screening = rounds[0]["screening"]
    assert set(screening["kept"]) == {str(c) for c in rounds[0]["sampled"]}
    assert sorted(screening["kept"].values()) == [0.0, 1.0, 1.0, 1.0, 1.0]  # m = n − f = 4 kept
    assert set(screening["detection"]) == {"tpr", "fpr", "auroc"}
    # the scaled update (10× its delta) is the one screened out
    [attacker] = rounds[0]["malicious_sampled"]
    assert screening["kept"][str(attacker)] == 0.0 and screening["detection"]["tpr"] == 1.0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Screening by `multikrum`" in report and f"⚠{attacker}: 0.00" in report
