"""The colluding-client inversion attack on split learning (FedSEA §2.5, reference §7.1 item 9), and its metrics.

Threat model (FedSEA §2.1): an honest-but-curious server that colludes with one client. The colluder hands the
server pairs (the hidden state ``h̃_A`` it sends, the token ids behind it), as many as the server asks for; the
server trains an *inverter* on them and applies it to the hidden states another client (the victim) sends,
reading the victim's tokens off them. Nothing here touches the protocol: the server sees exactly what the
victim's ``SplitClient`` sends, recorded by ``SentRecorder`` (training time: ``h̃_A = h_A + ε`` with the noise
of ``split.noise``) or computed the way the client computes it (``client_hidden``: inference-time prefill,
clean ``h_A``; or training-time, noised with the client's own mechanism).

Inverters (``train_inverter``): one output per position, a token of the attacker's vocabulary (the distinct
tokens of the colluder's data: a victim token the colluder never sent cannot be recovered and counts as a miss).

* ``linear``: a linear probe ``H -> vocabulary`` applied at every position alone (features standardised with the
  colluder's mean and std per dimension; reference §7.4's attack 2);
* ``decoder``: a small fresh transformer (FedSEA's attack decoder is k_a LLaMA blocks + norm + head on the
  full vocabulary; on CPU this is a projection ``H -> d`` with learned positions, ``layers`` bidirectional
  pre-norm encoder blocks of width ``d`` and a head on the attacker's vocabulary, trained from scratch). It
  sees the whole sequence of hidden states (the server has it), so it can use the neighbours of a position.

Both are trained with AdamW on cross-entropy at every real position (the token *at* the position, not the next
one: ``h_A`` at position t is computed from tokens ``<= t``, and the token at t is what it leaks most).

Metrics, over the victim's sequences (``recovery``): **token recovery rate**, the share of real positions whose
token the inverter gets exactly (micro average), and **ROUGE-L**, the F1 of the longest common subsequence of the
reconstructed and the true token sequence (Lin 2004, β = 1; computed here on token ids since no ROUGE package
is installed), averaged over sequences. Both are taken from position ``start`` on: ``common_prefix_length``
gives the length of the chat-template header every sequence shares (system prompt and the user turn's opening),
which any attacker knows without looking at a hidden state. ``positional_prior`` is the attack without hidden
states (the colluder's most frequent token at each position): what an inverter must beat.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DecoderInverter", "HiddenSet", "LinearInverter", "SentRecorder", "Vocabulary", "client_hidden",
           "common_prefix_length", "inversion_attack", "lcs_length", "positional_prior", "predict", "recovery",
           "rouge_l", "train_inverter"]


# --- what the attacker holds ---------------------------------------------------------------------------------

@dataclass
class HiddenSet:
    """Sequences of hidden states as the server received them, with the tokens behind them: per sequence its
    real positions only (``hidden[i]`` ``[T_i, H]`` float32, ``ids[i]`` ``[T_i]`` int64)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    ids: list[torch.Tensor] = field(default_factory=list)

    def add_batch(self, hidden: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        for b, n in enumerate(counts.tolist()):
            self.hidden.append(hidden[b, :n].detach().float().cpu())
            self.ids.append(ids[b, :n].detach().cpu().long())

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self) -> int:
        return sum(len(i) for i in self.ids)

    def split(self, share: float) -> tuple[HiddenSet, HiddenSet]:
        """The first ``1 - share`` of the sequences and the rest."""
        cut = len(self) - max(1, round(share * len(self))) if share > 0 else len(self)
        return HiddenSet(self.hidden[:cut], self.ids[:cut]), HiddenSet(self.hidden[cut:], self.ids[cut:])

    def __add__(self, other: HiddenSet) -> HiddenSet:
        return HiddenSet(self.hidden + other.hidden, self.ids + other.ids)


