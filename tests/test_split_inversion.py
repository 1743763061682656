"""The colluding-client inversion attack on split learning (fedguard.split.attacks) and the NoPeek protection
(fedguard.split.protections), on a tiny 4-layer LLaMA: the attack reads tokens off clean hidden states far above
the no-activation prior and falls to about the prior under large noise; ROUGE-L and the distance correlation
behave at their extremes; the NoPeek gradient reaches the front's LoRA only; with NoPeek off a training step is
bit-for-bit the step without it."""

import pytest
import torch
from conftest import tiny_config

from fedguard.split.attacks import (
    HiddenSet,
    SentRecorder,
    client_hidden,
    common_prefix_length,
    inversion_attack,
    lcs_length,
    positional_prior,
    recovery,
    rouge_l,
)
from fedguard.split.protections import distance_correlation, nopeek_penalty, token_distances

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (conftest)


def _cfg(path, examples=12, **split):
    train, lora = split.pop("train", {}), split.pop("lora", {})
    return tiny_config(lora={"r": 4, "alpha": 8, "dropout": 0.0, "init_seed": 5, **lora},
                       model={"name_or_path": str(path), "precision": "fp32"},
                       federation={"num_clients": 2, "clients_per_round": 2},
                       data={"examples_per_client": examples, "max_length": 96, "refusal_share": 0.0,
                             "partition": {"method": "iid"}},
                       train={"lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": None, **train},
                       split={"k_a": 1, "k_c": 1, "steps": 3, "eval_examples": 0, **split})


def _system(cfg, nonzero=True):
    """A fresh resident model with LoRA (nonzero adapter: B = 0 would leave lora_A without gradient), two
    clients "c" (colluder) and "v" (victim) behind a recording transport, and their data."""
    from fedguard.data.federation import build_client_data
    from fedguard.alignment import load_start_model
    from fedguard.model import attach_lora
    from fedguard.split.train import build_split_system

    loaded = load_start_model(cfg.model)
    peft_model, slot = attach_lora(loaded.model, cfg.lora)
    if nonzero:
        g = torch.Generator().manual_seed(11)
        slot.load({k: 0.3 * torch.randn(shape, generator=g) for k, shape in slot.shapes().items()})
    system = build_split_system(cfg, loaded, peft_model, client_ids=["c", "v"], record=True)
    for c in system.clients:
        c.hello()
    return system, build_client_data(cfg, loaded.tokenizer), loaded.tokenizer.pad_token_id


def _batches(examples, pad_id, size=4):
    from fedguard.split.client import count_batches

    return count_batches(examples, pad_id, size)


# --- 1. metrics ---------------------------------------------------------------------------------------------------

def test_rouge_l_extremes_and_a_known_value():
    assert rouge_l([5, 6, 7, 8], [5, 6, 7, 8]) == 1.0
    assert rouge_l([1, 2, 3], [4, 5, 6, 7]) == 0.0
    assert rouge_l([1, 2, 3], []) == 0.0
    # LCS of 1 2 3 4 and 1 3 4 5 is 1 3 4: recall 3/4, precision 3/4
    assert lcs_length([1, 2, 3, 4], [1, 3, 4, 5]) == 3
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)
    # recall 2/2, precision 2/4: F1 = 2/3; order matters (a subsequence, not a bag)
    assert rouge_l([1, 2], [1, 9, 2, 9]) == pytest.approx(2 / 3)
    assert rouge_l([1, 2, 3], [3, 2, 1]) == pytest.approx(1 / 3)


def test_recovery_prefix_and_prior():
    truth = [torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5])]
    pred = [torch.tensor([1, 2, 3, 9]), torch.tensor([1, 2, 9])]
    assert common_prefix_length(truth) == 2
    r = recovery(pred, truth, start=2)
    assert r["token_recovery"] == pytest.approx(1 / 3) and r["positions"] == 3
    assert recovery(truth, truth)["token_recovery"] == 1.0 and recovery(truth, truth)["rouge_l"] == 1.0
    prior = positional_prior([torch.tensor([1, 2, 3]), torch.tensor([1, 4, 3]), torch.tensor([1, 4])], [4, 2])
    assert prior[0].tolist() == [1, 4, 3, 1] and prior[1].tolist() == [1, 4]  # 1 is the overall most frequent


# --- 2. distance correlation ------------------------------------------------------------------------------------

def test_distance_correlation_independent_identical_and_isometric():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(256, 32, generator=g), torch.randn(256, 64, generator=g)
    assert abs(float(distance_correlation(x, z))) < 0.03
    # the plain V-statistic is far from 0 for independent high-dimensional samples: why R* is the penalty
    assert float(distance_correlation(x, z, unbiased=False)) > 0.3
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-5)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    assert float(distance_correlation(x, 3.0 * x @ q + 1.0)) == pytest.approx(1.0, abs=1e-4)
    # tokens: one-hot distances vs hidden states that are the tokens' own embeddings (a leak) or unrelated
    ids = torch.randint(0, 40, (200,), generator=g)
    table = torch.randn(40, 16, generator=g)
    leak = float(distance_correlation(token_distances(ids), table[ids], x_is_distance=True))
    none = float(distance_correlation(token_distances(ids), torch.randn(200, 16, generator=g), x_is_distance=True))
    assert leak > 0.5 and abs(none) < 0.03


