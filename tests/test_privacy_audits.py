"""Canary exposure (The Secret Sharer) and the server's attack on one uploaded update, on the tiny model:
memorised canaries are exposed and an untrained adapter ranks secrets at random; the update attack finds the
records a client trained on in its round and nothing in an update trained on other data."""

import math

import numpy as np
import pytest

from conftest import tiny_config

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "init_seed": 5}


@pytest.fixture(scope="module")
def setup():
    """The tiny model on one torch thread (several times faster than two on a busy machine: the model's ops are
    too small to split), the process's thread count restored afterwards."""
    import torch

    from fedguard.factories import load_resident

    threads = torch.get_num_threads()
    cfg = tiny_config(lora=LORA, data={"examples_per_client": 32, "max_length": 96, "refusal_share": 0.0},
                      federation={"num_clients": 4, "clients_per_round": 2, "rounds": 1},
                      model={"name_or_path": "tiny-llama", "precision": "fp32", "num_threads": 1})
    yield cfg, load_resident(cfg)
    torch.set_num_threads(threads)


def _train(resident, start, examples, steps, lr, batch_size=4):
    from fedguard.data.federation import ClientData
    from fedguard.messages import RoundConfig

    rc = RoundConfig(server_round=1, lr=lr, local_steps=steps, batch_size=batch_size, grad_accum=1, seed=3)
    return resident.trainer.train(start, rc, ClientData(0, examples)).tensors


def test_canaries_are_reproducible_distinct_and_hold_their_secret():
    from fedguard.privacy.canaries import canary_examples, make_canaries

    a, b = make_canaries(12, seed=4, n_candidates=50), make_canaries(12, seed=4, n_candidates=50)
    assert a == b and a != make_canaries(12, seed=5, n_candidates=50)
    assert len({c.prefix for c in a}) == 12
    for c in a:
        assert len(c.candidates) == 51 and len(set(c.candidates)) == 51 and c.secret in c.candidates
        assert all(len(s.split()) == 6 and all(d.isdigit() for d in s.split()) for s in c.candidates)
    assert len({c.secret_index for c in a}) > 3  # the secret's place among the candidates says nothing
    ex = canary_examples(a[:3], repeats=4)
    assert len(ex) == 12 and sorted(e.completion for e in ex) == sorted(c.secret for c in a[:3] for _ in range(4))
    assert all(e.prompt_text == a[e.meta["canary"]].prefix and e.domain == "canary" for e in ex)


def test_batched_losses_are_the_trainers_per_example_losses(setup):
    import torch

    from fedguard.data.tokenize import collate
    from fedguard.privacy.audits import example_losses
    from fedguard.privacy.canaries import _tokenized_candidates, make_canaries

    cfg, res = setup
    examples = _tokenized_candidates(res.loaded.tokenizer, make_canaries(2, seed=1, n_candidates=5), cfg.data)
    adapter = {k: v + 0.05 * torch.randn_like(v) for k, v in res.theta0.items()}
    pad = res.loaded.tokenizer.pad_token_id
    res.slot.load(adapter)
    with torch.inference_mode():
        ref = np.array([float(res.trainer.loss(collate([e], pad))[0]) for e in examples])
    assert example_losses(res, adapter, examples, 8, "sum") == pytest.approx(ref, rel=1e-4)
    counts = np.array([e.completion_len for e in examples])
    assert example_losses(res, adapter, examples, 3) == pytest.approx(ref / counts, rel=1e-4)


def _uniform_exposure_moments(n: int) -> tuple[float, float]:
    e = math.log2(n) - np.log2(np.arange(1, n + 1))
    return float(e.mean()), float(e.std())


def test_an_untrained_adapter_ranks_the_secret_at_random(setup):
    """The secret and the other candidates are drawn alike: a model that never saw them ranks the secret
    uniformly, so the exposure averages its chance level."""
    from fedguard.privacy.canaries import canary_exposure, chance_exposure, make_canaries

    cfg, res = setup
    k, n = 40, 32
    out = canary_exposure(res, res.theta0, make_canaries(k, seed=2, n_candidates=n - 1), max_new_tokens=0,
                          data=cfg.data)
    mean, std = _uniform_exposure_moments(n)
    assert out["chance_exposure"] == pytest.approx(mean) and out["max_exposure_possible"] == 5.0
    assert abs(out["mean_exposure"] - chance_exposure(n)) < 4 * std / math.sqrt(k)
    rank_sd = math.sqrt((n * n - 1) / 12)
    assert abs(np.mean(out["ranks"]) - (n + 1) / 2) < 4 * rank_sd / math.sqrt(k)
    assert out["before"] is None and out["exposure_gain"] is None and out["extracted"] == []


