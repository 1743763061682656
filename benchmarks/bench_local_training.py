"""Local training round time: fedguard's resident LocalTrainer vs an HF Trainer built per client per round.

Setting (the issue's): SmolLM2-135M-Instruct, LoRA r=8 alpha=16 dropout 0.05 on q_proj/v_proj,
4 clients x 5 local steps x batch 4 x 256 tokens, the same data for every method. The baseline is the
pattern of OpenFedLLM / Safe-FedLLM / FlowerTune: one resident PEFT model, a new transformers.Trainer
per client per round, full-vocabulary logits and loss on masked labels. Also measured: the fraction
of this machine's bf16 matmul peak that fedguard's training step achieves (peak measured in this run).

    .venv/bin/python benchmarks/bench_local_training.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import _common  # noqa: F401  (sets paths)
import torch

CLIENTS, STEPS, BATCH, SEQ = 4, 5, 4, 256


def fedguard_round(clients_data, precision: str) -> tuple[float, float]:
    from fedguard.config import LoraSettings, ModelConfig
    from fedguard.data.federation import ClientData
    from fedguard.federated.client import LocalTrainer
    from fedguard.messages import RoundConfig
    from fedguard.model import attach_lora, load_base_model
    from fedguard.model.lora import initial_adapter_state

    loaded = load_base_model(ModelConfig(name_or_path="smollm2-135m-instruct", precision=precision))
    peft_model, slot = attach_lora(loaded.model, LoraSettings())
    trainer = LocalTrainer(loaded, peft_model, slot)
    theta0 = initial_adapter_state(slot.shapes(), 2023)
    rc = RoundConfig(server_round=1, lr=5e-5, local_steps=STEPS, batch_size=BATCH, grad_accum=1, seed=0,
                     max_grad_norm=1.0)
    warm = RoundConfig(**{**rc.to_dict(), "local_steps": 1})
    trainer.train(theta0, warm, ClientData(0, clients_data[0]))
    t = time.perf_counter()
    for cid, data in enumerate(clients_data):
        trainer.train(theta0, rc, ClientData(cid, data))
    seconds = time.perf_counter() - t

    # FLOPs of one training step (forward + backward), counted by torch.
    from torch.utils.flop_counter import FlopCounterMode

    from fedguard.data.tokenize import collate

    batch = collate(clients_data[0][:BATCH], loaded.tokenizer.pad_token_id)
    counter = FlopCounterMode(display=False)
    peft_model.train()
    with counter:
        loss, n = trainer.loss(batch)
        (loss / n).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return seconds, counter.get_total_flops()


def trainer_round(clients_data, bf16: bool, checkpointing: bool) -> float:
    from transformers import Trainer, TrainingArguments

    from fedguard.config import LoraSettings, ModelConfig
    from fedguard.model import attach_lora, load_base_model
    from fedguard.model.lora import initial_adapter_state

    loaded = load_base_model(ModelConfig(name_or_path="smollm2-135m-instruct", precision="fp32",
                                         attn_implementation="sdpa"))
    if checkpointing:  # what prepare_model_for_kbit_training sets up in the reference code
        loaded.model.enable_input_require_grads()
    peft_model, slot = attach_lora(loaded.model, LoraSettings())
    theta0 = initial_adapter_state(slot.shapes(), 2023)
    pad = loaded.tokenizer.pad_token_id

    class Rows(torch.utils.data.Dataset):
        def __init__(self, exs):
            self.exs = exs

        def __len__(self):
            return len(self.exs)

        def __getitem__(self, i):
            e = self.exs[i]
            ids = torch.tensor(e.input_ids)
            labels = ids.clone()
            labels[: e.prompt_len] = -100  # completion-only, as DataCollatorForCompletionOnlyLM
            return {"input_ids": ids, "labels": labels}

    def collate(rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad)
        labels = torch.full((len(rows), n), -100)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = r["input_ids"], r["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def one_client(data, steps, out):
        slot.load(theta0)  # set_peft_model_state_dict(global) in the reference code
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=5e-5,
            lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1000, save_strategy="no",
            report_to=[], use_cpu=True, bf16=bf16, dataloader_num_workers=0, remove_unused_columns=False,
            disable_tqdm=True, seed=0, gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        )
        Trainer(model=peft_model, args=args, train_dataset=Rows(data), data_collator=collate).train()

    with tempfile.TemporaryDirectory() as out:
        one_client(clients_data[0], 1, out)  # warm-up
        t = time.perf_counter()
        for data in clients_data:
            one_client(data, STEPS, out)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the reference-code baseline and fedguard bf16")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from fedguard.model.registry import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    data = _common.long_examples(tok, CLIENTS * STEPS * BATCH, SEQ)
    clients_data = [data[i * STEPS * BATCH: (i + 1) * STEPS * BATCH] for i in range(CLIENTS)]
    completion_share = sum(e.completion_len for e in data) / sum(len(e.input_ids) for e in data)
    print(f"setting: {CLIENTS} clients x {STEPS} steps x batch {BATCH} x {SEQ} tokens "
          f"(completion share {completion_share:.0%}), threads={torch.get_num_threads()}")

    peak = _common.matmul_peak_gflops()
    ours, flops_per_step = fedguard_round(clients_data, "bf16")
    ours_fp32 = None if args.quick else fedguard_round(clients_data, "fp32")[0]
    reference = trainer_round(clients_data, bf16=False, checkpointing=True)
    base_fp32 = None if args.quick else trainer_round(clients_data, bf16=False, checkpointing=False)
    base_bf16 = None if args.quick else trainer_round(clients_data, bf16=True, checkpointing=False)
    peak = max(peak, _common.matmul_peak_gflops())
    achieved = flops_per_step * CLIENTS * STEPS / ours / 1e9

    res = {
        "fedguard_bf16_s": ours, "fedguard_fp32_s": ours_fp32, "trainer_reference_s": reference,
        "trainer_fp32_s": base_fp32, "trainer_bf16_s": base_bf16,
        "gflop_per_step": flops_per_step / 1e9, "achieved_gflops": achieved, "bf16_peak_gflops": peak,
    }
    print(f"\n{'method (one round, ' + str(CLIENTS) + ' clients)':<62}{'seconds':>9}{'speed-up':>10}")
    rows = (("HF Trainer per client per round, fp32 + grad. checkpointing", reference),
            ("HF Trainer per client per round, fp32", base_fp32),
            ("HF Trainer per client per round, bf16 autocast", base_bf16),
            ("fedguard LocalTrainer, fp32", ours_fp32), ("fedguard LocalTrainer, bf16", ours))
    for name, s in rows:
        if s is not None:
            print(f"{name:<62}{s:>9.1f}{reference / s:>9.2f}x")
    print(f"\nspeed-up vs the reference code's setting (Trainer per client, fp32, gradient checkpointing): "
          f"{reference / ours:.2f}x (target >= 3x)")
    for name, s in (("Trainer fp32 without checkpointing", base_fp32), ("Trainer bf16 autocast", base_bf16)):
        if s is not None:
            print(f"speed-up vs {name}: {s / ours:.2f}x")
    print(f"training step: {flops_per_step / 1e9:.0f} GFLOP (torch FlopCounterMode); achieved {achieved:.0f} GFLOP/s "
          f"= {achieved / peak:.0%} of the measured bf16 matmul peak {peak:.0f} GFLOP/s (target >= 50%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