# --- 3. the attack ------------------------------------------------------------------------------------------------

def test_attack_recovers_clean_tokens_and_much_less_under_large_noise(tiny4_path):
    """At the untrained front (k_a = 1) the colluder-trained linear probe reads the victim's clean tokens far
    above the no-activation prior; on training-time messages under relative noise r = 8 it is near the prior.
    The decoder inverter beats the prior on clean states too; the colluder's own held-out pairs (same A) as well."""
    cfg = _cfg(tiny4_path, examples=40, noise={"mode": "relative", "scale": 8.0})
    system, data, pad = _system(cfg, nonzero=False)
    colluder, victim = system.clients
    cb, vb = _batches(data[0].examples, pad), _batches(data[1].examples, pad)
    attacker, control = client_hidden(colluder, cb).split(0.2)
    clean = inversion_attack(attacker, client_hidden(victim, vb), control=control,
                             steps={"linear": 150, "decoder": 120}, d=64)
    prior = clean["prior"]["token_recovery"]
    assert clean["linear"]["token_recovery"] > max(0.6, prior + 0.4)
    assert clean["linear"]["rouge_l"] > clean["prior"]["rouge_l"] + 0.3
    assert clean["linear"]["control_token_recovery"] > prior + 0.4
    assert clean["decoder"]["token_recovery"] > prior + 0.2

    noisy_attacker = client_hidden(colluder, cb, noise=True) + client_hidden(colluder, cb, noise=True, step_offset=7)
    # the victim's training-time messages, as the server received them
    recorder = SentRecorder(system.transport)
    victim.transport = recorder
    for step, (batch, counts) in enumerate(vb[:4], start=1):
        victim.train_step(batch, counts, step)
    sent = recorder.hidden_set("v", vb[:4])
    received = [r.tensors["hidden"] for r in system.transport.received if r.kind == "forward" and r.client_id == "v"]
    assert torch.equal(torch.cat([h[b, :n] for h, (_, c) in zip(received, vb[:4]) for b, n in enumerate(c.tolist())]),
                       torch.cat(sent.hidden))
    noisy = inversion_attack(noisy_attacker, sent, kinds=("linear",), steps={"linear": 150})
    assert noisy["linear"]["token_recovery"] < clean["linear"]["token_recovery"] - 0.35
    assert noisy["linear"]["token_recovery"] < noisy["prior"]["token_recovery"] + 0.15


def test_hidden_set_split_and_recorder_checks_pairing():
    hs = HiddenSet([torch.zeros(3, 2)] * 5, [torch.zeros(3, dtype=torch.long)] * 5)
    a, b = hs.split(0.2)
    assert len(a) == 4 and len(b) == 1
    rec = SentRecorder(transport=None)
    with pytest.raises(ValueError, match="recorded"):
        rec.hidden_set("v", [(None, torch.tensor([3]))])


# --- 4. NoPeek ------------------------------------------------------------------------------------------------------

def test_nopeek_config_is_off_by_default(tiny4_path):
    from fedguard.config import ConfigError

    cfg = _cfg(tiny4_path)
    assert cfg.split.nopeek.weight == 0.0
    with pytest.raises((ConfigError, ValueError)):
        _cfg(tiny4_path, nopeek={"weight": -1.0})


def test_nopeek_gradient_reaches_the_front_lora_only(tiny4_path):
    """The penalty's own backward fills A's LoRA gradients and nothing else; inside a training step it changes
    A's gradients only: C's and the server's are bit-for-bit those of the step without it."""
    cfg = _cfg(tiny4_path, nopeek={"weight": 0.5})
    system, data, pad = _system(cfg)
    client = system.clients[1]
    batch, counts = _batches(data[1].examples, pad)[0]
    client.activate(train=False)
    h_a = client.seam.front(batch.input_ids, counts)
    penalty = nopeek_penalty(client.seam.decoder.embed_tokens, batch.input_ids, h_a, counts)
    assert 0.05 < float(penalty.detach()) <= 1.0
    penalty.backward()
    front, back = client.banks[0].params(client.id), client.banks[1].params(client.id)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in front.values())
    assert all(p.grad is None for p in back.values())
    assert all(p.grad is None for p in system.server.lora.params(next(iter(system.server.lora.sets))).values())
    assert all(p.grad is None for n, p in system.peft_model.named_parameters() if "lora_" not in n)
    for p in front.values():
        p.grad = None

    grads = {}
    for weight in (0.0, 0.5):
        cfg_w = _cfg(tiny4_path, nopeek={"weight": weight})
        sys_w, _, _ = _system(cfg_w)
        c = sys_w.clients[1]
        c.keep_gradients = sys_w.server.keep_gradients = True
        m = c.train_step(batch, counts, step=1)
        assert ("nopeek_dcor" in m) == bool(weight)
        grads[weight] = ({k: g.clone() for k, g in c.last_gradients.items()},
                         {k: g.clone() for k, g in sys_w.server.last_gradients["server"].items()})
    (c0, s0), (c1, s1) = grads[0.0], grads[0.5]
    assert set(c0) == set(c1) and s0.keys() == s1.keys()
    for k in c0:
        if k.startswith("back:"):
            assert torch.equal(c0[k], c1[k]), k
    assert any(not torch.equal(c0[k], c1[k]) for k in c0 if k.startswith("front:"))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


