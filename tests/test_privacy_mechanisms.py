"""Distributed noise, adaptive clipping, secure aggregation in the round, and DP-SGD in local training."""

import math

import pytest
import torch
from conftest import killed_and_resumed, tiny_config

from fedguard.io import read_ndjson
from fedguard.messages import ClientUpdate, RoundConfig, ServerState, UpdateSum


def _dp(**over):
    from fedguard.privacy.client_dp import ClientLevelDP

    return ClientLevelDP(**{"clip": 0.5, "noise_multiplier": 1.0, "sample_rate": 0.5, "num_clients": 8,
                            "delta": 1e-5, "seed": 1, **over})


# -- distributed noise ------------------------------------------------------------------------------------------
def test_each_client_adds_its_share_of_the_noise_and_the_server_adds_none():
    from fedguard.privacy.client_dp import privatize_update

    dp = _dp(mode="distributed")  # M = q N = 4: each client adds sigma C / 2
    req = dp.client_requests(ServerState())
    assert req["update_clip"] == 0.5 and req["update_noise_std"] == pytest.approx(1.0 * 0.5 / 2)
    start = {"b": torch.zeros(40_000)}
    sent, metrics = privatize_update({"b": torch.full((40_000,), 1.0)}, start, ["b"],
                                     RoundConfig(1, 0.1, 1, 1, 1, seed=3, **req), "7")
    noise = sent["b"].double() - 0.5 / 200  # the clipped update is 0.5 / sqrt(40000) per coordinate
    assert abs(float(noise.std()) - 0.25) < 4 * 0.25 / math.sqrt(2 * 40_000)
    assert metrics == {"dp_unclipped": 0.0}  # norm 200 > C: the bit, never the norm
    # the server: no noise of its own, the sum over M, and a round charged for the noise that was really there
    glob = {"b": torch.zeros(3)}
    summed = UpdateSum({"b": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}, ["1", "2"])
    new, report, meta = dp.release(1, glob, summed, ServerState())
    assert torch.allclose(new["b"], torch.tensor([0.25, 0.5, 0.75]))
    assert report["noise_multiplier_charged"] == pytest.approx(1.0 * math.sqrt(2 / 4))  # 2 of 4 expected clients
    assert meta["history"] == [[0.5, pytest.approx(math.sqrt(0.5))]]
    # without secure aggregation the server sees each update with one share of the noise: a weaker epsilon
    assert report["epsilon_server_view"] > report["epsilon"]
    _, with_sa, _ = _dp(mode="distributed", secure_aggregation=True).release(1, glob, summed, ServerState())
    assert with_sa["epsilon_server_view"] == with_sa["epsilon"]
    _, central, _ = _dp().release(1, glob, summed, ServerState())
    assert central["epsilon_server_view"] is None  # the server sees updates before its own noise


