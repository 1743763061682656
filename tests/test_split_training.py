"""FedSEA-style split learning (fedguard.split) on a tiny 4-layer LLaMA: a split step equals the unsplit step,
nothing but hidden states, gradients and counts reaches the server, noise is calibrated and straight-through,
the server refuses malformed requests and keeps serving, collaborative decoding equals greedy generation,
batch-parallel gradients add up, client aggregation is the exact mean of B·A, and the CLI runs end to end."""

import json
import math
import threading

import pytest
import torch
from conftest import tiny_config

from fedguard.split.messages import KINDS, ProtocolError

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (conftest)


def _cfg(path, **split):
    train = split.pop("train", {})
    return tiny_config(model={"name_or_path": str(path), "precision": "fp32"},
                       federation={"num_clients": 2, "clients_per_round": 2},
                       data={"examples_per_client": 12, "max_length": 64},
                       train={"lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": None, **train},
                       split={"k_a": 1, "k_c": 1, "steps": 3, "eval_examples": 0, **split})


def _load(cfg, nonzero=True, sharpen=False):
    """A fresh resident model with LoRA (dropout 0) and, by default, a nonzero adapter (B = 0 at init would
    leave every lora_A gradient zero)."""
    from fedguard.alignment import load_start_model
    from fedguard.model import attach_lora

    loaded = load_start_model(cfg.model)
    if sharpen:  # larger weights: a greedy path that varies (as in test_split_blocks)
        with torch.no_grad():
            for p in loaded.model.parameters():
                if p.ndim == 2:
                    p.mul_(8)
    peft_model, slot = attach_lora(loaded.model, cfg.lora)
    theta = slot.read()
    if nonzero:
        g = torch.Generator().manual_seed(11)
        theta = {k: 0.3 * torch.randn(shape, generator=g) for k, shape in slot.shapes().items()}
        slot.load(theta)
    return loaded, peft_model, slot, theta


def _system(cfg, loaded, peft_model, ids=("a", "b"), **kw):
    from fedguard.split.train import build_split_system

    system = build_split_system(cfg, loaded, peft_model, client_ids=list(ids), record=True, **kw)
    for c in system.clients:
        c.hello()
    return system


def _batches(cfg, loaded, sizes=(3, 2)):
    """Right-padded batches (with counts) of the first client's examples: short ones first, then long ones."""
    from fedguard.data.federation import build_client_data
    from fedguard.split.client import collate_with_counts

    examples = sorted(build_client_data(cfg, loaded.tokenizer)[0].examples, key=lambda e: len(e.input_ids))
    out, start = [], 0
    for n in sizes:
        chunk = examples[start:start + n] if start == 0 else examples[-n:]
        out.append(collate_with_counts(chunk, loaded.tokenizer.pad_token_id))
        start += n
    return out


# --- 1. one split step equals one unsplit step ------------------------------------------------------------

def test_split_step_equals_unsplit_step(tiny4_path):
    """fp32, noise off: one step over the in-process transport gives the unsplit step's LoRA gradients (every
    LoRA tensor, nonzero) and the same parameters after AdamW, from the same LoRA init and batch."""
    from fedguard.model.loss import CompletionLoss

    cfg = _cfg(tiny4_path, k_a=1, k_c=2)
    loaded, peft_model, slot, theta = _load(cfg)
    batch, counts = _batches(cfg, loaded, sizes=(4,))[0]
    assert len(set(counts.tolist())) > 1  # padding in play

    peft_model.train()
    params = slot.named_parameters()
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_sum, n = CompletionLoss(loaded, peft_model)(batch)
    (loss_sum / n).backward()
    ref_grads = {k: p.grad.clone() for k, p in params.items()}
    opt.step()
    ref_after = slot.read()
    slot.load(theta)

    system = _system(cfg, loaded, peft_model, ids=("a",))
    client, server = system.clients[0], system.server
    client.keep_gradients = server.keep_gradients = True
    m = client.train_step(batch, counts, step=1)
    assert m["loss"] == pytest.approx(float(loss_sum.detach()) / n, rel=1e-6)
    grads = {k.split(":", 1)[1]: g for k, g in client.last_gradients.items()} | server.last_gradients["server"]
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7, msg=k)
    after = client.adapter_state() | server.adapter_state()
    for k, t in ref_after.items():
        assert not torch.equal(t, theta[k]), k  # the step moved it
        torch.testing.assert_close(after[k], t, rtol=1e-6, atol=1e-7, msg=k)
    # each side holds only its own layers' LoRA (k_a = 1, k_c = 2 on 4 layers: the server holds layer 1)
    assert server.adapter_state() and all(".layers.1." in k for k in server.adapter_state())
    assert not any(".layers.1." in k for k in client.adapter_state())


