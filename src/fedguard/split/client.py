"""The split-learning client: parts A (embedding + blocks ``[0, k_a)``) and C (blocks ``[L - k_c, L)`` + final
norm + LM head + loss) of one resident model, and the per-step protocol with the server.

``SplitClient.train_step(batch, counts, step)`` is one FedSEA training step (reference §1.3):

1. A runs on the batch (right-padded token ids); ``h̃_A = h_A.detach() + ε`` in training (``split.noise``);
   ``forward`` sends ``h̃_A`` and the per-row token counts (never a mask, positions or token ids);
2. the server's reply ``h_B`` becomes a leaf; C runs on it and fedguard's completion-only loss (the mean
   cross-entropy over the completion tokens of the batch, the LM head applied at those positions only, as
   ``fedguard.model.loss.CompletionLoss`` does) is back-propagated; C's optimizer steps;
   ``g_B = ∂loss/∂h_B``, optionally clipped per sample to L2 ``grad_noise.clip`` and given Gaussian noise of
   std ``grad_noise.std`` on the real positions (off by default);
3. ``backward`` sends ``g_B``; the reply ``g_A = ∂loss/∂h̃_A`` is back-propagated into the *clean* ``h_A``
   (straight-through over the additive noise); A's optimizer steps.

Only the client sees token ids, labels, logits and the loss. One AdamW per part (A and C; lr from ``train.lr``
and ``train.lr_schedule`` over ``split.steps``, ``train.weight_decay``), gradient clipping per part at
``train.max_grad_norm``.

NoPeek (``split.nopeek``, off by default): the front's loss gets ``weight · R*(tokens, h_A)``, the bias-corrected
distance correlation between the batch's real tokens and the clean ``h_A`` at their positions
(``fedguard.split.protections``); its gradient joins ``g_A`` in A's backward, and steps log ``nopeek_dcor``.

Noise (``split.noise``): ``relative``: the target mean absolute noise is ``m = scale · mean|h_A|`` (mean over
the real positions of this step's batch), ``absolute``: ``m = scale``; ``σ = m·√(π/2)``, since
``E|N(0, σ²)| = σ·√(2/π)``. Fresh i.i.d. noise every step from a stream per (seed, client, step), on every
element of ``h_A`` (padding too), in training forwards only (never in evaluation or generation). Every step
logs ``mean_abs_h``, ``mean_abs_noise`` (measured) and ``noise_sigma``. This is noise injection, a heuristic;
it is not differential privacy and no ε is claimed (``h_A`` is not clipped).

The client's LoRA lives in ``PartLora`` banks (one for A, one for C) shared by every client simulated on the
resident model: each client has its own parameters in them, made live by reference for each computation
(``fedguard.split.params``), so in-process clients can interleave (batch-parallel mode runs one thread per
client). Every computation on the model holds ``compute_lock`` (shared with the in-process server); a
transport call never does.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from fedguard.config import ExperimentConfig
from fedguard.data.tokenize import Batch, TokenizedExample, collate
from fedguard.federated.sampling import round_lr
from fedguard.model.blocks import BlockSeam, padding_mask_from_counts
from fedguard.model.keys import AdapterState
from fedguard.model.loss import head_loss, mean_token_loss
from fedguard.seeding import derive_seed, torch_generator
from fedguard.split.messages import (
    WIRE_DTYPES,
    ProtocolError,
    Transport,
    spec_differences,
)
from fedguard.split.params import PartLora
from fedguard.split.protections import nopeek_penalty

__all__ = ["SplitClient", "collate_with_counts", "completion_loss", "count_batches"]


def collate_with_counts(examples: Sequence[TokenizedExample], pad_id: int) -> tuple[Batch, torch.Tensor]:
    """fedguard's right-padded batch with completion targets, and each row's real token count ``[B]`` int64
    (from the examples: the pad id may also be a real token, e.g. the end-of-turn token)."""
    return collate(examples, pad_id), torch.tensor([len(e.input_ids) for e in examples], dtype=torch.long)


def count_batches(examples: Sequence[TokenizedExample], pad_id: int, size: int) -> list[tuple[Batch, torch.Tensor]]:
    """``examples`` in order, ``size`` at a time, each as ``collate_with_counts``."""
    return [collate_with_counts(examples[i:i + size], pad_id) for i in range(0, len(examples), size)]


def completion_loss(seam: BlockSeam, final_hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the batch's completion tokens, their count) from C's output (after the final
    norm): the LM head at the target positions only (``model.loss.head_loss``, fused where the head allows)."""
    rows, cols = batch.target_positions[:, 0], batch.target_positions[:, 1]
    return head_loss(seam.head, final_hidden[rows, cols], batch.targets), int(batch.targets.numel())


