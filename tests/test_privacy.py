"""Client-level differential privacy: the accountant is the library's, the clipping bound holds, the noise has
its scale, sampling is Poisson, the config refuses what would break the calibration, and resume keeps it."""

import math

import pytest
import torch

from conftest import killed_and_resumed, tiny_config
from fedguard.io import read_ndjson
from fedguard.messages import ClientUpdate


def test_epsilon_is_the_librarys_for_a_known_setting():
    import dp_accounting
    from dp_accounting import pld, rdp

    from fedguard.privacy.accountant import RDP_ORDERS, epsilon

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 50)
    ref = rdp.RdpAccountant(list(RDP_ORDERS))
    ref.compose(event)
    assert epsilon([(0.1, 1.1)] * 50, 1e-5, "rdp") == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    ref = pld.PLDAccountant()
    ref.compose(event)
    assert epsilon([(0.1, 1.1)] * 50, 1e-5, "pld") == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    # more rounds, less noise: more epsilon; no round: none
    assert epsilon([(0.1, 1.1)] * 100, 1e-5) > epsilon([(0.1, 1.1)] * 50, 1e-5) > epsilon([(0.1, 2.0)] * 50, 1e-5)
    assert epsilon([], 1e-5) == 0.0


def _dp(**over):
    from fedguard.privacy.client_dp import ClientLevelDP

    return ClientLevelDP(**{"clip": 0.5, "noise_multiplier": 0.0, "sample_rate": 0.5, "num_clients": 4,
                              "delta": 1e-5, "seed": 1, **over})


def test_every_update_counts_for_at_most_the_clipping_bound():
    dp = _dp()  # no noise: the step is exactly the sum of clipped updates over q*N = 2
    glob = {"b": torch.zeros(100)}
    big = ClientUpdate("1", {"b": torch.full((100,), 3.0)}, 1)  # norm 30
    small = ClientUpdate("2", {"b": torch.full((100,), 0.001)}, 1)  # norm 0.01, kept as it is
    new, report = dp.aggregate(1, glob, [big, small], None)
    step = new["b"] * 2  # times q*N
    assert report["clipped"] == 1 and report["clients"] == 2
    assert float((step - 0.001).norm()) == pytest.approx(0.5, rel=1e-5)  # the big one counts exactly C
    half, _ = dp.aggregate(1, glob, [big], [0.5])  # a defense weight scales the clipped update
    assert float((half["b"] * 2).norm()) == pytest.approx(0.25, rel=1e-5)


def test_the_noise_has_the_configured_scale():
    dp = _dp(noise_multiplier=1.3)
    glob = {"a": torch.zeros(200, 200)}
    new, report = dp.aggregate(7, glob, [], None)  # nobody answered: the release is noise alone
    std = float(new["a"].double().std())
    expected = 1.3 * 0.5 / 2  # sigma * C / (q * N)
    assert report["noise_std_on_mean"] == pytest.approx(expected)
    assert abs(std - expected) < 4 * expected / math.sqrt(2 * 40_000)  # std of a sample std: sigma / sqrt(2n)
    assert abs(float(new["a"].double().mean())) < 4 * expected / 200
    again, _ = dp.aggregate(7, glob, [], None)
    assert torch.equal(again["a"], new["a"])  # seeded by the run: reproducible
    secure, _ = _dp(noise_multiplier=1.3, secure_noise=True).aggregate(7, glob, [], None)
    assert not torch.equal(secure["a"], new["a"])


def test_sampling_is_poisson_under_dp():
    from fedguard.federated.sampling import RoundPlan

    plan = RoundPlan.from_config(tiny_config(federation={"num_clients": 40, "clients_per_round": 10},
                                             privacy={"client_dp": "central"}))
    sizes = [len(plan.sampled(r)) for r in range(1, 201)]
    assert plan.poisson and len(set(sizes)) > 5  # the count varies round to round
    assert 9.0 < sum(sizes) / len(sizes) < 11.0  # around q*N = 10
    assert plan.sampled(3) == plan.sampled(3)


@pytest.mark.parametrize("section,value,field", [
    ("server", {"aggregator": "krum"}, "server.aggregator"),
    ("server", {"lora_aggregation": "product"}, "lora_aggregation"),
    ("defense", {"level": "audit"}, "defense.level"),
])
def test_the_config_refuses_what_breaks_the_calibration(section, value, field):
    from fedguard.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        tiny_config(privacy={"client_dp": "central"}, **{section: value})