class SentRecorder:
    """A transport wrapper that keeps what the server receives in training forwards (the server's view):
    ``records[client_id]`` lists ``(step, hidden [B, T, H], counts [B])`` in arrival order. Every call is passed
    through unchanged."""

    def __init__(self, transport):
        self.inner = transport
        self.records: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

    def call(self, kind, client_id, tensors, meta):
        if kind == "forward" and meta.get("train"):
            self.records.setdefault(str(client_id), []).append(
                (int(meta.get("step", 0)), tensors["hidden"].detach().float().clone(), tensors["counts"].clone()))
        return self.inner.call(kind, client_id, tensors, meta)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def hidden_set(self, client_id: str, batches: Sequence[tuple[Any, torch.Tensor]]) -> HiddenSet:
        """The client's recorded training messages paired with the batches it trained on (in order; the
        colluding attacker knows no victim tokens: this pairing is for scoring only)."""
        recs = self.records.get(str(client_id), [])
        if len(recs) != len(batches):
            raise ValueError(f"{len(recs)} recorded training forwards of client {client_id}, {len(batches)} batches")
        out = HiddenSet()
        for (_, hidden, counts), (batch, bcounts) in zip(recs, batches):
            if not torch.equal(counts, bcounts):
                raise ValueError("a recorded message does not match its batch (counts differ)")
            out.add_batch(hidden, batch.input_ids, counts)
        return out


@torch.no_grad()
def client_hidden(client, batches: Sequence[tuple[Any, torch.Tensor]], *, noise: bool = False,
                  step_offset: int = 1_000_000) -> HiddenSet:
    """What ``client`` sends for each batch, through its own code: ``noise=False``: the inference-time message
    (clean ``h_A``, A in eval mode, as in ``evaluate`` and generation); ``noise=True``: a training-time message
    (A in train mode, ``split.noise`` as configured, drawn for step ``step_offset + i`` of batch ``i``, steps
    the training run never uses, so every draw is fresh)."""
    out = HiddenSet()
    for i, (batch, counts) in enumerate(batches):
        step = step_offset + i
        with client.lock:
            client.activate(train=noise)
            if noise:
                client._seed("front", step)
            with client.autocast():
                h = client.seam.front(batch.input_ids, counts)
            sent, _ = client.noised(h, counts, step, train=noise)
        out.add_batch(sent.float(), batch.input_ids, counts)
    return out


# --- inverters -------------------------------------------------------------------------------------------------

