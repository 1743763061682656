"""The completion loss: cross-entropy over the completion tokens only, from hidden states at those positions.

The LM head and cross-entropy run on a fraction of the tokens, and where the head is a plain frozen Linear they
are fused (``LinearCrossEntropy``) so no [positions, vocab] logits tensor is kept for backward. Training,
evaluation, the behaviour audit, alignment and split learning all measure with this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedguard.data.tokenize import Batch, TokenizedExample, collate
from fedguard.model.loading import LoadedModel


def _lora_input_casting_off(peft_model):
    """PEFT casts each LoRA input to the adapter's fp32 dtype; under autocast that is a wasted copy."""
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # older PEFT: nothing to switch off
        from contextlib import nullcontext

        return nullcontext()
    return disable_input_dtype_casting(peft_model)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, for a frozen ``weight``.

    The gradient with respect to ``hidden`` is computed during the forward pass, a chunk of rows at a
    time, so no [positions, vocab] logits tensor (100 MB at 512 positions x 49k vocab in fp32) is
    ever materialised or kept for backward: logits live only chunk by chunk in fp32, and backward is
    a single multiply. Numerically this is the usual path: bf16 logits, fp32 log-sum-exp.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, row_weights=None):
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            tgt = targets[start: start + chunk]
            rows = torch.arange(len(tgt), device=hidden.device)
            logits = (hidden[start: start + chunk] @ weight.t()).float()
            picked = logits[rows, tgt]
            # softmax and log-sum-exp in place: no further [chunk, vocab] allocations
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            norm = probs.sum(dim=-1, keepdim=True)
            losses = (peak + norm.log()).squeeze(-1) - picked
            probs.div_(norm)
            probs[rows, tgt] -= 1.0
            if row_weights is not None:  # a weighted sum of the rows' losses (per-example means)
                w = row_weights[start: start + chunk].float()
                losses = losses * w
                probs.mul_(w[:, None])
            total += losses.sum()
            grad[start: start + chunk] = probs.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def fused_head(head) -> bool:
    """Whether ``head_loss`` can fuse the head with the loss: a plain frozen Linear (no LoRA, no bias), with grad
    enabled (without grad there is no backward to save memory for)."""
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and torch.is_grad_enabled())


def head_loss(head, hidden: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets`` (rows weighted by ``row_weights``): fused
    with the head (``LinearCrossEntropy``) where ``fused_head`` allows, else logits then cross-entropy."""
    if fused_head(head):
        if hidden.dtype != head.weight.dtype:
            hidden = hidden.to(head.weight.dtype)
        return LinearCrossEntropy.apply(hidden, head.weight, targets, CompletionLoss.CHUNK, row_weights)
    losses = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")
    return losses.sum() if row_weights is None else (losses * row_weights).sum()


def mean_token_loss(losses: Iterable[tuple[torch.Tensor | float, int]]) -> float | None:
    """The mean completion-token loss of ``(summed loss, tokens)`` pairs; None when there are no tokens (an empty
    set has no loss, and every caller says what that means for it)."""
    total, count = 0.0, 0
    for loss, n in losses:
        total += float(loss)
        count += int(n)
    return total / count if count else None


def heldout_loss(loss_fn: CompletionLoss, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int,
                 device: torch.device | None = None) -> float | None:
    """The mean completion-token loss of ``examples`` under the model's current adapter, in eval mode and
    without grad (the model's train/eval mode restored); None for no examples."""
    if not examples:
        return None
    model = loss_fn.peft_model
    device = device if device is not None else loss_fn.loaded.device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return mean_token_loss(loss_fn(collate(examples[i: i + batch_size], pad_id).to(device))
                                   for i in range(0, len(examples), batch_size))
    finally:
        model.train(was_training)


class CompletionLoss:
    """Summed cross-entropy over completion tokens, computed from hidden states at those positions only: the one
    loss of training, evaluation, the behaviour audit, alignment and split learning."""

    CHUNK = 64

    def __init__(self, loaded: LoadedModel, peft_model):
        self.loaded = loaded
        self.peft_model = peft_model
        base = peft_model.get_base_model()
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()
        cfg = base.config
        # Models that post-process logits (soft-capping, scaling) go through their own forward.
        self.full_forward = bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))
        self.base = base

    def __call__(self, batch: Batch, per_example: bool = False) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy over the completion tokens, their count); ``per_example``: (the mean over the
        batch's examples of each example's mean token loss, the number of examples), DP-SGD's loss."""
        rows, cols = batch.target_positions[:, 0], batch.target_positions[:, 1]
        weights, count = None, int(batch.targets.numel())
        if per_example:
            examples = int(batch.input_ids.shape[0])
            per_row = torch.bincount(rows, minlength=examples).clamp(min=1)
            weights, count = 1.0 / (per_row[rows].float() * examples), examples
        with self.loaded.autocast(), _lora_input_casting_off(self.peft_model):
            if not self.full_forward and fused_head(self.head):
                hidden = self.decoder(input_ids=batch.input_ids).last_hidden_state[rows, cols]
                return head_loss(self.head, hidden, batch.targets, weights), count
            logits = self._logits(batch, rows, cols)
        losses = torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="none")
        return (losses.sum() if weights is None else (losses * weights).sum()), count

    def _logits(self, batch: Batch, rows, cols) -> torch.Tensor:
        if self.full_forward:
            return self.base(input_ids=batch.input_ids).logits[rows, cols]
        return self.head(self.decoder(input_ids=batch.input_ids).last_hidden_state[rows, cols])

    def target_logits(self, batch: Batch) -> torch.Tensor:
        """[completion tokens, vocab] logits at the positions that predict ``batch.targets`` (with grad when grad
        is enabled): per-sequence log-probabilities for audits and preference losses."""
        rows, cols = batch.target_positions[:, 0], batch.target_positions[:, 1]
        with self.loaded.autocast(), _lora_input_casting_off(self.peft_model):
            return self._logits(batch, rows, cols)

    @torch.no_grad()
    def per_row(self, batch: Batch) -> torch.Tensor:
        """Summed completion-token cross-entropy of each row of ``batch`` (float64), for audits: rows are
        right-padded and the model is causal, so a row's loss does not depend on its batch."""
        rows = batch.target_positions[:, 0]
        nll = torch.nn.functional.cross_entropy(self.target_logits(batch).float(), batch.targets, reduction="none")
        return torch.zeros(batch.input_ids.shape[0], dtype=torch.float64, device=nll.device).index_add_(
            0, rows, nll.double())