class SplitClient:
    def __init__(self, client_id: str, seam: BlockSeam, transport: Transport, spec: dict[str, Any],
                 cfg: ExperimentConfig, *, banks: tuple[PartLora, PartLora] | None = None,
                 autocast: Callable[[], AbstractContextManager] | None = None,
                 compute_lock: threading.RLock | None = None, weight: float = 1.0,
                 initial: AdapterState | None = None):
        self.id = str(client_id)
        self.seam = seam
        self.transport = transport
        self.spec = spec
        self.cfg = cfg
        self.split = cfg.split
        self.weight = float(weight)
        self.wire_dtype = WIRE_DTYPES[cfg.split.wire_dtype]
        self.stream_dtype = seam.decoder.embed_tokens.weight.dtype
        self.hidden_size = int(seam.config.hidden_size)
        self.autocast = autocast or nullcontext
        self.lock = compute_lock or threading.RLock()
        self.banks = banks or (PartLora(seam.model, [seam.front]), PartLora(seam.model, [seam.back]))
        for bank in self.banks:
            bank.add(self.id, None if initial is None else {k: initial[k] for k in bank.linears})
        t = cfg.train
        self.optimizers = tuple(torch.optim.AdamW(list(bank.params(self.id).values()), lr=t.lr,
                                                  weight_decay=t.weight_decay) for bank in self.banks)
        # what the front adds to its loss besides g_A: (ids, h_A, counts, step, stats) -> a scalar with its graph
        # into A, or None; split.nopeek by default, replaceable by a measurement (docs/results/split_adversary.py)
        self.front_penalty: Callable[..., torch.Tensor | None] = self._nopeek
        self.keep_gradients = False  # tests: the part gradients of the last step (before clipping)
        self.last_gradients: dict[str, torch.Tensor] = {}

    # -- protocol ------------------------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        _, meta = self.transport.call("hello", self.id, {}, {"spec": self.spec, "weight": self.weight})
        diffs = spec_differences(self.spec, meta.get("spec") or {})
        if diffs:
            raise ProtocolError(f"the server's handshake differs from this client's: {'; '.join(diffs)}")
        return meta

    def _reply_tensor(self, kind: str, tensors: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The server's tensor, checked like the server checks the client's (a server is not trusted either)."""
        t = tensors.get(name)
        if set(tensors) != {name} or t is None:
            raise ProtocolError(f"{kind} reply: expected tensors [{name!r}], got {sorted(tensors)}")
        if t.dtype != self.wire_dtype or tuple(t.shape) != tuple(shape):
            raise ProtocolError(f"{kind} reply: {name!r} must be {list(shape)} "
                                f"{str(self.wire_dtype).removeprefix('torch.')}, got {list(t.shape)} "
                                f"{str(t.dtype).removeprefix('torch.')}")
        if not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"{kind} reply: {name!r} has non-finite values")
        return t.to(self.stream_dtype)

    # -- pieces ----------------------------------------------------------------------------------------------
    def activate(self, train: bool) -> None:
        """Make this client's LoRA live in A and C, and set their train/eval mode (call under the lock)."""
        for bank in self.banks:
            bank.use(self.id)
        for part in (self.seam.front, self.seam.back):
            for module in part.modules():
                module.train(train)

    def _seed(self, what: str, step: int) -> None:
        torch.manual_seed(derive_seed(self.cfg.seed, "split-client-dropout", self.id, what, step))

    def _lr(self, step: int) -> float:
        return round_lr(self.cfg.train, min(step, self.split.steps), self.split.steps)

    def noised(self, h: torch.Tensor, counts: torch.Tensor, step: int, train: bool
               ) -> tuple[torch.Tensor, dict[str, float]]:
        """``h_A.detach() + ε`` in the wire dtype, with the step's noise statistics."""
        clean = h.detach()
        valid = padding_mask_from_counts(counts, h.shape[1], h.shape[0], h.device)
        mean_abs_h = float(clean[valid].abs().float().mean())
        noise = self.split.noise
        if not train or noise.mode == "off":
            return clean.to(self.wire_dtype), {"mean_abs_h": mean_abs_h, "mean_abs_noise": 0.0, "noise_sigma": 0.0}
        target = noise.scale * mean_abs_h if noise.mode == "relative" else noise.scale
        sigma = target * math.sqrt(math.pi / 2)
        g = torch_generator(self.cfg.seed, "split-noise", self.id, step)
        eps = torch.randn(clean.shape, generator=g, dtype=torch.float32).to(clean.device) * sigma
        sent = (clean.float() + eps).to(self.wire_dtype)
        return sent, {"mean_abs_h": mean_abs_h, "mean_abs_noise": float(eps.abs().mean()), "noise_sigma": sigma}

    def _nopeek(self, ids: torch.Tensor, h_a: torch.Tensor, counts: torch.Tensor, step: int,
                stats: dict[str, float]) -> torch.Tensor | None:
        """``split.nopeek.weight · R*(tokens, h_A)`` with its graph into A (None when off); logs ``nopeek_dcor``."""
        npk = self.split.nopeek
        if not npk.weight:
            return None

        dcor = nopeek_penalty(self.seam.decoder.embed_tokens, ids, h_a, counts, inputs=npk.inputs,
                              max_tokens=npk.max_tokens,
                              generator=torch_generator(self.cfg.seed, "split-nopeek", self.id, step))
        stats["nopeek_dcor"] = float(dcor.detach())
        return npk.weight * dcor

    def _gradient_noise(self, g: torch.Tensor, counts: torch.Tensor, step: int) -> torch.Tensor:
        gn = self.split.grad_noise
        if gn.clip is None and not gn.std:
            return g
        g = g.float().clone()
        valid = padding_mask_from_counts(counts, g.shape[1], g.shape[0], g.device)
        if gn.clip is not None:
            norms = g.flatten(1).norm(dim=1)
            g *= (gn.clip / norms.clamp(min=1e-12)).clamp(max=1.0)[:, None, None]
        if gn.std:
            eps = torch.randn(g.shape, generator=torch_generator(self.cfg.seed, "split-grad-noise", self.id, step))
            g += eps.to(g.device) * gn.std * valid[..., None]
        return g

    def _step(self, index: int, step: int) -> float:
        """Clip this part's gradients, step its optimizer; the gradient norm before clipping."""
        params = list(self.banks[index].params(self.id).values())
        if self.keep_gradients:
            names = ("front", "back")[index]
            for k, p in self.banks[index].params(self.id).items():
                if p.grad is not None:
                    self.last_gradients[f"{names}:{k}"] = p.grad.detach().clone()
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0
        if self.cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        opt = self.optimizers[index]
        for group in opt.param_groups:
            group["lr"] = self._lr(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    # -- training ------------------------------------------------------------------------------------------
    def train_step(self, batch: Batch, counts: torch.Tensor, step: int) -> dict[str, float]:
        """One split training step (see the module docstring); returns its metrics."""
        t0 = time.perf_counter()
        ids = batch.input_ids
        shape = (ids.shape[0], ids.shape[1], self.hidden_size)
        with self.lock:
            self.activate(train=True)
            self._seed("front", step)
            with self.autocast():
                h_a = self.seam.front(ids, counts)
            sent, stats = self.noised(h_a, counts, step, train=True)
            penalty = self.front_penalty(ids, h_a, counts, step, stats)
        reply, _ = self.transport.call("forward", self.id, {"hidden": sent, "counts": counts},
                                       {"step": step, "train": True})
        h_b = self._reply_tensor("forward", reply, "hidden", shape).detach().requires_grad_(True)
        with self.lock:
            self.activate(train=True)
            self._seed("back", step)
            with self.autocast():
                loss_sum, n_targets = completion_loss(self.seam, self.seam.back(h_b, counts), batch)
            (loss_sum / n_targets).backward()
            g_b = self._gradient_noise(h_b.grad, counts, step)
            norm_back = self._step(1, step)
        reply, _ = self.transport.call("backward", self.id, {"grad": g_b.to(self.wire_dtype)}, {"step": step})
        g_a = self._reply_tensor("backward", reply, "grad", shape)
        with self.lock:
            if penalty is None:
                h_a.backward(g_a.to(h_a.dtype))  # straight-through: the clean h_A
            else:  # g_A and the NoPeek penalty's gradient, both into A
                torch.autograd.backward([h_a, penalty], [g_a.to(h_a.dtype), None])
            norm_front = self._step(0, step)
        return {"loss": float(loss_sum.detach()) / n_targets, "completion_tokens": float(n_targets),
                "tokens": float(counts.sum()), **stats, "grad_norm_front": norm_front, "grad_norm_back": norm_back,
                "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self, batches: Sequence[tuple[Batch, torch.Tensor]], step: int = 1) -> float | None:
        """Mean completion-token loss over ``batches`` through the server (no noise, nothing trained); None for
        no batches."""
        losses = []
        for batch, counts in batches:
            shape = (batch.input_ids.shape[0], batch.input_ids.shape[1], self.hidden_size)
            with self.lock:
                self.activate(train=False)
                with self.autocast():
                    h_a = self.seam.front(batch.input_ids, counts)
                sent, _ = self.noised(h_a, counts, step, train=False)
            reply, _ = self.transport.call("forward", self.id, {"hidden": sent, "counts": counts},
                                           {"step": step, "train": False})
            h_b = self._reply_tensor("forward", reply, "hidden", shape)
            with self.lock:
                self.activate(train=False)
                with self.autocast():
                    losses.append(completion_loss(self.seam, self.seam.back(h_b, counts), batch))
        return mean_token_loss(losses)

    def adapter_state(self) -> AdapterState:
        """This client's LoRA of A and C (PEFT keys)."""
        return {**self.banks[0].state(self.id), **self.banks[1].state(self.id)}

    def reset_optimizers(self) -> None:
        for opt in self.optimizers:
            opt.state.clear()