class Vocabulary:
    """The attacker's output vocabulary: the distinct tokens of the colluder's sequences."""

    def __init__(self, sequences: Sequence[torch.Tensor]):
        self.tokens = torch.unique(torch.cat([s.long() for s in sequences]))
        self.size = int(self.tokens.numel())
        self._max = int(self.tokens.max()) + 1

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Indices into the vocabulary; -100 (ignored by cross-entropy, never predicted) for unknown tokens."""
        table = torch.full((max(self._max, int(ids.max()) + 1 if ids.numel() else 0),), -100, dtype=torch.long)
        table[self.tokens] = torch.arange(self.size)
        return table[ids.long()]

    def decode(self, index: torch.Tensor) -> torch.Tensor:
        return self.tokens[index]


class _Standardise(torch.nn.Module):
    def __init__(self, data: HiddenSet):
        super().__init__()
        flat = torch.cat(data.hidden)
        self.register_buffer("mean", flat.mean(dim=0))
        self.register_buffer("std", flat.std(dim=0).clamp(min=1e-4))

    def forward(self, h):
        return (h - self.mean) / self.std


class LinearInverter(torch.nn.Module):
    """A linear probe ``H -> vocabulary`` at every position alone, on standardised features."""

    def __init__(self, data: HiddenSet, vocab: Vocabulary):
        super().__init__()
        self.norm = _Standardise(data)
        self.head = torch.nn.Linear(data.hidden[0].shape[-1], vocab.size)

    def forward(self, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.norm(h))


class DecoderInverter(torch.nn.Module):
    """A fresh transformer over the whole sequence of hidden states: standardise, project ``H -> d``, add
    learned positions, ``layers`` bidirectional pre-norm encoder blocks (``heads`` heads, MLP ``2d``,
    key-padding mask), layer norm, head on the attacker's vocabulary."""

    def __init__(self, data: HiddenSet, vocab: Vocabulary, *, d: int = 256, layers: int = 1, heads: int = 4,
                 max_len: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.norm = _Standardise(data)
        self.proj = torch.nn.Linear(data.hidden[0].shape[-1], d)
        self.pos = torch.nn.Embedding(max_len, d)
        torch.nn.init.normal_(self.pos.weight, std=0.02)
        block = torch.nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.out_norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab.size)

    def forward(self, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(self.norm(h)) + self.pos(torch.arange(h.shape[1], device=h.device))
        pad = None if valid is None else ~valid
        return self.head(self.out_norm(self.blocks(x, src_key_padding_mask=pad)))


def _padded(data: HiddenSet, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hs = [data.hidden[i] for i in index]
    ids = [data.ids[i] for i in index]
    n = max(len(x) for x in ids)
    h = torch.zeros(len(hs), n, hs[0].shape[-1])
    y = torch.full((len(hs), n), -1, dtype=torch.long)
    valid = torch.zeros(len(hs), n, dtype=torch.bool)
    for b, (x, t) in enumerate(zip(hs, ids)):
        h[b, :len(t)], y[b, :len(t)], valid[b, :len(t)] = x, t, True
    return h, y, valid


def train_inverter(kind: str, data: HiddenSet, vocab: Vocabulary | None = None, *, steps: int = 300,
                   batch_sequences: int = 16, lr: float | None = None, weight_decay: float = 0.01, seed: int = 0,
                   **decoder: Any) -> tuple[torch.nn.Module, Vocabulary]:
    """Train an inverter (``linear`` or ``decoder``) on the attacker's pairs; returns it (eval mode) and its
    vocabulary. ``steps`` AdamW steps on ``batch_sequences`` random sequences each (seeded)."""
    if not len(data):
        raise ValueError("train_inverter: no training pairs")
    vocab = vocab or Vocabulary(data.ids)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "linear":
            model: torch.nn.Module = LinearInverter(data, vocab)
            lr = 3e-3 if lr is None else lr
        elif kind == "decoder":
            model = DecoderInverter(data, vocab, **decoder)
            lr = 1e-3 if lr is None else lr
        else:
            raise ValueError(f"unknown inverter {kind!r} (linear, decoder)")
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        model.train()
        for step in range(steps):
            index = torch.randint(len(data), (min(batch_sequences, len(data)),), generator=gen).tolist()
            h, y, valid = _padded(data, index)
            target = torch.where(valid, vocab.encode(y.clamp(min=0)), torch.full_like(y, -100))
            logits = model(h, valid)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab.size), target.reshape(-1),
                                                     ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:  # cosine decay to 10 %
                group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
            opt.step()
    model.eval()
    return model, vocab


@torch.no_grad()
def predict(model: torch.nn.Module, vocab: Vocabulary, data: HiddenSet, batch_sequences: int = 64
            ) -> list[torch.Tensor]:
    """The inverter's token at every real position of each sequence."""
    out: list[torch.Tensor] = []
    for start in range(0, len(data), batch_sequences):
        index = list(range(start, min(start + batch_sequences, len(data))))
        h, _, valid = _padded(data, index)
        best = vocab.decode(model(h, valid).argmax(dim=-1))
        out.extend(best[b, :len(data.ids[i])] for b, i in enumerate(index))
    return out


# --- metrics -----------------------------------------------------------------------------------------------------

def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a)·len(b)))."""
    a, b = list(a), list(b)
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """ROUGE-L F1 (β = 1) of two token sequences: LCS / len as recall and precision; 1 for identical
    non-empty sequences, 0 when they share no token (and when either is empty)."""
    reference, candidate = [int(t) for t in reference], [int(t) for t in candidate]
    if not reference or not candidate:
        return 0.0
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return 0.0
    recall, precision = lcs / len(reference), lcs / len(candidate)
    return 2 * recall * precision / (recall + precision)


def common_prefix_length(sequences: Sequence[torch.Tensor]) -> int:
    """How many leading tokens every sequence shares (the chat-template header)."""
    seqs = [s.tolist() for s in sequences]
    n = min(len(s) for s in seqs)
    for t in range(n):
        if any(s[t] != seqs[0][t] for s in seqs[1:]):
            return t
    return n


def recovery(predicted: Sequence[torch.Tensor], truth: Sequence[torch.Tensor], start: int = 0) -> dict[str, float]:
    """Token recovery rate (micro, over real positions ``>= start``) and mean ROUGE-L (over sequences, on
    their tokens from ``start``) of a reconstruction."""
    hits = total = 0
    scores = []
    for p, t in zip(predicted, truth):
        p, t = p[start:], t[start:]
        if not len(t):
            continue
        hits += int((p == t).sum())
        total += len(t)
        scores.append(rouge_l(t.tolist(), p.tolist()))
    return {"token_recovery": hits / total if total else float("nan"),
            "rouge_l": sum(scores) / len(scores) if scores else float("nan"), "positions": total}


def positional_prior(colluder_ids: Sequence[torch.Tensor], lengths: Sequence[int]) -> list[torch.Tensor]:
    """The attack without hidden states: at each position the colluder's most frequent token there (its most
    frequent token overall where no colluder sequence is that long), for sequences of the given lengths."""
    overall = Counter(int(t) for s in colluder_ids for t in s).most_common(1)[0][0]
    longest = max(lengths)
    per_pos = []
    for t in range(longest):
        c = Counter(int(s[t]) for s in colluder_ids if len(s) > t)
        per_pos.append(c.most_common(1)[0][0] if c else overall)
    return [torch.tensor(per_pos[:n], dtype=torch.long) for n in lengths]


def inversion_attack(attacker: HiddenSet, victim: HiddenSet, *, kinds: Sequence[str] = ("linear", "decoder"),
                     control: HiddenSet | None = None, start: int | None = None, steps: dict[str, int] | None = None,
                     seed: int = 0, **decoder: Any) -> dict[str, Any]:
    """Train each inverter on the attacker's pairs, reconstruct the victim's tokens, score them from ``start``
    (default: the header every attacker sequence shares). ``control``: held-out pairs of the colluder itself
    (the same front: the "same-A" control). Returns ``{kind: {token_recovery, rouge_l[, control_*]}, "prior":
    ..., "start", "oov_rate" (victim tokens outside the attacker's vocabulary, never recoverable)}``."""
    start = common_prefix_length(attacker.ids) if start is None else start
    vocab = Vocabulary(attacker.ids)
    known = set(vocab.tokens.tolist())
    tail = [int(t) for s in victim.ids for t in s[start:]]
    out: dict[str, Any] = {
        "start": start, "attacker_sequences": len(attacker), "attacker_tokens": attacker.tokens(),
        "victim_sequences": len(victim), "vocabulary": vocab.size,
        "oov_rate": sum(t not in known for t in tail) / max(len(tail), 1),
        "prior": recovery(positional_prior(attacker.ids, [len(s) for s in victim.ids]), victim.ids, start),
    }
    steps = {"linear": 300, "decoder": 300, **(steps or {})}
    for kind in kinds:
        model, _ = train_inverter(kind, attacker, vocab, steps=steps[kind], seed=seed,
                                  **(decoder if kind == "decoder" else {}))
        res = recovery(predict(model, vocab, victim), victim.ids, start)
        if control is not None and len(control):
            ctrl = recovery(predict(model, vocab, control), control.ids, start)
            res.update({"control_token_recovery": ctrl["token_recovery"], "control_rouge_l": ctrl["rouge_l"]})
        out[kind] = res
    return out
