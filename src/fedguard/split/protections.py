"""Protections of the client's outgoing hidden state beyond FedSEA's noise: a NoPeek distance-correlation penalty.

NoPeek (Vepakomma et al., "NoPeek: Information leakage reduction to share activations in distributed deep
learning", 2019) adds ``weight · dCor(X, Z)`` to the client's loss, where ``X`` is the raw input and ``Z`` the
activation it sends, over the samples of a batch: the client's front learns to send activations whose pairwise
distances say as little as possible about the inputs' pairwise distances, while the task loss keeps them useful.

Here a sample is one real token of the batch: ``X`` is its token (``inputs: tokens``: one-hot, so two samples
are at distance 0 when they are the same token and √2 otherwise) or its frozen input embedding row
(``inputs: embeddings``), and ``Z`` is the clean ``h_A`` at its position (the noise is independent of both, so
it is left out). At most ``max_tokens`` real tokens per step enter (a seeded draw per client and step), since the
statistic costs ``O(n²)`` distances. The statistic is the bias-corrected distance correlation ``R*``
(Székely & Rizzo 2013/2014: U-centred distance matrices), which is about 0 for independent samples at any
dimension, whereas the plain V-statistic dCor of independent high-dimensional vectors is far from 0 for small
``n`` (it tends to 1 as the dimension grows); it is 1 when ``Z`` is an isometry of ``X``.

The penalty lives in the client's front only: ``SplitClient.train_step`` back-propagates
``g_A`` (from the server) into ``h_A`` together with ``weight · R*`` (its gradient reaches A's LoRA and nothing
else: the server never sees it, C and B are not in its graph). With ``split.nopeek.weight = 0`` (the default)
nothing of this runs and training is bit-for-bit what it was without it.

This is a heuristic, measured against the inversion attack of ``fedguard.split.attacks``; like the noise it
gives no formal guarantee and no ε. On SmolLM2 (docs/results/split-inversion-smollm2.md) weight 10 brings R* from
0.57 to 0.15 while a linear probe still reads 88 % of the tokens: R* asks whether distances follow tokens, the
probe only needs tokens to stay linearly separable.
"""

from __future__ import annotations

import torch

from fedguard.model.blocks import padding_mask_from_counts

__all__ = ["distance_correlation", "nopeek_penalty", "pairwise_distances", "token_distances"]


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[n, n]`` between the rows of ``x`` ``[n, d]`` (float32, exact 0 on the diagonal,
    with a gradient that stays finite where two rows coincide)."""
    x = x.float()
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp(min=0.0)
    # sqrt has an infinite derivative at 0: coinciding rows (and the diagonal) get distance 0 and no gradient
    zero = d2 <= 1e-12
    d = torch.sqrt(torch.where(zero, torch.ones_like(d2), d2))
    return torch.where(zero, torch.zeros_like(d), d)


def token_distances(ids: torch.Tensor) -> torch.Tensor:
    """Distances between the one-hot vectors of token ids ``[n]``: 0 for the same token, √2 otherwise."""
    return (ids[:, None] != ids[None, :]).float() * (2.0 ** 0.5)


def _u_centred(d: torch.Tensor) -> torch.Tensor:
    n = d.shape[0]
    row = d.sum(dim=1, keepdim=True) / (n - 2)
    col = d.sum(dim=0, keepdim=True) / (n - 2)
    total = d.sum() / ((n - 1) * (n - 2))
    a = d - row - col + total
    return a * (1.0 - torch.eye(n, dtype=a.dtype, device=a.device))


def _double_centred(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(dim=1, keepdim=True) - d.mean(dim=0, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor, *, unbiased: bool = True, x_is_distance: bool = False,
                         z_is_distance: bool = False) -> torch.Tensor:
    """Distance correlation between paired samples ``x`` ``[n, p]`` and ``z`` ``[n, q]`` (or their distance
    matrices ``[n, n]`` with ``*_is_distance``), differentiable.

    ``unbiased=True``: the bias-corrected ``R*`` of Székely & Rizzo (U-centred distances; ``n >= 4``), in
    ``[-1, 1]`` up to rounding, about 0 for independent samples, 1 for ``z = f(x)`` with ``f`` an isometry; the
    analogue of the *squared* distance correlation. ``unbiased=False``: the classic V-statistic ``dCor`` in
    ``[0, 1]`` (biased upwards for small ``n`` and large dimension). 0 if either sample has no spread."""
    a = x.float() if x_is_distance else pairwise_distances(x)
    b = z.float() if z_is_distance else pairwise_distances(z)
    n = a.shape[0]
    if a.shape != (n, n) or b.shape != (n, n):
        raise ValueError(f"distance_correlation: paired samples needed, got {tuple(a.shape)} and {tuple(b.shape)}")
    if unbiased:
        if n < 4:
            raise ValueError(f"the bias-corrected distance correlation needs at least 4 samples, got {n}")
        ca, cb = _u_centred(a), _u_centred(b)
    else:
        ca, cb = _double_centred(a), _double_centred(b)
    xy, xx, yy = (ca * cb).sum(), (ca * ca).sum(), (cb * cb).sum()
    denom = xx * yy
    if float(denom.detach()) <= 0.0:
        return xy * 0.0
    r2 = xy / torch.sqrt(denom)
    return r2 if unbiased else torch.sqrt(r2.clamp(min=1e-12))


def nopeek_penalty(embed: torch.nn.Module, ids: torch.Tensor, hidden: torch.Tensor, counts: torch.Tensor, *,
                   inputs: str = "tokens", max_tokens: int = 512, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """The bias-corrected distance correlation between the real tokens of a right-padded batch (``ids``
    ``[B, T]``, ``counts`` ``[B]``) and the hidden states the front computed for them (``hidden``
    ``[B, T, H]``, with its graph): one sample per real token, at most ``max_tokens`` of them (drawn with
    ``generator``). ``inputs``: ``tokens`` (one-hot) or ``embeddings`` (the frozen rows of ``embed``)."""
    valid = padding_mask_from_counts(counts, ids.shape[1], ids.shape[0], ids.device)
    tok = ids[valid]
    z = hidden[valid]
    if tok.numel() > max_tokens:
        pick = torch.randperm(tok.numel(), generator=generator)[:max_tokens].to(tok.device)
        tok, z = tok[pick], z[pick]
    if tok.numel() < 4:
        return hidden.sum() * 0.0
    if inputs == "tokens":
        dx = token_distances(tok)
    elif inputs == "embeddings":
        with torch.no_grad():
            dx = pairwise_distances(embed(tok).detach())
    else:
        raise ValueError(f"nopeek inputs must be 'tokens' or 'embeddings', got {inputs!r}")
    return distance_correlation(dx, z, x_is_distance=True)
