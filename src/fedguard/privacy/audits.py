"""Privacy audits that try to break what a run promises.

Membership inference by loss ratio (the attack of "Pandora's White-Box", adapted to LoRA): an example a
client trained on has a lower loss under the final model than under the starting one, by more than an example
nobody trained on. The score of an example is log(loss before) - log(loss after); the audit reports the AUC
of telling one client's training examples (members) from examples of the same source that no client saw
(non-members), and the TPR at 1 % FPR, the operating point that matters for a privacy claim (Carlini et al.
2022). An AUC near 0.5 means the attacker cannot tell; DP bounds how far above 0.5 it can be.

Two views of the same attack: ``membership_inference`` (released model vs the starting one: anyone who gets
the final adapter) and ``update_attack`` (one client's upload vs the round-start global adapter: the server).
Canary exposure (Carlini et al. 2019) lives in ``fedguard.privacy.canaries``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedguard.data.tokenize import TokenizedExample, collate


@torch.inference_mode()
def example_losses(resident, adapter, examples: list[TokenizedExample], batch_size: int = 1,
                   reduction: str = "mean") -> np.ndarray:
    """Completion-token loss of each example under ``adapter``, in the order given.

    ``reduction``: "mean" (nats per completion token) or "sum" (the completion's total negative log-likelihood,
    -ln P(completion | prompt): the quantity to compare between completions of different token counts).
    Examples run ``batch_size`` to a forward pass, grouped by length.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    slot, model = resident.slot, resident.peft_model
    slot.load(adapter)
    was_training = model.training
    model.eval()
    pad, device = resident.loaded.tokenizer.pad_token_id, resident.loaded.device
    out = np.zeros(len(examples), dtype=np.float64)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    try:
        for start in range(0, len(order), max(int(batch_size), 1)):
            idx = order[start: start + max(int(batch_size), 1)]
            chunk = [examples[i] for i in idx]
            nll = resident.trainer.loss.per_row(collate(chunk, pad).to(device)).cpu().numpy()
            if reduction == "mean":
                nll = nll / np.maximum([e.completion_len for e in chunk], 1)
            out[idx] = nll
    finally:
        model.train(was_training)
    return out


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    from sklearn.metrics import roc_curve

    f, t, _ = roc_curve(labels, scores)
    ok = t[f <= fpr]
    return float(ok.max()) if len(ok) else 0.0


def precision_at_k(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Of the ``k`` highest-scored candidates, the fraction that are positives (ties broken by order given)."""
    if k <= 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return float(np.asarray(labels)[top].mean())


def _loss_ratio_attack(resident, reference, target, members: list[TokenizedExample],
                       non_members: list[TokenizedExample], batch_size: int) -> dict[str, Any]:
    """Score each example by log(loss under ``reference``) - log(loss under ``target``) and report how well
    the score tells ``members`` from ``non_members``."""
    from sklearn.metrics import roc_auc_score

    if not members or not non_members:
        raise ValueError("a membership attack needs members and non-members")
    scores = []
    for group in (members, non_members):
        lr = example_losses(resident, reference, group, batch_size)
        lt = example_losses(resident, target, group, batch_size)
        scores.append(np.log(np.maximum(lr, 1e-12)) - np.log(np.maximum(lt, 1e-12)))
    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    s = np.r_[scores[0], scores[1]]
    auc = float(roc_auc_score(labels, s))
    return {"auc": auc, "tpr_at_1pct_fpr": tpr_at_fpr(labels, s, 0.01), "members": len(members),
            "non_members": len(non_members), "member_score_mean": float(scores[0].mean()),
            "non_member_score_mean": float(scores[1].mean()),
            # an AUC from n + m examples moves by about this much between two draws of the examples
            "auc_standard_error": _auc_se(auc, len(members), len(non_members)),
            # the attacker who knows how many records the client holds and names that many
            "precision_at_k": precision_at_k(labels, s, len(members))}


def membership_inference(resident, before, after, members: list[TokenizedExample],
                         non_members: list[TokenizedExample], batch_size: int = 1) -> dict[str, Any]:
    """AUC and TPR at 1 % FPR of the loss-ratio attack between the ``before`` and ``after`` adapters."""
    return _loss_ratio_attack(resident, before, after, members, non_members, batch_size)


def update_attack(resident, global_adapter, client_adapter, members: list[TokenizedExample],
                  non_members: list[TokenizedExample], batch_size: int = 16) -> dict[str, Any]:
    """What the server learns from one upload: which candidate records the client trained on in that round.

    The server holds the round-start ``global_adapter`` and one client's uploaded ``client_adapter`` (the
    global adapter plus that client's update, as ``ClientUpdate.tensors``) and a set of candidate records. It
    scores each by log(loss under global) - log(loss under client_adapter) (a ReCIT-style attack on a single
    update) and guesses the highest-scored ones as the client's. Returned: AUC, TPR at 1 % FPR, the AUC's
    standard error, precision at k (k = number of members: of the k highest-scored candidates, the fraction
    that are members) and the mean scores of both groups.

    Unlike ``membership_inference`` (final model vs starting model: the view of anyone who gets the released
    model, after every client and round and whatever noise the release carries), this is one round's upload
    of one client, the server's view. Central client-level DP does NOT protect against it: the server sees the
    update before it adds noise. What does: sample-level DP-SGD in the client's local training, noise the
    client adds itself before upload (only its own share under distributed DP, a 1/sqrt(clients) fraction of
    the total), or secure aggregation (the server never sees one client's update). ``members`` should be
    records the client trained on in that round (a round draws local_steps x batch_size of its examples, with
    replacement when that exceeds its data, so an example the round did not draw is effectively a non-member).
    Not meaningful for FLoRA, whose clients train a re-initialised adapter on merged base weights.
    """
    return _loss_ratio_attack(resident, global_adapter, client_adapter, members, non_members, batch_size)


def _auc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))
