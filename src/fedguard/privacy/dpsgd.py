"""Sample-level DP-SGD in local training (Abadi et al., CCS 2016), with Opacus' parts around the one trainer.

Opacus supplies the mechanism: ``GradSampleModule`` computes per-example gradients of the trainable (LoRA)
parameters by hooks on their Linear layers, ``DPOptimizer`` clips each to ``clip``, sums them, adds
N(0, (σ·clip)²) and divides by the *expected* batch size before the wrapped AdamW steps. fedguard supplies what
the mechanism assumes: Poisson-sampled batches (each example joins a step independently with probability
q = batch_size · grad_accum / examples) and a per-example loss (the mean over that example's completion tokens),
so one example's gradient is one example's, whatever its length (``fedguard.federated.batches``).

Each client's epsilon composes the steps it ran, ``PoissonSampled(q, Gaussian(σ))`` per step, with dp-accounting
(``fedguard.privacy.accountant``); the history lives in the client's own state, so a resumed run continues it.
What it covers: any one training example of that client, in everything the client sends (the update and any
step snapshots, which are the DP iterates themselves).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Opacus' hooks stay registered after a private round; torch warns on every backward that the frozen inputs need
# no gradient, which is the point of LoRA
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                        "to module outputs", category=UserWarning)

class PrivateSteps:
    """Opacus' per-example gradients on the trainer's model; the hooks run only inside ``active``."""

    def __init__(self, model: torch.nn.Module):
        from opacus import GradSampleModule

        # loss_reduction "mean": the loss of a physical batch is the mean of its examples' losses
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        self.module.disable_hooks()

    @contextmanager
    def active(self, optimizer: torch.optim.Optimizer, clip: float, noise_multiplier: float, expected_batch: float,
               generator: torch.Generator) -> Iterator:
        """A ``DPOptimizer`` around ``optimizer`` for the parameters trainable now (FFA-LoRA: B only)."""
        from opacus.optimizers import DPOptimizer

        dp = DPOptimizer(optimizer, noise_multiplier=float(noise_multiplier), max_grad_norm=float(clip),
                         expected_batch_size=expected_batch, loss_reduction="mean", generator=generator)
        self.module.enable_hooks()
        try:
            yield dp
        finally:
            self.module.disable_hooks()
            for p in dp.params:
                p.grad_sample = None
                p.summed_grad = None
            for module in self.module._module.modules():  # activations of a step cut short by an error
                if hasattr(module, "activations"):
                    del module.activations


def empty_step(dp) -> None:
    """A step no example joined: zero per-example gradients, so the step is noise alone (as DP needs)."""
    for p in dp.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
