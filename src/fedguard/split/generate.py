"""Collaborative greedy decoding through the transport, with a KV cache per party (FedSEA reference §3.2).

``collaborative_greedy(client, input_ids, counts, ...)``:

1. prefill: the client runs A over the right-padded prompts with its own A cache and sends ``prefill``
   (``hidden [B,T,H]``, ``counts [B]``); the server runs B with a fresh cache of its own layers and replies
   ``hidden [B,T,H]``; the client runs C with its C cache and takes the next token at each row's last real
   position;
2. each decode step: the client embeds only the new token through A, sends ``decode`` with ``hidden [B,1,H]``
   (no counts, positions or mask: each party's ``PartCache`` remembers what it has seen), the server extends
   its cache and replies ``hidden [B,1,H]``; the next token goes from C to A inside the client;
3. ``end`` when every row has emitted EOS or after ``max_new_tokens``: the server drops its cache; the
   client's caches are local to the call (reset per request).

K/V never leave their party; there is no noise at inference. The tokens equal the unsplit model's greedy
tokens (``generate(do_sample=False)``) up to fp32 rounding when the wire dtype is the model's dtype; a
lower-precision wire (bf16/fp16) rounds the hidden states and may change them. Batches may hold prompts of
different lengths (right padding); rows that finished continue with ``pad_token_id``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedguard.data.federation import build_eval_data
from fedguard.data.tokenize import render_prompt
from fedguard.evaluation.evaluator import Evaluator
from fedguard.split.client import SplitClient

__all__ = ["chat_batch", "collaborative_greedy", "evaluate_client", "generate_chat", "generate_rendered",
           "generate_texts", "rendered_batch"]


@torch.no_grad()
def collaborative_greedy(client: SplitClient, input_ids: torch.Tensor, counts: torch.Tensor | None = None, *,
                         max_new_tokens: int, eos_token_id: int | Iterable[int] | None = None,
                         pad_token_id: int | None = None) -> torch.Tensor:
    """The new tokens ``[B, n]`` (n <= max_new_tokens) of greedy decoding through client and server."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    seam, t = client.seam, client.transport
    batch, length = input_ids.shape
    counts = (torch.full((batch,), length, dtype=torch.long) if counts is None
              else torch.as_tensor(counts, dtype=torch.long))
    if int(counts.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())),
                       dtype=torch.long)
    if eos.numel() and pad_token_id is None:
        raise ValueError("pad_token_id is needed with eos_token_id (rows that finished are padded)")
    front_cache, back_cache = seam.front.new_cache(), seam.back.new_cache()
    rows = torch.arange(batch)
    shape = (batch, length, client.hidden_size)
    try:
        with client.lock:
            client.activate(train=False)
            with client.autocast():
                h = seam.front(input_ids, counts, cache=front_cache)
        reply, _ = t.call("prefill", client.id, {"hidden": h.to(client.wire_dtype), "counts": counts}, {})
        h = client._reply_tensor("prefill", reply, "hidden", shape)
        with client.lock:
            client.activate(train=False)
            with client.autocast():
                h = seam.back(h, counts, cache=back_cache)
                nxt = seam.logits(h[rows, counts - 1]).argmax(-1)
        finished = torch.zeros(batch, dtype=torch.bool)
        out = []
        for step in range(max_new_tokens):
            tok = torch.where(finished, pad_token_id if pad_token_id is not None else 0, nxt)
            out.append(tok)
            if eos.numel():
                finished |= torch.isin(tok, eos)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            with client.lock:
                client.activate(train=False)
                with client.autocast():
                    h = seam.front(tok[:, None], cache=front_cache)
            reply, _ = t.call("decode", client.id, {"hidden": h.to(client.wire_dtype)}, {})
            h = client._reply_tensor("decode", reply, "hidden", (batch, 1, client.hidden_size))
            with client.lock:
                client.activate(train=False)
                with client.autocast():
                    h = seam.back(h, cache=back_cache)
                    nxt = seam.logits(h[:, -1]).argmax(-1)
        return torch.stack(out, dim=1)
    finally:
        t.call("end", client.id, {}, {})


def chat_batch(tokenizer, prompts: Sequence[str], system_prompt: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat prompts (the model's template) as right-padded ``input_ids [B, T]`` and token counts ``[B]``."""
    return rendered_batch(tokenizer, [render_prompt(tokenizer, [{"role": "user", "content": p}], system_prompt)
                                      for p in prompts])


def rendered_batch(tokenizer, rendered: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts already rendered with the chat template as right-padded ``input_ids [B, T]`` and counts ``[B]``."""
    seqs = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in rendered]
    counts = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(counts.max())), tokenizer.pad_token_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, counts


def generate_chat(client: SplitClient, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  system_prompt: str | None = None) -> tuple[list[str], torch.Tensor]:
    """``collaborative_greedy`` on chat prompts through ``client``'s transport (in process or over the network):
    the decoded answers and the new tokens ``[B, n]``."""
    ids, counts = chat_batch(tokenizer, prompts, system_prompt)
    new = collaborative_greedy(client, ids, counts, max_new_tokens=max_new_tokens,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = [tokenizer.decode([x for x in row if x != tokenizer.pad_token_id], skip_special_tokens=True)
             for row in new.tolist()]
    return texts, new


def generate_texts(client: SplitClient, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                   system_prompt: str | None = None) -> list[str]:
    """Chat prompts (the model's template) through ``collaborative_greedy``; the decoded answers."""
    return generate_chat(client, tokenizer, prompts, max_new_tokens=max_new_tokens, system_prompt=system_prompt)[0]


def generate_rendered(client: SplitClient, tokenizer, rendered: Sequence[str], *, max_new_tokens: int,
                      batch_size: int = 16) -> list[str]:
    """Greedy answers to prompts already rendered with the chat template, through ``client`` and its server, in
    batches of similar length (the split counterpart of ``evaluation.generation.generate_batched``)."""
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    out = [""] * len(rendered)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, counts = rendered_batch(tokenizer, [rendered[i] for i in idx])
        new = collaborative_greedy(client, ids, counts, max_new_tokens=max_new_tokens,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
    return out


def evaluate_client(cfg, loaded, client: SplitClient, samples: int = 3) -> dict:
    """fedguard's safety and utility evaluation (the ``eval`` section's harmful, over-refusal and checkable
    benign prompt sets, the same refusal rule and exact match as federated runs) of ``client``'s model, decoding
    through the server. The held-out loss is measured separately (``split.eval_examples``)."""
    data = build_eval_data(cfg, loaded.tokenizer)
    data.loss_examples = []
    evaluator = Evaluator(loaded, client.seam.model, None, None, data, cfg.eval, cfg.data.system_prompt,
                          generate=lambda prompts, n: generate_rendered(client, loaded.tokenizer, prompts,
                                                                        max_new_tokens=n,
                                                                        batch_size=cfg.eval.batch_size))
    return evaluator.evaluate(None, samples=samples)