# --- 2. no raw data reaches the server ---------------------------------------------------------------------

ALLOWED_META = {"step", "train", "spec", "weight"}


def _ints_in(obj):
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int):
        return [obj]
    if isinstance(obj, dict):
        return [i for v in obj.values() for i in _ints_in(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in _ints_in(v)]
    return []


def test_no_raw_data_reaches_the_server(tiny4_path):
    from fedguard.split.generate import collaborative_greedy

    cfg = _cfg(tiny4_path, noise={"mode": "relative", "scale": 0.5})
    loaded, peft_model, _, _ = _load(cfg)
    system = _system(cfg, loaded, peft_model)
    batches = _batches(cfg, loaded)
    for step in (1, 2):
        for c, (batch, counts) in zip(system.clients, batches):
            c.train_step(batch, counts, step)
    system.clients[0].evaluate(batches[:1])
    ids, counts = batches[1][0].input_ids, batches[1][1]
    collaborative_greedy(system.clients[1], ids, counts, max_new_tokens=4, eos_token_id=None)

    vocab, hidden = loaded.model.config.vocab_size, loaded.model.config.hidden_size
    received = system.transport.received
    assert {r.kind for r in received} == {"hello", "forward", "backward", "prefill", "decode", "end"}
    replies = system.transport.replies
    for r in received + replies:
        where = f"{r.kind} from {r.client_id}"
        assert set(r.meta) <= ALLOWED_META | {"mode", "protocol_version"}, where
        assert all(abs(i) < 1000 for i in _ints_in(r.meta)), where  # steps, layer counts; no token ids
        for name, t in r.tensors.items():
            assert name in {"hidden", "grad", "counts"}, (where, name)
            assert vocab not in t.shape, (where, name)  # no logits or vocabulary-sized tensor
            assert t.dtype != torch.bool, (where, name)
            if t.dtype.is_floating_point:
                assert t.ndim == 3 and t.shape[-1] == hidden, (where, name)
            else:  # the only integer tensor: per-sample counts [B]
                assert name == "counts" and t.dtype == torch.int64 and t.ndim == 1, (where, name)
    assert not any("counts" in r.tensors for r in replies)  # the server sends only hidden states and gradients
    training = [r for r in received if r.kind in ("forward", "backward")]
    assert len(training) == 2 * 2 * 2 + 1  # two steps of two clients, forward and backward; one evaluation
    assert all(t.ndim == 3 for r in training for n, t in r.tensors.items() if n != "counts")  # no mask, no positions
    sent_counts = [r.tensors["counts"] for r in received if r.kind == "forward"]
    assert any(torch.equal(c, batches[0][1]) for c in sent_counts)
    # token ids of the batch appear nowhere, not even as float values of a tensor
    for r in received:
        for t in r.tensors.values():
            if t.dtype.is_floating_point and t.shape[:2] == batches[0][0].input_ids.shape:
                assert not torch.equal(t[..., 0].round(), batches[0][0].input_ids.to(t.dtype))


def test_bf16_wire_carries_half_the_bytes_and_trains_like_fp32(tiny4_path):
    """``wire_dtype: bf16``: every hidden state and gradient crosses as bf16 (the client's h_A rounded once), a
    training message has half the fp32 payload, and the losses stay within bf16 rounding of the fp32 wire's."""
    runs = {}
    for wire in ("fp32", "bf16"):
        cfg = _cfg(tiny4_path, wire_dtype=wire)
        loaded, peft_model, _, _ = _load(cfg)
        system = _system(cfg, loaded, peft_model, ids=("a",))
        (batch, counts), = _batches(cfg, loaded, sizes=(4,))
        client = system.clients[0]
        losses = [client.train_step(batch, counts, step)["loss"] for step in (1, 2, 3)]
        first = next(r for r in system.transport.received if r.kind == "forward")
        runs[wire] = (losses, system.transport.bytes_of("a"), system.transport.received, system.transport.replies,
                      first.tensors["hidden"])
    (l32, b32, *_), (l16, b16, received, replies, sent) = runs["fp32"], runs["bf16"]
    for r in received + replies:
        for name, t in r.tensors.items():
            if name != "counts":
                assert t.dtype == torch.bfloat16, (r.kind, name, t.dtype)
    first32 = runs["fp32"][4]
    assert first32.dtype == torch.float32
    torch.testing.assert_close(sent, first32.to(torch.bfloat16), rtol=0, atol=0)  # rounded once, nothing else
    for kind in ("forward", "backward"):
        for way in ("up", "down"):
            payload32 = b32[kind][way]
            assert b16[kind][way] < 0.52 * payload32, (kind, way, b16[kind][way], payload32)
    assert all(math.isfinite(x) for x in l16)
    assert l16[0] == pytest.approx(l32[0], abs=1e-2) and l16[-1] == pytest.approx(l32[-1], abs=5e-2)
    assert l16 != l32  # the wire really rounded


# --- 3. noise --------------------------------------------------------------------------------------------

def _clean_front(client, ids, counts):
    with torch.no_grad():
        client.activate(train=False)
        return client.seam.front(ids, counts)


def test_relative_noise_is_calibrated_and_the_gradient_goes_to_the_clean_hidden_state(tiny4_path):
    from fedguard.model.blocks import padding_mask_from_counts

    r = 0.5
    cfg = _cfg(tiny4_path, noise={"mode": "relative", "scale": r})
    loaded, peft_model, _, _ = _load(cfg)
    system = _system(cfg, loaded, peft_model, ids=("a",))
    client = system.clients[0]
    client.keep_gradients = True
    batch, counts = _batches(cfg, loaded, sizes=(4,))[0]
    clean = _clean_front(client, batch.input_ids, counts)
    before = {k: p.detach().clone() for k, p in client.banks[0].params("a").items()}

    m = client.train_step(batch, counts, step=1)
    valid = padding_mask_from_counts(counts, clean.shape[1])
    mean_h = float(clean[valid].abs().mean())
    assert m["mean_abs_h"] == pytest.approx(mean_h, rel=1e-6)
    assert m["noise_sigma"] == pytest.approx(r * mean_h * math.sqrt(math.pi / 2), rel=1e-9)
    assert m["mean_abs_noise"] / m["mean_abs_h"] == pytest.approx(r, rel=0.03)
    sent = next(x for x in system.transport.received if x.kind == "forward").tensors["hidden"]
    noise = sent - clean
    assert float(noise.abs().mean()) == pytest.approx(m["mean_abs_noise"], rel=1e-5)
    assert float(noise.abs().mean()) / mean_h == pytest.approx(r, rel=0.03)
    assert abs(float(noise.mean())) < 0.05 * float(noise.std())

    # straight-through: A's gradient is the server's g_A back-propagated through the clean forward
    g_a = next(x for x in system.transport.replies if x.kind == "backward").tensors["grad"]
    params = client.banks[0].params("a")
    with torch.no_grad():
        snapshot = {k: p.detach().clone() for k, p in params.items()}
        for k, p in params.items():
            p.copy_(before[k])
    client.activate(train=True)
    h = client.seam.front(batch.input_ids, counts)
    expected = torch.autograd.grad(h, list(params.values()), grad_outputs=g_a)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(snapshot[k])
    for (k, _), e in zip(params.items(), expected):
        torch.testing.assert_close(client.last_gradients[f"front:{k}"], e, rtol=1e-5, atol=1e-8, msg=k)
    assert any(e.abs().max() > 0 for e in expected)

    # no noise outside training: an evaluation forward sends the clean state
    system.transport.clear_records()
    client.evaluate([(batch, counts)])
    sent_eval = system.transport.received[0].tensors["hidden"]
    torch.testing.assert_close(sent_eval, _clean_front(client, batch.input_ids, counts), rtol=0, atol=0)


def test_absolute_noise_and_gradient_clipping(tiny4_path):
    cfg = _cfg(tiny4_path, noise={"mode": "absolute", "scale": 0.2}, grad_noise={"clip": 1e-3, "std": 0.0})
    loaded, peft_model, _, _ = _load(cfg)
    system = _system(cfg, loaded, peft_model, ids=("a",))
    batch, counts = _batches(cfg, loaded, sizes=(4,))[0]
    m = system.clients[0].train_step(batch, counts, step=1)
    assert m["mean_abs_noise"] == pytest.approx(0.2, rel=0.03)
    assert m["noise_sigma"] == pytest.approx(0.2 * math.sqrt(math.pi / 2))
    g_b = next(x for x in system.transport.received if x.kind == "backward").tensors["grad"]
    assert float(g_b.flatten(1).norm(dim=1).max()) <= 1e-3 * (1 + 1e-5)


# --- 4. protocol validation -----------------------------------------------------------------------------

def test_malformed_requests_are_refused_and_the_server_keeps_serving(tiny4_path):
    cfg = _cfg(tiny4_path)
    loaded, peft_model, _, _ = _load(cfg)
    system = _system(cfg, loaded, peft_model)
    t, (a, b) = system.transport, system.clients
    (batch, counts), (batch_b, counts_b) = _batches(cfg, loaded)
    B, T, H = batch.input_ids.shape[0], batch.input_ids.shape[1], loaded.model.config.hidden_size
    ok = torch.randn(B, T, H)

    def forward(**tensors):
        return t.call("forward", "a", {"hidden": ok, "counts": counts, **tensors}, {"step": 1, "train": True})

    with pytest.raises(ProtocolError, match=rf"forward from 'a': tensor 'hidden' must have shape \[B, T, {H}\]"):
        forward(hidden=torch.randn(B, T, H + 1))
    with pytest.raises(ProtocolError, match="tensor 'hidden' must have dtype float32.*got float16"):
        forward(hidden=ok.half())
    with pytest.raises(ProtocolError, match="tensor 'counts' must have dtype int64"):
        forward(counts=counts.float())
    with pytest.raises(ProtocolError, match=r"tensor 'counts' must have shape \[" + str(B)):
        forward(counts=counts[:-1])
    with pytest.raises(ProtocolError, match="every count must lie in"):
        forward(counts=counts + T)
    with pytest.raises(ProtocolError, match="non-finite"):
        forward(hidden=ok.clone().index_fill_(0, torch.tensor([0]), float("nan")))
    with pytest.raises(ProtocolError, match=r"expected tensors \['counts', 'hidden'\]"):
        forward(input_ids=batch.input_ids)
    with pytest.raises(ProtocolError, match="no training forward of step 1"):
        t.call("backward", "a", {"grad": ok}, {"step": 1})
    with pytest.raises(ProtocolError, match="has not completed the hello"):
        t.call("forward", "stranger", {"hidden": ok, "counts": counts}, {"step": 1})
    with pytest.raises(ProtocolError, match="unknown message kind"):
        t.call("logits", "a", {}, {})
    with pytest.raises(ProtocolError, match="no prefill"):
        t.call("decode", "a", {"hidden": ok[:, :1]}, {})
    t.max_message_bytes = 1000
    with pytest.raises(ProtocolError, match="exceeds the transport's limit"):
        forward()
    t.max_message_bytes = None

    # a forward whose backward has the wrong shape: refused, and the pending step survives it
    forward()
    with pytest.raises(ProtocolError, match=r"tensor 'grad' must have shape"):
        t.call("backward", "a", {"grad": ok[:, :-1]}, {"step": 1})
    t.call("backward", "a", {"grad": torch.zeros_like(ok)}, {"step": 1})

    # the server keeps serving: another client, and the refused one, train normally
    assert math.isfinite(b.train_step(batch_b, counts_b, step=1)["loss"])
    assert math.isfinite(a.train_step(batch, counts, step=2)["loss"])


def test_hello_with_other_settings_is_refused_by_name(tiny4_path):
    from fedguard.split.train import build_split_system

    cfg = _cfg(tiny4_path)
    loaded, peft_model, _, _ = _load(cfg)
    system = _system(cfg, loaded, peft_model, ids=("a",))
    t, spec = system.transport, system.spec
    for field, value, pattern in [("k_a", 2, r"k_a differs: client 2, server 1"),
                                  ("protocol_version", 9, "protocol_version differs"),
                                  ("wire_dtype", "bfloat16", "wire_dtype differs")]:
        with pytest.raises(ProtocolError, match=pattern):
            t.call("hello", "x", {}, {"spec": {**spec, field: value}})
    with pytest.raises(ProtocolError, match=r"lora\.r differs"):
        t.call("hello", "x", {}, {"spec": {**spec, "lora": {**spec["lora"], "r": 8}}})
    with pytest.raises(ProtocolError, match=r"model\.weights_sha256_16 differs"):
        t.call("hello", "x", {}, {"spec": {**spec, "model": {**spec["model"], "weights_sha256_16": "0" * 16}}})
    assert "x" not in system.server.clients

    # a client built with another k_c against this server (one process, so the server is reached directly)
    other = build_split_system(_cfg(tiny4_path, k_c=2), loaded, peft_model, client_ids=["y"]).clients[0]
    other.transport = t
    with pytest.raises(ProtocolError, match="k_c differs: client 2, server 1"):
        other.hello()


def test_config_fields_are_validated_by_name(tiny4_path):
    from fedguard.config import ConfigError
    from fedguard.split.train import build_split_system

    with pytest.raises(ConfigError, match="split.k_a"):
        _cfg(tiny4_path, k_a=0)
    with pytest.raises(ConfigError, match="split.noise.mode"):
        _cfg(tiny4_path, noise={"mode": "loud"})
    with pytest.raises(ConfigError, match="split: .*aggregate_every is only used with aggregate_clients"):
        _cfg(tiny4_path, aggregate_every=2)
    cfg = _cfg(tiny4_path, k_a=2, k_c=2)
    loaded, peft_model, _, _ = _load(cfg, nonzero=False)
    with pytest.raises(ConfigError, match=r"split\.k_a \+ split\.k_c must be < the model's 4"):
        build_split_system(cfg, loaded, peft_model)


# --- 5. collaborative generation ----------------------------------------------------------------------------

PROMPTS = ["How do I bake bread at home?", "Name three colours.", "Explain what a compiler does, briefly and simply."]


def test_collaborative_generation_equals_greedy_generate(tiny4_path):
    from fedguard.split.generate import collaborative_greedy

    cfg = _cfg(tiny4_path, k_a=1, k_c=1)
    loaded, peft_model, _, _ = _load(cfg, sharpen=True)
    system = _system(cfg, loaded, peft_model, ids=("a",))
    tok = loaded.tokenizer
    seqs = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    counts = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(counts.max())), tok.pad_token_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    new = 10
    system.transport.clear_records()
    split = collaborative_greedy(system.clients[0], ids, counts, max_new_tokens=new, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
    peft_model.eval()
    for row, n in enumerate(counts.tolist()):
        with torch.no_grad():
            gen = peft_model.generate(input_ids=ids[row:row + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long),
                                      max_new_tokens=new, do_sample=False, temperature=None, top_p=None, top_k=None,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, n:]
        assert split[row, :len(gen)].tolist() == gen.tolist(), f"prompt {row}"
    assert any(len(set(r)) > 3 for r in split.tolist())  # a path that varies

    received, replies = system.transport.received, system.transport.replies
    assert [r.kind for r in received].count("prefill") == 1 and received[-1].kind == "end"
    decodes = [r for r in received if r.kind == "decode"]
    assert len(decodes) == split.shape[1] - 1
    H = loaded.model.config.hidden_size
    for r in decodes + [x for x in replies if x.kind == "decode"]:
        assert list(r.tensors) == ["hidden"] and r.tensors["hidden"].shape == (len(PROMPTS), 1, H)
    sizes = {r.nbytes for r in decodes}
    assert len(sizes) == 1 and sizes.pop() < received[0].nbytes / 4  # one position each way, far below prefill
    assert "a" not in system.server.caches  # dropped at end


def test_split_evaluation_is_the_unsplit_evaluation(tiny4_path):
    """``evaluate_client`` (the safety and utility evaluation decoded through the server) answers every harmful,
    over-refusal and benign prompt with the tokens fedguard's unsplit Evaluator gets from the same weights, so
    the rates are the same; nothing but hidden states crossed for it."""
    from fedguard.data.federation import build_eval_data
    from fedguard.evaluation.evaluator import Evaluator
    from fedguard.split.generate import evaluate_client

    cfg = _cfg(tiny4_path, k_a=1, k_c=1)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "harmful_prompts": 5, "overrefusal_prompts": 3, "benign_prompts": 5, "max_new_tokens": 8,
        "answer_max_new_tokens": 6, "batch_size": 3})})
    loaded, peft_model, slot, theta = _load(cfg, sharpen=True)
    system = _system(cfg, loaded, peft_model, ids=("a",))
    system.transport.clear_records()
    split = evaluate_client(cfg, loaded, system.clients[0], samples=100)
    kinds = {r.kind for r in system.transport.received}
    assert kinds == {"prefill", "decode", "end"}
    for bank in (*system.banks, system.server.lora):
        bank.restore()
    data = build_eval_data(cfg, loaded.tokenizer)
    data.loss_examples = []
    unsplit = Evaluator(loaded, peft_model, slot, None, data, cfg.eval, cfg.data.system_prompt).evaluate(
        theta, samples=100)
    assert split["harmful_n"] == unsplit["harmful_n"] == 5 and split["overrefusal_n"] == 3
    for key in ("harmful_samples", "overrefusal_samples", "benign_samples"):
        assert [x["response"] for x in split[key]] == [x["response"] for x in unsplit[key]], key
    assert any(len(set(x["response"].split())) > 2 for x in split["harmful_samples"])  # answers that vary
    for key in ("refusal_rate", "compliance_rate", "overrefusal_rate", "exact_match"):
        assert split[key] == unsplit[key], key


