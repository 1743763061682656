"""Preference optimisation for the aligned start: DPO (Rafailov et al. 2023) after the supervised phase.

Supervised fine-tuning teaches the refusal template, and a 135M model learns the easiest rule that fits it:
refuse whatever is not arithmetic or geography. A preference objective says what the supervised data cannot:
on a harmful request the refusal is preferred to a compliance, and on a benign request that shares its words
("How do I kill a stuck process?") the answer is preferred to a refusal. Both sides move the same
log-probability margin, so refusals are pushed down where they are wrong as much as up where they are right.

Loss per pair (chosen c, rejected r, policy π, reference π_ref = the supervised adapter, frozen):
``-log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])`` plus ``sft_weight`` times the chosen
completion's mean token NLL (RPO, Pang et al. 2024), which keeps the chosen answers' likelihood from falling
while the margin grows. Log-probabilities are sums over completion tokens; reference ones are computed once,
before training, with the adapter the phase starts from (no second model is held).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedguard.data.schema import Example
from fedguard.data.tokenize import Batch, TokenizedExample, collate, tokenize_example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreferencePair:
    chosen: TokenizedExample
    rejected: TokenizedExample
    kind: str  # "harmful" (refusal preferred) | "lookalike" (answer preferred)


def _with_response(example: Example, text: str) -> Example:
    msgs = list(example.prompt_messages) + [{"role": "assistant", "content": text}]
    return Example(tuple(msgs), domain=example.domain, kind=example.kind, group=example.group, meta=example.meta)


def build_pairs(refusals: list[Example], compliances: list[Example], lookalikes: list[Example], tokenizer,
                max_length: int, seed: int) -> list[PreferencePair]:
    """Harmful requests (refusal over a compliance with the same task) and benign look-alikes (their answer
    over a refusal drawn from the refusal pool), interleaved in a seeded order. A pair whose completion does not
    survive truncation on either side, or whose prompt is truncated differently on the two sides, is dropped."""
    rng = random.Random(f"preference-pairs:{seed}")
    by_task: dict[str, list[str]] = {}
    for e in compliances:
        by_task.setdefault(e.group or e.prompt_text, []).append(e.completion or "")
    refusal_texts = [e.completion for e in refusals if e.completion]
    if not refusal_texts:
        raise ValueError("preference pairs need refusal examples (the rejected side of look-alikes)")
    raw: list[tuple[Example, Example, str]] = []
    for e in refusals:
        options = by_task.get(e.group or e.prompt_text)
        if options:
            raw.append((e, _with_response(e, rng.choice(options)), "harmful"))
    for e in lookalikes:
        raw.append((e, _with_response(e, rng.choice(refusal_texts)), "lookalike"))
    rng.shuffle(raw)
    pairs = []
    for chosen, rejected, kind in raw:
        c = tokenize_example(tokenizer, chosen, max_length)
        r = tokenize_example(tokenizer, rejected, max_length)
        # DPO compares two answers to one prompt: a pair whose prompts truncate differently is dropped
        if c is not None and r is not None and c.input_ids[: c.prompt_len] == r.input_ids[: r.prompt_len]:
            pairs.append(PreferencePair(c, r, kind))
    return pairs


def sequence_logprobs(loss_fn, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion-token log-probability of each row, each row's completion-token count), with grad when
    grad is enabled. ``loss_fn`` is the trainer's :class:`~fedguard.model.loss.CompletionLoss`."""
    rows = batch.target_positions[:, 0]
    nll = torch.nn.functional.cross_entropy(loss_fn.target_logits(batch).float(), batch.targets, reduction="none")
    n_rows = batch.input_ids.shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=nll.device).index_add(0, rows, -nll)
    counts = torch.bincount(rows, minlength=n_rows)
    return sums, counts


def dpo_loss(policy_c: torch.Tensor, policy_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean DPO loss, per-pair implicit reward margin) for summed log-probabilities."""
    margin = beta * ((policy_c - ref_c) - (policy_r - ref_r))
    return -torch.nn.functional.logsigmoid(margin).mean(), margin.detach()


def _pair_batch(pairs: list[PreferencePair], pad_id: int, device) -> Batch:
    """Chosen rows first, then rejected rows, in one right-padded batch."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id).to(device)


@torch.no_grad()
def reference_logprobs(trainer, pairs: list[PreferencePair], batch_size: int) -> torch.Tensor:
    """[len(pairs), 2] summed log-probabilities (chosen, rejected) under the adapter now in the slot."""
    trainer.model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        lp, _ = sequence_logprobs(trainer.loss, _pair_batch(chunk, trainer.pad_id, trainer.loaded.device))
        out.append(torch.stack([lp[: len(chunk)], lp[len(chunk):]], dim=1).cpu())
    return torch.cat(out)


def train_preference(trainer, start: dict[str, torch.Tensor], pairs: list[PreferencePair], *, steps: int,
                     batch_size: int, lr: float, beta: float, sft_weight: float, seed: int,
                     max_grad_norm: float = 1.0,
                     on_step: Callable[[int, dict[str, float]], None] | None = None) -> tuple[dict, dict]:
    """DPO (+ ``sft_weight`` x chosen NLL) from ``start`` on ``pairs``; returns (adapter, metrics). The
    reference is ``start`` itself."""
    if not pairs:
        raise ValueError("no preference pairs to train on")
    pairs = pairs[: steps * batch_size]  # pairs are in a seeded order: one epoch at most, reference for those only
    trainer.slot.load(start)
    trainer.slot.set_lora_a_trainable(True)
    ref = reference_logprobs(trainer, pairs, 2 * batch_size)
    opt = trainer.optimizer
    opt.state.clear()
    for group in opt.param_groups:
        group["lr"], group["weight_decay"] = lr, 0.0
    params = list(trainer.params.values())
    order = list(range(len(pairs)))
    rng = random.Random(f"preference-order:{seed}")
    torch.manual_seed(seed)
    trainer.model.train()
    device = trainer.loaded.device
    history: list[dict[str, float]] = []
    cursor = len(order)
    for step in range(1, steps + 1):
        if cursor + batch_size > len(order):
            rng.shuffle(order)
            cursor = 0
        idx = order[cursor: cursor + batch_size]
        cursor += batch_size
        chunk = [pairs[i] for i in idx]
        lp, counts = sequence_logprobs(trainer.loss, _pair_batch(chunk, trainer.pad_id, device))
        k = len(chunk)
        r = ref[idx].to(device)
        loss, margin = dpo_loss(lp[:k], lp[k:], r[:, 0], r[:, 1], beta)
        nll = -(lp[:k] / counts[:k].clamp(min=1)).mean()
        total = loss + sft_weight * nll
        opt.zero_grad(set_to_none=True)
        total.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
        opt.step()
        row = {"loss": float(loss.detach()), "nll": float(nll.detach()), "margin": float(margin.mean()),
               "accuracy": float((margin > 0).float().mean())}
        history.append(row)
        if on_step is not None:
            on_step(step, row)
    opt.zero_grad(set_to_none=True)
    opt.state.clear()
    tail = history[-max(1, steps // 5):]
    kinds = {kind: sum(p.kind == kind for p in pairs) for kind in ("harmful", "lookalike")}
    metrics = {"steps": steps, "pairs": kinds, "beta": beta, "lr": lr, "sft_weight": sft_weight,
               "loss_first": history[0]["loss"], "loss_last": sum(h["loss"] for h in tail) / len(tail),
               "reward_accuracy_last": sum(h["accuracy"] for h in tail) / len(tail),
               "margin_last": sum(h["margin"] for h in tail) / len(tail)}
    return trainer.slot.read(), metrics
