"""Fast batched greedy decoding with the KV cache (the evaluation path)."""

from __future__ import annotations

import torch

from fedguard.model.loading import LoadedModel


@torch.inference_mode()
def generate_batched(loaded: LoadedModel, model, prompts: list[str], max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy completions of ``prompts`` (already rendered with the chat template).

    Prompts are sorted by length so each batch carries little padding, left-padded (so every row
    continues from its last token), and decoded with the KV cache until every row has stopped.
    """
    if not prompts:
        return []
    tok = loaded.tokenizer
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            longest = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), longest), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), longest), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = encoded[i]
                ids[row, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, longest - len(seq):] = 1
            with loaded.autocast():
                gen = model.generate(
                    input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                    max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    temperature=None, top_p=None, top_k=None,
                )
            for row, i in enumerate(idx):
                out[i] = tok.decode(gen[row, longest:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out