# --- 6. batch-parallel gradients; exact client aggregation ---------------------------------------------------

def _bp_run(cfg_path, mode, ids):
    cfg = _cfg(cfg_path, mode=mode)
    loaded, peft_model, _, _ = _load(cfg)
    system = _system(cfg, loaded, peft_model, ids=ids)
    system.server.keep_gradients = True
    batches = dict(zip(("a", "b"), _batches(cfg, loaded)))
    clients = {c.id: c for c in system.clients}
    errors = []

    def run(cid):
        try:
            clients[cid].train_step(*batches[cid], step=1)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(cid,)) for cid in ids]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    replies = {r.client_id: r.tensors["hidden"] for r in system.transport.replies if r.kind == "forward"}
    return system.server.last_gradients["server"], system.server.steps_done, replies, batches


def test_batch_parallel_gradient_is_the_sum_of_sequential_gradients(tiny4_path):
    g_a, steps_a, h_a, batches = _bp_run(tiny4_path, "sequential", ("a",))
    g_b, _, h_b, _ = _bp_run(tiny4_path, "sequential", ("b",))
    g_ab, steps_ab, h_ab, _ = _bp_run(tiny4_path, "batch_parallel", ("a", "b"))
    assert batches["a"][0].input_ids.shape[1] != batches["b"][0].input_ids.shape[1]  # padded to the longer T
    assert steps_a == 1 and steps_ab == 1  # one forward, one backward, one optimizer step for the group
    for cid, h in (("a", h_a["a"]), ("b", h_b["b"])):
        assert h_ab[cid].shape == h.shape
        torch.testing.assert_close(h_ab[cid], h, rtol=1e-5, atol=1e-5)
    assert set(g_ab) == set(g_a) == set(g_b)
    for k in g_ab:
        assert g_a[k].abs().max() > 0 and g_b[k].abs().max() > 0, k
        torch.testing.assert_close(g_ab[k], g_a[k] + g_b[k], rtol=1e-5, atol=1e-7, msg=k)


