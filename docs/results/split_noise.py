"""Two questions about FedSEA's relative noise on h_A, SmolLM2-135M-Instruct (frozen model, no training).

    FEDGUARD_CACHE=.cache/fedguard .venv/bin/python docs/results/split_noise.py [--part dp|shapes]

``--part dp``: what the noise would be worth as differential privacy. Suppose each training sequence's h_A (its real tokens, all H dimensions) were clipped to L2 norm C before the
noise, with C the median unclipped norm (so most sequences keep their values). Replacing one sequence then moves
the release by at most 2C, and noise of per-element std sigma is a Gaussian mechanism of multiplier
z = sigma / 2C per step; a client's run is ``steps`` Poisson-sampled steps at q = batch / examples. This prints,
for the settings of docs/results/split_inversion.py (k_a 1, 2, 4; 320 examples, batch 4, 20 steps, delta 1e-5),
the epsilon of r = 1, 2, 4 (sigma = r · mean|h_A| · sqrt(pi/2), as ``split.noise`` draws it) and the r that
epsilon 8 and 100 would need. Norms are measured on the frozen model (the victim's first 64 sequences).

``--part shapes``: whether another shape of noise costs less utility at the same mean|noise|. The completion
loss of the frozen split model (k_a 2, k_c 2) on the 32 held-out examples of docs/results/split_inversion.py,
with r = 0.5, 1, 2 of: isotropic noise (``split.noise``); no noise on the outlier dimensions (mean|h| over the
batch > 5x the median dimension's); isotropic noise, then each position rescaled to its clean norm; noise per
dimension proportional to that dimension's mean|h| (same mean|noise|). One fixed noise seed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from fedguard.config import build_config  # noqa: E402


def noise_shape(h: torch.Tensor, valid: torch.Tensor, r: float, shape: str, g: torch.Generator) -> torch.Tensor:
    sigma = r * float(h[valid].abs().mean()) * math.sqrt(math.pi / 2)
    eps = torch.randn(h.shape, generator=g) * sigma
    dim_mean = h[valid].abs().mean(0)
    if shape == "isotropic":
        return h + eps
    if shape == "no noise on outlier dims":
        eps[..., dim_mean > 5 * dim_mean.median()] = 0
        return h + eps
    if shape == "norm kept":
        out = h + eps
        return out * (h.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True))
    if shape == "per-dimension scale":
        return h + eps * (dim_mean / dim_mean.mean())
    raise ValueError(shape)


def shapes(args, loaded) -> None:
    from fedguard.model.blocks import BlockSeam, padding_mask_from_counts
    from fedguard.split.client import completion_loss, count_batches
    from fedguard.split.train import eval_examples

    cfg = build_config({"name": "split-noise", "seed": 2023, "model": {"name_or_path": args.model},
                        "data": {"source": "builtin:benign", "max_length": 256},
                        "federation": {"num_clients": 2, "clients_per_round": 2},
                        "split": {"k_a": 2, "k_c": 2, "eval_examples": 32}})
    seam = BlockSeam(loaded.model, 2, 2)
    pad = loaded.tokenizer.pad_token_id
    ev = eval_examples(cfg, loaded.tokenizer)
    batches = count_batches(ev, pad, 8)
    print("\n| noise shape | r | held-out loss (frozen model) |\n|---|---:|---:|")
    with torch.no_grad():
        for shape in ("isotropic", "no noise on outlier dims", "norm kept", "per-dimension scale"):
            for r in ((0.0,) if shape == "isotropic" else ()) + (0.5, 1.0, 2.0):
                g = torch.Generator().manual_seed(2023)
                total, count = 0.0, 0
                for batch, counts in batches:
                    h = seam.front(batch.input_ids, counts).float()
                    if r:
                        valid = padding_mask_from_counts(counts, h.shape[1], h.shape[0], h.device)
                        h = noise_shape(h, valid, r, shape, g)
                    loss, n = completion_loss(seam, seam.back(seam.middle(h, counts), counts), batch)
                    total += float(loss)
                    count += n
                print(f"| {shape} | {r:g} | {total / count:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("dp", "shapes", "all"), default="all")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--k-a", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--examples", type=int, default=320)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--delta", type=float, default=1e-5)
    args = p.parse_args()
    torch.set_num_threads(2)

    from fedguard.model import load_base_model

    loaded = load_base_model(build_config({"name": "split-noise", "model": {"name_or_path": args.model,
                                                                             "precision": "fp32"}}).model)
    if args.part in ("dp", "all"):
        activation_dp(args, loaded)
    if args.part in ("shapes", "all"):
        shapes(args, loaded)


def activation_dp(args, loaded) -> None:
    from fedguard.data.federation import build_client_data
    from fedguard.model.blocks import BlockSeam
    from fedguard.privacy.accountant import epsilon, noise_for_epsilon
    from fedguard.split.client import count_batches

    cfg = build_config({
        "name": "split-activation-dp", "seed": 2023,
        "model": {"name_or_path": args.model, "precision": "fp32"},
        "data": {"source": "builtin:benign", "examples_per_client": args.examples, "refusal_share": 0.0,
                 "partition": {"method": "iid"}, "max_length": 256},
        "federation": {"num_clients": 2, "clients_per_round": 2},
    })
    examples = build_client_data(cfg, loaded.tokenizer)[1].examples[:64]
    pad = loaded.tokenizer.pad_token_id
    q = args.batch / args.examples
    print(f"q {q:g}, {args.steps} steps, delta {args.delta:g}; clip C = the median L2 norm of a sequence's h_A\n")
    print("| k_a | mean abs h_A | median L2 norm of a sequence's h_A | r | z = sigma/2C | epsilon | r for epsilon 8 | "
          "r for epsilon 100 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k_a in args.k_a:
        seam = BlockSeam(loaded.model, k_a, 2)
        norms, abs_sum, n = [], 0.0, 0
        with torch.no_grad():
            for batch, counts in count_batches(examples, pad, 8):
                h = seam.front(batch.input_ids, counts).float()
                for j, c in enumerate(counts.tolist()):
                    norms.append(float(h[j, :c].norm()))
                    abs_sum += float(h[j, :c].abs().sum())
                    n += c * h.shape[-1]
        clip, mean_abs = float(torch.tensor(norms).median()), abs_sum / n
        needed = {e: noise_for_epsilon(e, args.steps, q, args.delta) * 2 * clip / (mean_abs * math.sqrt(math.pi / 2))
                  for e in (8.0, 100.0)}
        for r in (1.0, 2.0, 4.0):
            z = r * mean_abs * math.sqrt(math.pi / 2) / (2 * clip)
            eps = epsilon([(q, z, args.steps)], args.delta)
            print(f"| {k_a} | {mean_abs:.3f} | {clip:.0f} | {r:g} | {z:.4f} | {eps:.2g} | {needed[8.0]:.0f} | "
                  f"{needed[100.0]:.0f} |")


if __name__ == "__main__":
    main()
