"""Inverter-aware (adversarial) training of the client's front against the inversion attack, SmolLM2-135M-Instruct.

    FEDGUARD_CACHE=.cache/fedguard .venv/bin/python docs/results/split_adversary.py --out runs/split-adversary

A protection that targets the attack itself rather than a statistic (NoPeek's distance correlation): each
client keeps a local linear inverter P (h_A -> its token, the whole vocabulary), retrains it for ``--inner``
Adam steps on every step's detached h_A, and its front adds ``-w * min(CE(P(h_A), tokens), 8)``, pushing the
hidden states it sends towards ones its own inverter cannot read. Measured with the same cell as
docs/results/split_inversion.py (k_a 2, no noise; the colluder trains with the same protection, as it would
in a federation where everyone runs it) and a fresh attacker. A measurement, not a fedguard option: it does
not lower recovery (see split-inversion-smollm2.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "docs" / "results"))

import torch  # noqa: E402

import split_inversion as si  # noqa: E402

from fedguard.seeding import derive_seed  # noqa: E402


class InverterAdversary:
    """One client's local inverter and the front penalty it gives (a ``SplitClient.front_penalty``)."""

    def __init__(self, client, weight: float, inner: int, lr: float = 1e-2, cap: float = 8.0):
        self.weight, self.inner, self.cap = weight, inner, cap
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(client.cfg.seed, "split-adversary", client.id))
            self.probe = torch.nn.Linear(client.hidden_size, client.seam.config.vocab_size)
        self.opt = torch.optim.Adam(self.probe.parameters(), lr=lr)

    def __call__(self, ids, h_a, counts, step, stats):
        from fedguard.model.blocks import padding_mask_from_counts

        valid = padding_mask_from_counts(counts, ids.shape[1], ids.shape[0], ids.device)
        tok, z = ids[valid], h_a[valid].float()
        with torch.enable_grad():
            for _ in range(self.inner):
                loss = torch.nn.functional.cross_entropy(self.probe(z.detach()), tok)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
        self.probe.requires_grad_(False)
        ce = torch.nn.functional.cross_entropy(self.probe(z), tok)
        self.probe.requires_grad_(True)
        stats["adversary_ce"] = float(ce.detach())
        return -self.weight * torch.clamp(ce, max=self.cap)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "split-adversary")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--inner", type=int, default=5, help="Adam steps of the local inverter per training step")
    args = p.parse_args()
    cell_args = si.parser().parse_args([])  # the cells of split_inversion.py, at its defaults
    torch.set_num_threads(2)
    (args.out / "cells").mkdir(parents=True, exist_ok=True)
    resident = None
    for w in args.weights:
        path = args.out / "cells" / f"ka2-adv{w:g}-inner{args.inner}.json"
        if path.exists():
            res = json.loads(path.read_text())
        else:
            resident = resident or si.Resident(si.make_cfg(cell_args, 1, 0.0, 0.0))
            t0 = time.perf_counter()
            res = si.run_cell(cell_args, resident, 2, 0.0, 0.0,
                              front_penalty=lambda c, w=w: InverterAdversary(c, w, args.inner))
            res["adversary"] = {"weight": w, "inner": args.inner}
            path.write_text(json.dumps(res, indent=1))
            print(f"w {w:g}: {time.perf_counter() - t0:.0f} s", flush=True)
        tt, inf = res["train_time"], res["inference_time"]
        print(f"| 2 | inverter-aware w {w:g} | {res['eval_loss']:.3f} | {si.pct(tt['linear']['token_recovery'])} | "
              f"{si.pct(tt['decoder']['token_recovery'])} | {si.pct(inf['linear']['token_recovery'])} | "
              f"{si.pct(inf['decoder']['token_recovery'])} |", flush=True)


if __name__ == "__main__":
    main()