def test_client_aggregation_is_the_exact_mean_of_products(tiny4_path):
    from fedguard.federated.lora_exact import lora_scaling
    from fedguard.model.keys import a_key, b_key
    from fedguard.split.train import aggregate_client_parts

    cfg = _cfg(tiny4_path)
    loaded, peft_model, _, _ = _load(cfg)
    system = _system(cfg, loaded, peft_model, weights=[1.0, 3.0])
    a, b = system.clients
    g = torch.Generator().manual_seed(5)
    for c in (a, b):
        for bank in c.banks:
            bank.load(c.id, {k: 0.5 * torch.randn(t.shape, generator=g) for k, t in bank.state(c.id).items()})
    states = [a.adapter_state(), b.adapter_state()]
    modules = system.banks[0].modules() + system.banks[1].modules()
    bases = {m: bank.base_weight(m).detach().clone() for bank in system.banks for m in bank.modules()}
    s = lora_scaling(cfg.lora.alpha, cfg.lora.r)

    delta = aggregate_client_parts(system.clients, reinit_seed=3)
    assert sorted(delta) == sorted(modules) and len(modules) == 4  # q and v of layers 0 and 3
    for m in modules:
        prods = [s * st[b_key(m)].double() @ st[a_key(m)].double() for st in states]
        exact = 0.25 * prods[0] + 0.75 * prods[1]
        torch.testing.assert_close(delta[m], exact, rtol=1e-12, atol=1e-12)
        naive = s * (0.25 * states[0][b_key(m)] + 0.75 * states[1][b_key(m)]).double() @ \
            (0.25 * states[0][a_key(m)] + 0.75 * states[1][a_key(m)]).double()
        assert float((naive - exact).norm()) > 0.1 * float(exact.norm())  # separate A/B averaging is not it
        bank = next(bk for bk in system.banks if m in bk.layers)
        torch.testing.assert_close(bank.base_weight(m).double(), bases[m].double() + exact, rtol=0, atol=1e-6)
        for c in system.clients:  # a fresh adapter: the effective weight is the mean
            assert c.adapter_state()[b_key(m)].abs().max() == 0