def test_a_dp_run_reports_epsilon_stops_at_its_target_and_resumes_exactly(tmp_path):
    from fedguard.privacy.accountant import epsilon
    from fedguard.simulation.runner import run_experiment

    privacy = {"client_dp": "central", "clip": 0.05, "noise_multiplier": 0.8, "delta": 1e-4}
    cfg = tiny_config(federation={"rounds": 4}, lora={"variant": "ffa"}, privacy=privacy)
    full, killed = killed_and_resumed(cfg, tmp_path)
    rounds = [r for r in read_ndjson(full / "metrics.ndjson") if r["round"] > 0]
    eps = [r["privacy"]["epsilon"] for r in rounds]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(epsilon([(0.5, 0.8)] * 4, 1e-4))
    resumed = [r for r in read_ndjson(killed / "metrics.ndjson") if r["round"] > 0]
    assert [r["privacy"] for r in resumed] == [r["privacy"] for r in rounds]  # the accountant came back exactly
    target = (eps[1] + eps[2]) / 2  # room for two rounds, not three
    stopped = run_experiment(tiny_config(federation={"rounds": 4}, lora={"variant": "ffa"},
                                         privacy={**privacy, "target_epsilon": target}), tmp_path / "t", quiet=True)
    assert stopped.final_metrics["rounds"] == 2 and stopped.final_metrics["privacy"]["epsilon"] <= target
    assert "## Privacy" in stopped.report.read_text()


def test_auto_noise_spends_the_target_in_exactly_the_configured_rounds():
    from fedguard.config import ConfigError
    from fedguard.factories import build_server
    from fedguard.privacy.accountant import epsilon

    cfg = tiny_config(federation={"rounds": 3}, privacy={"client_dp": "central", "noise_multiplier": "auto",
                                                        "target_epsilon": 4.0})
    dp = build_server(cfg).privacy
    spent = epsilon([(0.5, dp.noise_multiplier)] * 3, 1e-5)
    assert 3.95 < spent <= 4.0 and epsilon([(0.5, dp.noise_multiplier * 0.98)] * 3, 1e-5) > 4.0
    with pytest.raises(ConfigError, match="target_epsilon"):
        tiny_config(privacy={"client_dp": "central", "noise_multiplier": "auto"})


def test_a_run_with_auto_noise_reports_the_noise_it_used(tmp_path):
    from fedguard.simulation.runner import run_experiment

    run = run_experiment(tiny_config(federation={"rounds": 1}, privacy={
        "client_dp": "central", "noise_multiplier": "auto", "target_epsilon": 8.0}), tmp_path / "r", quiet=True)
    sigma = read_ndjson(run.run_dir / "metrics.ndjson")[1]["privacy"]["noise_multiplier"]
    assert sigma > 0 and f"multiplier {sigma:.4g}" in run.report.read_text()


def test_membership_inference_sees_an_overfit_model_and_not_a_private_one(tmp_path):
    """The loss-ratio attack tells one client's training examples from its own held-out ones after deliberate
    overfitting (few examples, many steps, high learning rate), and cannot once DP noise is on. The non-members
    are the client's own examples held out of training, so the attack must find membership, not the client's mix
    of domains (against the source's evaluation split the same run scored 0.91: domain shift counted as
    membership). The built-in examples share templates, so a tiny model memorises little beyond them. lr 1e-2: at
    5e-2 Adam barely moved the loss and the AUC hung on float rounding (0.79 on two threads, 0.51 on one)."""
    from fedguard.simulation.runner import run_experiment

    overfit = dict(federation={"num_clients": 2, "clients_per_round": 2, "rounds": 2},
                   data={"examples_per_client": 32, "max_length": 96},
                   train={"local_steps": 80, "batch_size": 4, "lr": 1e-2, "lr_schedule": "constant"},
                   lora={"r": 16, "alpha": 32, "dropout": 0.0, "init_seed": 5})
    audit = {"audit_membership": True, "audit_examples": 16}
    plain = run_experiment(tiny_config(**overfit, privacy=audit), tmp_path / "plain", quiet=True)
    private = run_experiment(tiny_config(**overfit, privacy={**audit, "client_dp": "central", "clip": 0.01,
                                                             "noise_multiplier": 2.0}), tmp_path / "dp", quiet=True)
    leak, kept = plain.final_metrics["membership_inference"], private.final_metrics["membership_inference"]
    assert leak["auc"] > 0.62 and leak["members"] == leak["non_members"] == 15  # 84 % measured, 1 or 2 threads
    assert leak["non_members_from"] == "the client's held-out examples"
    assert abs(kept["auc"] - 0.5) < 0.2 and kept["auc"] < leak["auc"] - 0.1  # 0.54 measured
    assert "membership inference" in plain.report.read_text()


def test_no_noise_is_infinite_epsilon_and_still_a_valid_record(tmp_path):
    from fedguard.simulation.runner import run_experiment

    run = run_experiment(tiny_config(federation={"rounds": 1}, privacy={"client_dp": "central", "noise_multiplier": 0}),
                         tmp_path / "r", quiet=True)
    rec = read_ndjson(run.run_dir / "metrics.ndjson")[1]
    assert rec["privacy"]["epsilon"] is None and rec["privacy"]["clients"] == len(rec["accepted"])
    assert "∞" in run.report.read_text()