# -- adaptive clipping ------------------------------------------------------------------------------------------
def test_adaptive_clipping_follows_the_quantile_and_pays_for_the_count_from_the_same_sigma():
    from fedguard.privacy.client_dp import AdaptiveClip

    ad = AdaptiveClip(target_quantile=0.5, learning_rate=0.2, count_stddev=1e-6)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        ad.update_multiplier(1.0)  # a count noise this small cannot be paid for
    ad = AdaptiveClip(0.5, 0.2, count_stddev=2.0)
    assert ad.update_multiplier(1.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    dp = _dp(noise_multiplier=1e-3, adaptive=AdaptiveClip(0.5, 0.2, 1e-3), num_clients=4, sample_rate=1.0)
    glob = {"b": torch.zeros(10)}
    small = [ClientUpdate(str(i), {"b": torch.full((10,), 0.01)}, 1) for i in range(4)]  # all below C
    state = ServerState()
    clips = []
    for r in range(1, 4):
        _, report, state.meta["privacy"] = dp.release(r, glob, dp.clip_sum(glob, small, None, state), state)
        clips.append(report["clip"])
        assert report["unclipped_fraction"] == pytest.approx(1.0, abs=0.01)
    # every update unclipped, target half: C shrinks by exp(-0.2 * 0.5) a round
    assert clips[1] / clips[0] == pytest.approx(math.exp(-0.1), rel=1e-3)
    assert clips[2] / clips[1] == pytest.approx(math.exp(-0.1), rel=1e-3)
    assert dp.client_requests(state) == {}  # central: clients do not clip


# -- secure aggregation in the round ------------------------------------------------------------------------------
def test_the_server_takes_only_sums_under_secure_aggregation():
    from fedguard.factories import build_server

    server = build_server(tiny_config(privacy={"secure_aggregation": "secagg+", "clip": 0.1}))
    glob = {"x.lora_B.weight": torch.zeros(2, 2), "x.lora_A.weight": torch.zeros(2, 2)}
    one = ClientUpdate("0", {k: torch.ones(2, 2) for k in glob}, 1)
    with pytest.raises(ValueError, match="sum"):
        server.aggregate_round(1, glob, [one], ServerState())
    total = {k: torch.full((2, 2), 0.3, dtype=torch.float64) for k in glob}
    with pytest.raises(ValueError, match="no single update"):
        server.aggregate_round(1, glob, [one], ServerState(), summed=UpdateSum(total, ["0", "1", "2"]))
    out = server.aggregate_round(1, glob, [], ServerState(), summed=UpdateSum(total, ["0", "1", "2"]))
    assert out.accepted == ["0", "1", "2"] and torch.allclose(out.global_adapter["x.lora_B.weight"],
                                                             torch.full((2, 2), 0.1))
    assert server.configure(1, glob, ServerState())["0"].config.update_clip == 0.1  # clients bound their norm
    bad = {k: torch.full((2, 2), float("nan"), dtype=torch.float64) for k in glob}
    with pytest.raises(ValueError, match="not finite"):
        server.aggregate_round(1, glob, [], ServerState(), summed=UpdateSum(bad, ["0"]))


def test_a_securely_aggregated_round_equals_the_plain_sum_of_the_same_clipped_updates(tmp_path):
    """With every client in every round, central DP without noise (the server clips and averages) and secure
    aggregation (each client clips, the server gets the masked sum) release the same adapter, up to SecAgg+'s
    quantisation."""
    from fedguard.io import load_tensors
    from fedguard.simulation.runner import run_experiment

    base = dict(federation={"rounds": 1, "num_clients": 4, "clients_per_round": 4})
    plain = run_experiment(tiny_config(**base, privacy={"client_dp": "central", "noise_multiplier": 0.0,
                                                        "clip": 0.05}), tmp_path / "plain", quiet=True)
    secure = run_experiment(tiny_config(**base, privacy={"secure_aggregation": "secagg+", "clip": 0.05}),
                            tmp_path / "secure", quiet=True)
    a, b = (load_tensors(r.run_dir / "final_adapter" / "adapter_model.safetensors") for r in (plain, secure))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    # per coordinate: each client's stochastic rounding is off by less than one level (2 x range / levels),
    # four clients summed, then divided by the four
    assert 0 < worst <= 2 * 1.0 / 2 ** 22 * (1 + 1e-3)
    recs = [r for r in read_ndjson(secure.run_dir / "metrics.ndjson") if r["round"] > 0]
    assert all(r["privacy"]["secure_aggregation"] == "secagg+" and r["bytes_up"] > 0 for r in recs)
    assert all("dp_unclipped" not in m for r in recs for m in r["clients"].values())
    base["federation"]["rounds"] = 2
    dropped = run_experiment(tiny_config(**base, privacy={"secure_aggregation": "secagg+", "clip": 0.05,
                                                          "secagg_dropout": 0.25}), tmp_path / "drop", quiet=True)
    recs = [r for r in read_ndjson(dropped.run_dir / "metrics.ndjson") if r["round"] > 0]
    assert all(len(r["privacy"]["dropped"]) == 1 and len(r["accepted"]) == 3 for r in recs)
    assert all(r["privacy"]["dropped"][0] in r["rejected"] for r in recs)
    assert "dropout(s) recovered" in dropped.report.read_text()


@pytest.mark.parametrize("section,value,field", [
    ("defense", {"level": "client"}, "defense.level"),
    ("server", {"aggregator": "krum"}, "server.aggregator"),
    ("server", {"lora_aggregation": "product"}, "lora_aggregation"),
    ("communication", {"compression": "topk"}, "communication.compression"),
])
def test_the_config_refuses_secure_aggregation_with_what_inspects_single_updates(section, value, field):
    from fedguard.config import ConfigError

    with pytest.raises(ConfigError, match=field) as err:
        tiny_config(privacy={"secure_aggregation": "secagg+"}, **{section: value})
    assert "choose" in str(err.value) or "needs" in str(err.value)  # it says what to do instead


# -- DP-SGD -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resident():
    from fedguard.factories import load_resident

    return load_resident(tiny_config())


def _examples(resident, n):
    from fedguard.data.federation import build_client_data

    return build_client_data(tiny_config(), resident.loaded.tokenizer)[0].examples[:n]


def test_opacus_per_example_gradients_are_each_examples_own(resident):
    from fedguard.data.tokenize import collate

    tr, examples = resident.trainer, _examples(resident, 4)
    resident.slot.load(resident.theta0)
    resident.slot.set_lora_a_trainable(True)
    tr.model.train()
    with tr._private().active(tr.optimizer, 1e9, 0.0, 4.0, torch.Generator().manual_seed(0)) as dp:
        loss, count = tr.loss(collate(examples, tr.pad_id), per_example=True)
        loss.backward()
        per_example = {k: p.grad_sample.clone() for k, p in tr.params.items()}
        dp.zero_grad(set_to_none=True)
    tr.optimizer.zero_grad(set_to_none=True)
    assert count == 4
    for i, ex in enumerate(examples):  # by hand: one example, its mean token loss
        summed, tokens = tr.loss(collate([ex], tr.pad_id))
        (summed / tokens).backward()
        for k, p in tr.params.items():
            assert torch.allclose(p.grad, per_example[k][i], rtol=1e-4, atol=1e-7), k
        tr.optimizer.zero_grad(set_to_none=True)


def test_a_dpsgd_step_is_clipped_sums_plus_noise_of_the_configured_scale(resident):
    from fedguard.data.tokenize import collate
    from fedguard.privacy.dpsgd import empty_step

    tr, examples = resident.trainer, _examples(resident, 6)
    resident.slot.load(resident.theta0)
    tr.model.train()
    clip, expected = 1e-3, 4.0
    want = {k: torch.zeros_like(p) for k, p in tr.params.items()}  # by hand: Σ clip(g_i) / expected batch
    for ex in examples:
        summed, tokens = tr.loss(collate([ex], tr.pad_id))
        (summed / tokens).backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in tr.params.values()))
        assert norm > clip  # so clipping is what the step shows
        for k, p in tr.params.items():
            want[k] += p.grad * (clip / norm) / expected
        tr.optimizer.zero_grad(set_to_none=True)
    with tr._private().active(tr.optimizer, clip, 0.0, expected, torch.Generator().manual_seed(0)) as dp:
        for i, half in enumerate((examples[:3], examples[3:])):  # two physical batches, one logical step
            loss, _ = tr.loss(collate(half, tr.pad_id), per_example=True)
            loss.backward()
            if i == 0:
                dp.signal_skip_step(do_skip=True)
                dp.step()
                dp.zero_grad(set_to_none=True)
        assert dp.pre_step()
        got = {k: p.grad.clone() for k, p in tr.params.items()}
        dp.zero_grad(set_to_none=True)
    tr.optimizer.zero_grad(set_to_none=True)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-9), k
    with tr._private().active(tr.optimizer, 0.5, 2.0, expected, torch.Generator().manual_seed(1)) as dp:
        empty_step(dp)  # a step no example joined: noise alone
        assert dp.pre_step()
        noise = torch.cat([p.grad.reshape(-1) for p in dp.params]).double()
        dp.zero_grad(set_to_none=True)
    tr.optimizer.zero_grad(set_to_none=True)
    want = 2.0 * 0.5 / expected
    assert abs(float(noise.std()) - want) < 5 * want / math.sqrt(2 * noise.numel())


