"""Chat-template rendering, completion-only masking, truncation and batching.

Examples are tokenised once, when the federation is built; a training step only pads ids that
already exist. Batches are right-padded so that, under causal attention, padding never affects a
real position: training runs without an attention mask (the fast causal path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedguard.data.schema import Example


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    prompt_len: int  # loss is on tokens [prompt_len:]

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def with_system(messages, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = list(messages)
    if system_prompt and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def render_prompt(tokenizer, messages, system_prompt: str | None = None) -> str:
    """The generation prompt for a chat (the model's own chat template)."""
    return tokenizer.apply_chat_template(with_system(messages, system_prompt), tokenize=False, add_generation_prompt=True)


def render_example(tokenizer, example: Example, system_prompt: str | None = None) -> tuple[str, str]:
    """(prompt text, completion text); the completion ends with the template's end-of-turn token."""
    if example.completion is None:
        raise ValueError("example has no assistant completion")
    msgs = with_system(example.messages, system_prompt)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    completion = full[len(prompt):]
    eos = tokenizer.eos_token
    if eos and eos in completion:  # drop whatever the template adds after the end-of-turn token
        completion = completion[: completion.rindex(eos) + len(eos)]
    return prompt, completion


def tokenize_example(tokenizer, example: Example, max_length: int, truncation: str = "prompt_left",
                     system_prompt: str | None = None) -> TokenizedExample | None:
    """Tokenise with the completion-only boundary; None if no completion token survives truncation."""
    prompt, completion = render_example(tokenizer, example, system_prompt)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not c_ids:
        return None
    if len(p_ids) + len(c_ids) > max_length:
        if truncation == "prompt_left":
            # Keep the whole completion when possible and the end of the prompt (nearest the answer).
            keep_prompt = max(max_length - len(c_ids), min(len(p_ids), max_length // 4))
            p_ids = p_ids[len(p_ids) - keep_prompt:] if keep_prompt > 0 else []
            c_ids = c_ids[: max_length - len(p_ids)]
        else:
            total = (p_ids + c_ids)[:max_length]
            p_ids, c_ids = total[: min(len(p_ids), max_length)], total[len(p_ids):]
    if not c_ids:
        return None
    return TokenizedExample(tuple(p_ids) + tuple(c_ids), len(p_ids))


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L], right-padded
    target_positions: torch.Tensor  # [N, 2] (row, position) whose logits predict a completion token
    targets: torch.Tensor  # [N]
    num_tokens: int  # real (unpadded) tokens in the batch

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.target_positions.to(device), self.targets.to(device), self.num_tokens)


def collate(examples: Sequence[TokenizedExample], pad_id: int, multiple_of: int = 8) -> Batch:
    """Right-pad to the longest example (rounded up), and list the positions that carry loss."""
    longest = max(len(e.input_ids) for e in examples)
    length = -(-longest // multiple_of) * multiple_of
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    rows, cols, tgts = [], [], []
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        # The logit at position t predicts token t+1: completion tokens t+1 >= prompt_len.
        start = max(e.prompt_len - 1, 0)
        pos = torch.arange(start, n - 1)
        rows.append(torch.full_like(pos, i))
        cols.append(pos)
        tgts.append(ids[i, pos + 1])
    positions = torch.stack([torch.cat(rows), torch.cat(cols)], dim=1)
    return Batch(ids, positions, torch.cat(tgts), sum(len(e.input_ids) for e in examples))
