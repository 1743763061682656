"""Evaluation generation: batched greedy decoding with the KV cache vs one prompt at a time.

Both use the same resident SmolLM2 model, precision, prompts (held-out harmful requests rendered with
the chat template) and max_new_tokens; tokens/s counts generated tokens up to and including EOS.

    .venv/bin/python benchmarks/bench_generation.py [--prompts 48] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from fedguard.config import LoraSettings, ModelConfig
    from fedguard.data.builtin import harmful_pool
    from fedguard.data.tokenize import render_prompt
    from fedguard.evaluation.generation import generate_batched
    from fedguard.model import attach_lora, load_base_model

    loaded = load_base_model(ModelConfig(name_or_path="smollm2-135m-instruct"))
    peft_model, _ = attach_lora(loaded.model, LoraSettings())
    tok = loaded.tokenizer
    prompts = [render_prompt(tok, e.prompt_messages) for e in harmful_pool(0, args.prompts, "none", "eval")]

    def count(texts):
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # +1: EOS or cut

    generate_batched(loaded, peft_model, prompts[:2], 4, args.batch_size)  # warm-up
    t = time.perf_counter()
    batched = generate_batched(loaded, peft_model, prompts, args.max_new_tokens, args.batch_size)
    t_batched = time.perf_counter() - t

    peft_model.eval()
    single = []
    t = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)
            with loaded.autocast():
                out = peft_model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            single.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    t_single = time.perf_counter() - t

    tps_b, tps_s = count(batched) / t_batched, count(single) / t_single
    same = sum(a == b for a, b in zip(batched, single)) / len(prompts)
    print(f"{len(prompts)} prompts, max_new_tokens={args.max_new_tokens}, precision "
          f"{str(loaded.compute_dtype).removeprefix('torch.')}, threads={torch.get_num_threads()}")
    print(f"one prompt at a time (generate): {t_single:7.1f} s  {tps_s:7.1f} tokens/s")
    print(f"fedguard batched (batch {args.batch_size}):     {t_batched:7.1f} s  {tps_b:7.1f} tokens/s")
    print(f"speed-up: {tps_b / tps_s:.2f}x tokens/s (target >= 5x); identical greedy outputs: {same:.0%}")


if __name__ == "__main__":
    main()