def _reference_step(client, batch, counts, step):
    """The split training step without NoPeek, as ``SplitClient.train_step`` ran it before the protection."""
    from fedguard.split.client import completion_loss

    shape = (batch.input_ids.shape[0], batch.input_ids.shape[1], client.hidden_size)
    client.activate(train=True)
    client._seed("front", step)
    h_a = client.seam.front(batch.input_ids, counts)
    sent, _ = client.noised(h_a, counts, step, train=True)
    reply, _ = client.transport.call("forward", client.id, {"hidden": sent, "counts": counts},
                                     {"step": step, "train": True})
    h_b = client._reply_tensor("forward", reply, "hidden", shape).detach().requires_grad_(True)
    client.activate(train=True)
    client._seed("back", step)
    loss_sum, n = completion_loss(client.seam, client.seam.back(h_b, counts), batch)
    (loss_sum / n).backward()
    g_b = client._gradient_noise(h_b.grad, counts, step)
    client._step(1, step)
    reply, _ = client.transport.call("backward", client.id, {"grad": g_b.to(client.wire_dtype)}, {"step": step})
    h_a.backward(client._reply_tensor("backward", reply, "grad", shape).to(h_a.dtype))
    client._step(0, step)


def test_training_with_nopeek_off_is_unchanged_bitwise(tiny4_path, monkeypatch):
    """Default config and an explicit weight 0 train exactly like the step without the protection (three steps,
    noise on, dropout on): every LoRA tensor of the client and the server is bit-for-bit equal, and the
    penalty is never computed."""
    from fedguard.split import protections

    def refuse(*a, **k):
        raise AssertionError("nopeek_penalty ran with the protection off")

    monkeypatch.setattr(protections, "nopeek_penalty", refuse)
    states = []
    for variant in ("reference", "default", "weight0"):
        extra = {"nopeek": {"weight": 0.0}} if variant == "weight0" else {}
        cfg = _cfg(tiny4_path, noise={"mode": "relative", "scale": 0.5}, lora={"dropout": 0.1}, **extra)
        system, data, pad = _system(cfg)
        client = system.clients[1]
        for step, (batch, counts) in enumerate(_batches(data[1].examples, pad)[:3], start=1):
            if variant == "reference":
                _reference_step(client, batch, counts, step)
            else:
                m = client.train_step(batch, counts, step)
                assert "nopeek_dcor" not in m
        states.append(client.adapter_state() | system.server.adapter_state())
    ref = states[0]
    for other in states[1:]:
        assert set(other) == set(ref)
        for k in ref:
            assert torch.equal(other[k], ref[k]), k


def test_nopeek_training_lowers_dcor_and_recovery(tiny4_path):
    """Forty steps with NoPeek drive the step's distance correlation down and the clean-state recovery of the
    linear probe with it, against the same run without NoPeek (a functional check on a random tiny model)."""
    from fedguard.split.train import BatchStream

    results = {}
    for weight in (0.0, 1.0):
        cfg = _cfg(tiny4_path, examples=40, nopeek={"weight": weight})
        system, data, pad = _system(cfg, nonzero=False)
        streams = [BatchStream(d.examples, 4, pad, 0, c.id) for c, d in zip(system.clients, data)]
        dcor = []
        for step in range(1, 41):
            for c, s in zip(system.clients, streams):
                m = c.train_step(*s.next(), step)
                dcor.append(m.get("nopeek_dcor"))
        colluder, victim = system.clients
        attack = inversion_attack(client_hidden(colluder, _batches(data[0].examples, pad)),
                                  client_hidden(victim, _batches(data[1].examples, pad)), kinds=("linear",),
                                  steps={"linear": 150})
        results[weight] = (dcor, attack["linear"]["token_recovery"], attack["prior"]["token_recovery"])
    dcor, with_nopeek, prior = results[1.0]
    assert dcor[0] > 0.5 and max(dcor[-4:]) < 0.3
    assert with_nopeek < results[0.0][1] - 0.2
    assert results[0.0][1] > prior + 0.4
