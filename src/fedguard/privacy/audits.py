"""Privacy audits that try to break what a run promises.

Membership inference by loss ratio (the attack of "Pandora's White-Box", adapted to LoRA): an example a
client trained on has a lower loss under the final model than under the starting one, by more than an example
nobody trained on. The score of an example is log(loss before) - log(loss after); the audit reports the AUC
of telling one client's training examples (members) from examples of the same source that no client saw
(non-members), and the TPR at 1 % FPR, the operating point that matters for a privacy claim (Carlini et al.
2022). An AUC near 0.5 means the attacker cannot tell; DP bounds how far above 0.5 it can be.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedguard.data.tokenize import TokenizedExample, collate


@torch.inference_mode()
def example_losses(resident, adapter, examples: list[TokenizedExample]) -> np.ndarray:
    """Mean completion-token loss of each example under ``adapter`` (one example per forward pass)."""
    slot, model = resident.slot, resident.peft_model
    slot.load(adapter)
    was_training = model.training
    model.eval()
    pad, device = resident.loaded.tokenizer.pad_token_id, resident.loaded.device
    out = []
    try:
        for ex in examples:
            loss, n = resident.trainer.loss(collate([ex], pad).to(device))
            out.append(float(loss) / max(n, 1))
    finally:
        model.train(was_training)
    return np.asarray(out, dtype=np.float64)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    from sklearn.metrics import roc_curve

    f, t, _ = roc_curve(labels, scores)
    ok = t[f <= fpr]
    return float(ok.max()) if len(ok) else 0.0


def membership_inference(resident, before, after, members: list[TokenizedExample],
                         non_members: list[TokenizedExample]) -> dict[str, Any]:
    """AUC and TPR at 1 % FPR of the loss-ratio attack between the ``before`` and ``after`` adapters."""
    from sklearn.metrics import roc_auc_score

    if not members or not non_members:
        raise ValueError("membership inference needs members and non-members")
    scores = []
    for group in (members, non_members):
        lb, la = example_losses(resident, before, group), example_losses(resident, after, group)
        scores.append(np.log(np.maximum(lb, 1e-12)) - np.log(np.maximum(la, 1e-12)))
    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    s = np.r_[scores[0], scores[1]]
    auc = float(roc_auc_score(labels, s))
    return {"auc": auc, "tpr_at_1pct_fpr": tpr_at_fpr(labels, s, 0.01), "members": len(members),
            "non_members": len(non_members), "member_score_mean": float(scores[0].mean()),
            "non_member_score_mean": float(scores[1].mean()),
            # an AUC from n + m examples moves by about this much between two draws of the examples
            "auc_standard_error": _auc_se(auc, len(members), len(non_members))}


def _auc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))