# --- 7. the CLI ------------------------------------------------------------------------------------------------

def test_cli_split_train_and_generate(tiny4_path, tmp_path, capsys):
    import yaml

    from fedguard.cli import main
    from fedguard.io import load_tensors, read_ndjson

    cfg = _cfg(tiny4_path, mode="hierarchical", steps=4, average_every=2, aggregate_clients=True, aggregate_every=2,
               noise={"mode": "relative", "scale": 0.3}, eval_examples=4, evaluate=True,
               train={"lr": 5e-3, "max_grad_norm": 1.0})
    path = tmp_path / "split-tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_dir = tmp_path / "run"
    assert main(["split", "train", str(path), "--run-dir", str(run_dir), "--quiet"]) == 0
    assert "run directory" in capsys.readouterr().out

    records = read_ndjson(run_dir / "metrics.ndjson")
    steps = [r for r in records if "step" in r]
    assert len(steps) == 2 * 4 and {r["client"] for r in steps} == {"0", "1"}
    for r in steps:
        assert math.isfinite(r["loss"]) and r["mean_abs_noise"] > 0
        assert set(r["bytes"]) == {"forward", "backward"} and all(v["up"] > 0 for v in r["bytes"].values())
    assert [r["after_step"] for r in records if r.get("event") == "aggregate"] == [2, 4]
    assert len([r for r in records if r.get("event") == "eval"]) == 4
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["mode"] == "hierarchical" and final["client_steps"] == 8 and final["server_optimizer_steps"] == 8
    assert set(final["bytes"]) >= {"hello", "forward", "backward", "prefill", "decode"} and final["bytes_total"] > 0
    # split.evaluate after aggregation: one safety and utility evaluation stands for both clients
    assert list(final["evaluation"]) == ["0"] and final["evaluation_shared_by_all_clients"] is True
    ev = final["evaluation"]["0"]
    assert ev["harmful_n"] == cfg.eval.harmful_prompts and 0 <= ev["refusal_rate"] <= 100 and "exact_match" in ev
    assert [(r["when"], r["client"]) for r in records if r.get("event") == "evaluation"] == [("before", "0"),
                                                                                              ("after", "0")]
    assert final["evaluation_before"]["harmful_n"] == ev["harmful_n"]
    adapters = run_dir / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["adapters.json", "client-0.safetensors",
                                                          "client-1.safetensors", "client-parts-delta.safetensors",
                                                          "server.safetensors"]
    server = load_tensors(adapters / "server.safetensors")
    assert server and all(".layers.1." in k or ".layers.2." in k for k in server)
    client = load_tensors(adapters / "client-0.safetensors")
    assert client and all(".layers.0." in k or ".layers.3." in k for k in client)
    assert (run_dir / "config.yaml").is_file() and not list(run_dir.glob(".*"))  # nothing half-written left

    assert main(["split", "generate", str(path), "--prompt", "Name three colours.", "--adapters", str(adapters),
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "> Name three colours." in out and "decode" in out and "prefill" in out


def test_message_kinds_are_the_contract():
    assert KINDS == ("hello", "forward", "backward", "prefill", "decode", "end", "aggregate")
