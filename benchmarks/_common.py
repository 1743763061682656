"""Shared pieces of the benchmarks: the model, same-for-everyone data, the machine's matmul peak."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("FEDGUARD_CACHE", str(REPO / ".cache" / "fedguard"))


def matmul_peak_gflops(dtype: torch.dtype = torch.bfloat16, sizes=(1024, 2048, 3072), repeats: int = 5) -> float:
    """Best observed dense matmul throughput on this machine (GFLOP/s), measured now."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def long_examples(tokenizer, n: int, seq_len: int, seed: int = 0):
    """``n`` tokenised examples of exactly ``seq_len`` tokens: half prompt, half completion.

    Each prompt lists built-in benign questions and its completion answers them in order, so the
    data is the same real text for every method and every sequence fills the length.
    """
    from fedguard.data.builtin import benign_pool
    from fedguard.data.schema import Example, chat
    from fedguard.data.tokenize import TokenizedExample, render_example

    pool = benign_pool(seed, 40 * n)
    out = []
    for i in range(n):
        qa = pool[40 * i: 40 * (i + 1)]
        prompt = "Answer each question on its own line.\n" + "\n".join(f"{j + 1}. {e.prompt_text}" for j, e in enumerate(qa))
        answer = "\n".join(f"{j + 1}. {e.completion}" for j, e in enumerate(qa))
        p_text, c_text = render_example(tokenizer, Example(chat(prompt, answer)))
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"][-(seq_len // 2):]
        c_ids = tokenizer(c_text, add_special_tokens=False)["input_ids"][: seq_len - len(p_ids)]
        out.append(TokenizedExample(tuple(p_ids) + tuple(c_ids), len(p_ids)))
        assert len(out[-1].input_ids) == seq_len
    return out
