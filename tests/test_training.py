import torch

from conftest import tiny_config
from fedguard.data.federation import ClientData, build_client_data
from fedguard.data.schema import Example, chat
from fedguard.data.tokenize import collate, tokenize_example
from fedguard.federated.client import LocalTrainer
from fedguard.model.loss import CompletionLoss, fused_head
from fedguard.messages import RoundConfig
from fedguard.model.lora import initial_adapter_state


def _rc(round_=1, lr=1e-2, steps=3, seed=1):
    return RoundConfig(server_round=round_, lr=lr, local_steps=steps, batch_size=4, grad_accum=1, seed=seed,
                       max_grad_norm=1.0)


def test_completion_loss_equals_the_full_forward_with_masked_labels(tiny_loaded):
    loaded, peft_model, slot = tiny_loaded
    tok = loaded.tokenizer
    exs = [tokenize_example(tok, Example(chat(q, a)), 128) for q, a in
           [("What is 3 + 4?", "3 + 4 = 7"), ("Name a colour.", "Blue is a colour."), ("Hi", "Hello!")]]
    batch = collate(exs, tok.pad_token_id)
    peft_model.eval()
    with torch.no_grad():
        loss_sum, n = CompletionLoss(loaded, peft_model)(batch)
        labels = torch.full_like(batch.input_ids, -100)
        for (row, pos), target in zip(batch.target_positions.tolist(), batch.targets.tolist()):
            labels[row, pos + 1] = target
        mask = torch.zeros_like(batch.input_ids)
        for i, e in enumerate(exs):
            mask[i, : len(e.input_ids)] = 1
        reference = peft_model(input_ids=batch.input_ids, attention_mask=mask, labels=labels).loss
    assert n == sum(e.completion_len for e in exs)
    assert torch.allclose(loss_sum / n, reference, atol=1e-5)


def test_local_training_lowers_the_loss_and_only_touches_the_adapter(tiny_loaded):
    loaded, peft_model, slot = tiny_loaded
    tok = loaded.tokenizer
    data = ClientData(0, [tokenize_example(tok, Example(chat("Say the code.", "The code is 7312.")), 64)] * 8)
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    trainer = LocalTrainer(loaded, peft_model, slot)
    theta0 = initial_adapter_state(slot.shapes(), 5)
    update = trainer.train(theta0, _rc(lr=3e-2, steps=30), data)
    assert update.metrics["train_loss_last"] < 0.93 * update.metrics["train_loss_first"]
    assert set(update.tensors) == set(theta0) and update.num_examples == 8
    assert any(not torch.equal(update.tensors[k], theta0[k]) for k in theta0)
    for n, p in peft_model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


def test_clients_are_simulated_on_one_model_and_are_reproducible(tiny_loaded):
    loaded, peft_model, slot = tiny_loaded
    cfg = tiny_config()
    clients = build_client_data(cfg, loaded.tokenizer)
    trainer = LocalTrainer(loaded, peft_model, slot)
    theta0 = initial_adapter_state(slot.shapes(), 5)
    a = trainer.train(theta0, _rc(), clients[0])
    b = trainer.train(theta0, _rc(), clients[1])
    a_again = trainer.train(theta0, _rc(), clients[0])  # after another client ran on the same model
    assert all(torch.equal(a.tensors[k], a_again.tensors[k]) for k in theta0)
    assert any(not torch.equal(a.tensors[k], b.tensors[k]) for k in theta0)
    c = trainer.train(theta0, _rc(round_=2), clients[0])  # another round draws other batches
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in theta0)


def test_optimizer_state_kept_per_client(tiny_loaded):
    loaded, peft_model, slot = tiny_loaded
    clients = build_client_data(tiny_config(), loaded.tokenizer)
    theta0 = initial_adapter_state(slot.shapes(), 5)
    keep = LocalTrainer(loaded, peft_model, slot, keep_optimizer_state=True)
    reset = LocalTrainer(loaded, peft_model, slot, keep_optimizer_state=False)
    for t in (keep, reset):
        t.train(theta0, _rc(round_=1), clients[0])
    assert set(keep.client_optimizer_states) == {"0"} and not reset.client_optimizer_states
    k2 = keep.train(theta0, _rc(round_=2), clients[0])
    r2 = reset.train(theta0, _rc(round_=2), clients[0])
    assert any(not torch.equal(k2.tensors[k], r2.tensors[k]) for k in theta0)


def test_lora_init_depends_only_on_the_seed(tiny_loaded):
    _, _, slot = tiny_loaded
    a, b, c = (initial_adapter_state(slot.shapes(), s) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(float(v.abs().sum()) == 0 for k, v in a.items() if ".lora_B." in k)


def test_lora_dropout_is_the_fast_seeded_inverted_dropout():
    from fedguard.config import LoraSettings, ModelConfig
    from fedguard.model import attach_lora, load_base_model
    from fedguard.model.lora import FastDropout

    loaded = load_base_model(ModelConfig(name_or_path="tiny-llama", precision="fp32"))
    peft_model, _ = attach_lora(loaded.model, LoraSettings(r=2, alpha=4, dropout=0.1))
    drops = [m for m in peft_model.modules() if isinstance(m, FastDropout)]
    assert len(drops) == 2 * loaded.model.config.num_hidden_layers  # q_proj and v_proj of every layer
    d = drops[0].train()
    x = torch.ones(400, 500)
    torch.manual_seed(1)
    a = d(x)
    torch.manual_seed(1)
    assert torch.equal(a, d(x))  # seeded like nn.Dropout
    assert abs(float((a == 0).float().mean()) - 0.1) < 0.005
    assert abs(float(a.mean()) - 1.0) < 0.01  # inverted scaling keeps the expectation
    assert torch.equal(d.eval()(x), x)


def test_fused_head_loss_gives_the_reference_gradients(tiny_loaded):
    loaded, peft_model, slot = tiny_loaded
    tok = loaded.tokenizer
    slot.load(initial_adapter_state(slot.shapes(), 9))
    with torch.no_grad():  # a non-zero B so that every LoRA parameter gets a gradient
        for k, p in slot.named_parameters().items():
            if ".lora_B." in k:
                p.normal_(0, 0.1)
    exs = [tokenize_example(tok, Example(chat(q, a)), 128) for q, a in
           [("What is 3 + 4?", "3 + 4 = 7"), ("Name a colour.", "Blue is a colour.")]]
    batch = collate(exs, tok.pad_token_id)
    peft_model.eval()
    loss_fn = CompletionLoss(loaded, peft_model)
    assert fused_head(loss_fn.head)
    CompletionLoss.CHUNK, chunk = 5, CompletionLoss.CHUNK  # several chunks, one of them partial
    try:
        fused, n = loss_fn(batch)
    finally:
        CompletionLoss.CHUNK = chunk
    (fused / n).backward()
    got = {k: p.grad.clone() for k, p in slot.named_parameters().items()}
    peft_model.zero_grad(set_to_none=True)
    labels = torch.full_like(batch.input_ids, -100)
    for (row, pos), target in zip(batch.target_positions.tolist(), batch.targets.tolist()):
        labels[row, pos + 1] = target
    reference = peft_model(input_ids=batch.input_ids, labels=labels).loss
    reference.backward()
    assert torch.allclose(fused / n, reference.detach(), atol=1e-5)
    for k, p in slot.named_parameters().items():
        assert torch.allclose(got[k], p.grad, rtol=1e-4, atol=1e-6), k
    peft_model.zero_grad(set_to_none=True)