def test_dpsgd_batches_are_poisson():
    from fedguard.federated.batches import poisson_batches
    from fedguard.seeding import numpy_rng

    plan = poisson_batches(numpy_rng(0, "t"), 100, 0.1, 4, 400)
    sizes = [sum(len(b) for b in step) for step in plan]
    assert 9.0 < sum(sizes) / len(sizes) < 11.0 and len(set(sizes)) > 5
    assert all(len(b) <= 4 for step in plan for b in step)
    assert all(len(set().union(*map(set, step))) == sum(map(len, step)) for step in plan if step)  # no repeats


def test_dpsgd_and_adaptive_distributed_clipping_report_epsilon_and_resume_exactly(tmp_path):
    """One run with both mechanisms (a kill-and-resume costs three runs, so the two share one): each client's
    DP-SGD epsilon is the accountant's for the steps it took, and the resumed run continues every client's
    history from its checkpoint; the adaptive clip the server learnt is used the next round and comes back
    exactly after the kill; the final adapters are equal."""
    from fedguard.io import load_tensors
    from fedguard.privacy.accountant import epsilon

    privacy = {"sample_dp": "dpsgd", "sample_clip": 1.0, "sample_noise_multiplier": 1.2, "delta": 1e-4,
               "client_dp": "distributed", "noise_multiplier": 0.5, "adaptive_clip": True,
               "clipped_count_stddev": 1.0, "clip": 0.01}
    cfg = tiny_config(federation={"rounds": 3, "num_clients": 4, "clients_per_round": 4},
                      train={"local_steps": 2, "batch_size": 4, "grad_accum": 2}, privacy=privacy)
    full, killed = killed_and_resumed(cfg, tmp_path)
    rounds = [r for r in read_ndjson(full / "metrics.ndjson") if r["round"] > 0]
    resumed = [r for r in read_ndjson(killed / "metrics.ndjson") if r["round"] > 0]
    # sample level: each client's own accountant
    joined: dict[str, int] = {}
    for r in rounds:
        for cid, m in r["clients"].items():
            joined[cid] = joined.get(cid, 0) + 1
            q = m["dpsgd_sample_rate"]
            assert q == pytest.approx(8 / 24)
            assert m["dpsgd_epsilon"] == pytest.approx(epsilon([(q, 1.2, 2)] * joined[cid], 1e-4))
    assert sum(joined.values()) >= 6
    eps = lambda rs: [{c: m["dpsgd_epsilon"] for c, m in r["clients"].items()} for r in rs]  # noqa: E731
    assert eps(resumed) == eps(rounds)  # each client's history came back from the checkpoint
    # client level: distributed noise with the adaptive clip
    dp = [r["privacy"] for r in rounds]
    assert [r["privacy"] for r in resumed] == dp
    assert dp[1]["clip"] == dp[0]["next_clip"] != dp[0]["clip"]  # the clip the server learnt is used
    assert dp[-1]["epsilon"] > dp[0]["epsilon"] > 0
    a, b = (load_tensors(d / "final_adapter" / "adapter_model.safetensors") for d in (full, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # noise and batches are seeded per (round, client)
    assert "sample-level DP-SGD" in (full / "report.md").read_text()


def test_the_config_refuses_dpsgd_with_a_shadow_branch_outside_the_guarantee():
    from fedguard.config import ConfigError

    with pytest.raises(ConfigError, match="shadow"):
        tiny_config(privacy={"sample_dp": "dpsgd"}, defense={"level": "shadow"})


# -- DP and the defense ------------------------------------------------------------------------------------------
def test_the_probe_judges_updates_before_central_noise_and_noisy_ones_under_distributed_dp():
    """Central DP: the client level weighs the updates as the clients sent them, so its verdicts are those of a
    run without DP. Distributed DP: the server (and the probe) only ever sees updates with the clients' noise."""
    from test_defense import _toy_probe

    from fedguard.config import DefenseConfig
    from fedguard.defenses.defense import ProbeDefense
    from fedguard.federated.aggregation import build_aggregator
    from fedguard.federated.server import FederatedServer
    from fedguard.privacy.client_dp import ClientLevelDP, privatize_update

    probe, theta0 = _toy_probe()
    b = "m.layers.0.q.lora_B.weight"
    updates = [ClientUpdate("0", {**theta0, b: -torch.ones(4, 2)}, 1), ClientUpdate("1", {**theta0, b: torch.ones(4, 2)}, 1)]

    def verdicts(privacy, sent):
        server = FederatedServer(build_aggregator("fedavg"), 2 ** 20, ProbeDefense(DefenseConfig(level="client"), probe,
                                                                                    theta0, 2, 4, 1e-3), privacy=privacy)
        out = server.aggregate_round(1, theta0, sent, ServerState())
        return [v.weight for v in out.verdicts]

    dp = dict(clip=1.0, noise_multiplier=3.0, sample_rate=1.0, num_clients=2, delta=1e-5, seed=0)
    plain = verdicts(None, updates)
    assert plain[0] > 0.9 and plain[1] < 0.1
    assert verdicts(ClientLevelDP(**dp), updates) == plain  # central: judged before clipping and noise
    distributed = ClientLevelDP(**dp, mode="distributed")
    rc = RoundConfig(1, 0.1, 1, 1, 1, seed=5, **distributed.client_requests(ServerState()))
    noisy = [ClientUpdate(u.client_id, privatize_update(u.tensors, theta0, [b], rc, u.client_id)[0], 1)
             for u in updates]
    assert verdicts(distributed, noisy) != plain  # the probe sees the clients' noise (std 2.1 on entries of ±0.35)