def test_memorised_canaries_are_exposed_and_extracted(setup):
    """Overfit on the canaries (few examples, many steps): every secret becomes the most likely candidate and
    greedy decoding prints most of them. Secrets use the digits 1-9, which the tiny tokenizer spells in the same
    number of tokens (' 0' takes two), so the ranking compares like with like on a model too weak to make an
    extra token nearly free."""
    from fedguard.data.federation import DataTokenizer
    from fedguard.privacy.canaries import canary_examples, canary_exposure, make_canaries

    cfg, res = setup
    canaries = make_canaries(8, seed=1, n_candidates=31, alphabet="123456789")
    examples = DataTokenizer(res.loaded.tokenizer, cfg)(canary_examples(canaries, repeats=2))
    trained = _train(res, res.theta0, examples, steps=60, lr=2e-2, batch_size=8)
    out = canary_exposure(res, trained, canaries, max_new_tokens=16, before=res.theta0, data=cfg.data)
    before = out["before"]
    assert out["candidates"] == 32 and out["candidate_tokens"][0] == out["candidate_tokens"][1]
    assert out["rank1_rate"] >= 0.75 and out["mean_exposure"] > 4.0
    assert out["mean_exposure"] > before["mean_exposure"] + 2.0 and out["exposure_gain"] > 2.0
    assert before["rank1_rate"] <= 0.25
    assert out["extraction_rate"] >= 0.5 and before["extraction_rate"] == 0.0
    assert out["max_exposure"] <= out["max_exposure_possible"] == 5.0


def test_the_server_finds_what_one_upload_trained_on(setup):
    """From the round-start global and one client's upload, the loss-ratio score separates the records the client
    trained on from others of the same source; an upload trained on other records gives it nothing."""
    from fedguard.data.federation import build_client_data
    from fedguard.privacy.audits import update_attack

    cfg, res = setup
    clients = build_client_data(cfg, res.loaded.tokenizer)
    members, non_members = clients[0].examples, clients[1].examples
    glob = _train(res, res.theta0, clients[2].examples, steps=10, lr=2e-2)  # a round-start global that is not θ₀
    leak = update_attack(res, glob, _train(res, glob, members, steps=150, lr=3e-2), members, non_members)
    null = update_attack(res, glob, _train(res, glob, clients[3].examples, steps=150, lr=3e-2), members, non_members)
    assert leak["members"] == leak["non_members"] == 32
    assert leak["auc"] > 0.85 and leak["precision_at_k"] > 0.7 and leak["member_score_mean"] > 0
    assert abs(null["auc"] - 0.5) < 3 * null["auc_standard_error"]
    assert null["auc"] < leak["auc"] - 0.25


def test_precision_at_k_counts_the_top_k():
    from fedguard.privacy.audits import precision_at_k

    labels = np.array([1, 1, 0, 0])
    assert precision_at_k(labels, np.array([0.9, 0.1, 0.8, 0.2]), 2) == 0.5
    assert precision_at_k(labels, np.array([0.9, 0.7, 0.1, 0.2]), 2) == 1.0


# -- the audits in a run -----------------------------------------------------------------------------------------
def test_a_run_reports_the_three_audits_and_dpsgd_blinds_the_servers_view(tmp_path):
    """After deliberate overfitting the server's attack on one upload finds the client's round examples and the
    planted canaries rank high; with DP-SGD in the client (large noise, small per-example bound) the same attack
    is near chance. Secure aggregation leaves the server no single upload to attack."""
    from conftest import tiny_config

    from fedguard.simulation.runner import run_experiment

    overfit = dict(federation={"num_clients": 2, "clients_per_round": 2, "rounds": 2},
                   data={"examples_per_client": 32, "max_length": 96},
                   train={"local_steps": 40, "batch_size": 4, "lr": 5e-2, "lr_schedule": "constant"},
                   lora={"r": 16, "alpha": 32, "dropout": 0.0, "init_seed": 5})
    audits = {"audit_membership": True, "audit_examples": 16, "audit_update": True, "canaries": 4,
              "canary_repeats": 4, "canary_candidates": 31}
    plain = run_experiment(tiny_config(**overfit, privacy=audits), tmp_path / "plain", quiet=True).final_metrics
    assert plain["update_attack"]["auc"] > 0.8 and plain["update_attack"]["round"] == 2
    assert plain["canary_exposure"]["mean_exposure"] > plain["canary_exposure"]["before"]["mean_exposure"] + 1.0
    assert plain["update_attack"]["non_members_from"] == "the client's examples not drawn in that round"
    assert plain["membership_inference"]["members"] == plain["membership_inference"]["non_members"] > 8
    private = run_experiment(tiny_config(**overfit, privacy={**audits, "sample_dp": "dpsgd", "sample_clip": 0.01,
                                                             "sample_noise_multiplier": 2.0}),
                             tmp_path / "dpsgd", quiet=True).final_metrics
    leak, kept = plain["update_attack"]["auc"], private["update_attack"]["auc"]
    assert abs(kept - 0.5) < 0.25 and leak - kept > 0.2, (leak, kept)
    secure = run_experiment(tiny_config(**overfit, privacy={"secure_aggregation": "secagg+", "audit_update": True}),
                            tmp_path / "secure", quiet=True)
    assert "secure aggregation" in secure.final_metrics["update_attack"]["skipped"]
    assert "what the server sees" in secure.report.read_text()
