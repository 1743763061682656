"""The colluding-client inversion attack on FedSEA-style split learning, SmolLM2-135M-Instruct, against noise,
partition point and NoPeek.

    FEDGUARD_CACHE=.cache/fedguard .venv/bin/python docs/results/split_inversion.py --out runs/split-inversion

Per cell (k_a, relative noise r, NoPeek weight w): a fresh LoRA (r 8 / α 16 on q/v, dropout 0.05) on the split
model (k_c = 2), two clients with disjoint iid halves of the built-in benign corpus (client 0 the colluder,
client 1 the victim), ``--steps`` split training steps each (batch 4, interleaved, sequential server), then:

* utility: the victim's held-out completion loss through the server (clean, as at inference) on ``--eval``
  examples of the corpus' held-out split;
* the attack (``fedguard.split.attacks``): the server trains a linear probe and a 1-block transformer decoder on
  the colluder's pairs (80 % of its sequences; the other 20 % are the same-A control) and reconstructs
  - *training time*: the victim's training messages exactly as the server received them (noised), the inverters
    trained on the colluder's noised messages (``--draws`` fresh noise draws of its data, its final front);
  - *inference time*: the victim's clean prefill hidden states of all its sequences, the inverters trained on
    the colluder's clean ones.
  Token recovery and ROUGE-L are scored after the chat-template header every sequence shares (system prompt and
  the user turn's opening); the positional prior is the same attack without hidden states.

Cells are written to ``OUT/cells/*.json`` as they finish; a rerun reads finished cells back. The table goes to
stdout and to ``docs/results/split-inversion-smollm2.md`` (a "## Reading" section already there is kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from fedguard.config import build_config  # noqa: E402
from fedguard.split.attacks import HiddenSet, SentRecorder, client_hidden, inversion_attack  # noqa: E402
from fedguard.split.protections import nopeek_penalty  # noqa: E402

DOC = REPO / "docs" / "results" / "split-inversion-smollm2.md"

# (k_a, r, nopeek weight): the noise grid at every partition point, then NoPeek alone and with noise
NOISES = (0.0, 0.5, 1.0, 2.0)


def cells(k_as, nopeek_weight: float, nopeek_noise: float) -> list[tuple[int, float, float]]:
    out = [(k, r, 0.0) for k in k_as for r in NOISES]
    out += [(k, 0.0, nopeek_weight) for k in k_as]
    out += [(k, nopeek_noise, nopeek_weight) for k in k_as]
    return out


def cell_name(k_a: int, r: float, w: float) -> str:
    return f"ka{k_a}-r{r:g}-w{w:g}"


def parse_cell(name: str) -> tuple[int, float, float]:
    m = re.fullmatch(r"ka(\d+)-r([\d.]+)-w([\d.]+)", name)
    if not m:
        raise SystemExit(f"--extra: cell names look like ka2-r4-w0, got {name!r}")
    return int(m[1]), float(m[2]), float(m[3])


def make_cfg(args, k_a: int, r: float, w: float):
    return build_config({
        "name": "split-inversion", "seed": 2023,
        "model": {"name_or_path": args.model, "precision": args.precision, "num_threads": args.threads},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "init_seed": 2023},
        "data": {"source": "builtin:benign", "examples_per_client": args.examples, "refusal_share": 0.0,
                 "partition": {"method": "iid"}, "max_length": 256},
        "federation": {"num_clients": 2, "clients_per_round": 2},
        "train": {"batch_size": 4, "lr": args.lr, "lr_schedule": "constant", "weight_decay": 0.0,
                  "max_grad_norm": 1.0},
        "eval": {"batch_size": 8},
        "split": {"k_a": k_a, "k_c": 2, "mode": "sequential", "steps": args.steps, "eval_examples": args.eval,
                  "noise": {"mode": "relative" if r else "off", "scale": r},
                  "nopeek": {"weight": w}, "wire_dtype": "fp32"},
    })


class Resident:
    """The base model and its LoRA, loaded once; every cell starts from the same LoRA values."""

    def __init__(self, cfg):
        from fedguard.alignment import load_start_model
        from fedguard.model import attach_lora

        self.loaded = load_start_model(cfg.model)
        self.peft_model, self.slot = attach_lora(self.loaded.model, cfg.lora)
        self.theta0 = {k: v.clone() for k, v in self.slot.read().items()}

    def reset(self, system=None) -> None:
        if system is not None:  # put the model's own LoRA parameters back in every layer the cell swapped
            for bank in (*system.banks, system.server.lora):
                bank.restore()
        self.slot.load(self.theta0)


def run_cell(args, resident: Resident, k_a: int, r: float, w: float, front_penalty=None) -> dict:
    """One row. ``front_penalty(client)``, when given, makes each client's extra front loss (instead of
    ``split.nopeek``; docs/results/split_adversary.py)."""
    from fedguard.data.federation import build_client_data
    from fedguard.split.client import count_batches
    from fedguard.split.train import BatchStream, eval_examples, build_split_system

    cfg = make_cfg(args, k_a, r, w)
    t0 = time.perf_counter()
    resident.reset()
    loaded = resident.loaded
    system = build_split_system(cfg, loaded, resident.peft_model, client_ids=["colluder", "victim"])
    try:
        pad = loaded.tokenizer.pad_token_id
        data = build_client_data(cfg, loaded.tokenizer)
        colluder, victim = system.clients
        recorder = SentRecorder(system.transport)
        for c in system.clients:
            c.transport = recorder
            if front_penalty is not None:
                c.front_penalty = front_penalty(c)
            c.hello()
        streams = [BatchStream(d.examples, cfg.train.batch_size, pad, cfg.seed, c.id)
                   for c, d in zip(system.clients, data)]
        eval_set = eval_examples(cfg, loaded.tokenizer)
        eval_batches = count_batches(eval_set, pad, 8)
        victim_batches, logs = [], {"colluder": [], "victim": []}
        for step in range(1, cfg.split.steps + 1):
            for c, stream in zip(system.clients, streams):
                batch = stream.next()
                m = c.train_step(*batch, step)
                logs[c.id].append(m)
                if c is victim:
                    victim_batches.append(batch)
        t_train = time.perf_counter() - t0
        eval_loss = victim.evaluate(eval_batches)
        t_eval = time.perf_counter() - t0 - t_train

        cb, vb = count_batches(data[0].examples, pad, 8), count_batches(data[1].examples, pad, 8)
        with torch.no_grad():
            clean_c = client_hidden(colluder, cb)
            noisy_c = client_hidden(colluder, cb, noise=True, step_offset=10_000_000)
            for k in range(1, args.draws):
                more = client_hidden(colluder, cb, noise=True, step_offset=10_000_000 * (k + 1))
                noisy_c = noisy_c + more
            clean_v = client_hidden(victim, vb)
            # every row: R*(tokens, clean h_A) of the victim's final front, batches of 8 sequences
            dcors = []
            for i, (b, c) in enumerate(vb[:8]):
                h = torch.nn.utils.rnn.pad_sequence(clean_v.hidden[i * 8:i * 8 + 8], batch_first=True)
                dcors.append(float(nopeek_penalty(system.seam.decoder.embed_tokens, b.input_ids[:, :h.shape[1]], h,
                                                  c, max_tokens=512)))
        sent_v = recorder.hidden_set("victim", victim_batches)
        t_collect = time.perf_counter() - t0 - t_train - t_eval
        del recorder.records["colluder"]
        n_c = len(clean_c)
        attacker_clean, control_clean = clean_c.split(0.2)
        # the training-time attacker: every draw of the same 80 % of the colluder's sequences
        keep = [i for i in range(len(noisy_c)) if i % n_c < len(attacker_clean)]
        held = [i for i in range(n_c) if i >= len(attacker_clean)]
        attacker_noisy = HiddenSet([noisy_c.hidden[i] for i in keep], [noisy_c.ids[i] for i in keep])
        control_noisy = HiddenSet([noisy_c.hidden[i] for i in held], [noisy_c.ids[i] for i in held])
        kinds = ("linear", "decoder") if not args.no_decoder else ("linear",)
        steps = {"linear": args.probe_steps, "decoder": args.decoder_steps}
        t1 = time.perf_counter()
        train_time = inversion_attack(attacker_noisy, sent_v, kinds=kinds, control=control_noisy, steps=steps,
                                      seed=cfg.seed, d=args.decoder_width)
        t_attack_train = time.perf_counter() - t1
        inference = inversion_attack(attacker_clean, clean_v, kinds=kinds, control=control_clean, steps=steps,
                                     seed=cfg.seed, d=args.decoder_width)
        tail = max(1, cfg.split.steps // 5)
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        v = logs["victim"]
        return {
            "k_a": k_a, "r": r, "nopeek_weight": w, "steps": cfg.split.steps, "eval_loss": eval_loss,
            "train_loss_first": v[0]["loss"], "train_loss_last_mean": mean([m["loss"] for m in v[-tail:]]),
            "mean_abs_h_last": mean([m["mean_abs_h"] for m in v[-tail:]]),
            "nopeek_dcor_first": v[0].get("nopeek_dcor"), "dcor_clean_after": mean(dcors),
            "nopeek_dcor_last_mean": mean([m["nopeek_dcor"] for m in v[-tail:] if "nopeek_dcor" in m]),
            "train_time": train_time, "inference_time": inference,
            "seconds": {"train": t_train, "eval": t_eval, "collect": t_collect, "attack_train_time": t_attack_train,
                        "attack_inference": time.perf_counter() - t1 - t_attack_train,
                        "total": time.perf_counter() - t0},
        }
    finally:
        resident.reset(system)


def base_eval(args, resident: Resident) -> float:
    """The held-out loss before any training (the same for every cell; k_a does not change the model)."""
    from fedguard.split.client import count_batches
    from fedguard.split.train import eval_examples, build_split_system

    cfg = make_cfg(args, 1, 0.0, 0.0)
    resident.reset()
    system = build_split_system(cfg, resident.loaded, resident.peft_model, client_ids=["victim"])
    try:
        system.clients[0].hello()
        pad = resident.loaded.tokenizer.pad_token_id
        ev = eval_examples(cfg, resident.loaded.tokenizer)
        return system.clients[0].evaluate(count_batches(ev, pad, 8))
    finally:
        resident.reset(system)


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(results: list[dict], base_loss: float | None) -> str:
    lines = [
        "| k_a | protection | r | NoPeek w | held-out loss | dCor after | train-time: linear % | decoder % | "
        "ROUGE-L | prior % | inference: linear % | decoder % | ROUGE-L | same-A ctrl % |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results = sorted(results, key=lambda x: (x["k_a"], x["nopeek_weight"] > 0, x["nopeek_weight"], x["r"]))
    if base_loss is not None:
        lines.append(f"| – | before training | – | – | {base_loss:.3f} | – | – | – | – | – | – | – | – | – |")
    for x in results:
        name = ("none" if not x["r"] else "noise") if not x["nopeek_weight"] else \
            ("NoPeek" if not x["r"] else "NoPeek + noise")
        tt, inf = x["train_time"], x["inference_time"]
        rouge = lambda a: max(a[k]["rouge_l"] for k in ("linear", "decoder") if k in a)  # noqa: E731
        dec = lambda a: pct(a["decoder"]["token_recovery"]) if "decoder" in a else "–"  # noqa: E731
        dcor = x.get("dcor_clean_after")
        lines.append(
            f"| {x['k_a']} | {name} | {x['r']:g} | {x['nopeek_weight']:g} | {x['eval_loss']:.3f} | "
            f"{'–' if dcor is None else f'{dcor:.3f}'} | {pct(tt['linear']['token_recovery'])} | {dec(tt)} | "
            f"{rouge(tt):.3f} | {pct(tt['prior']['token_recovery'])} | {pct(inf['linear']['token_recovery'])} | "
            f"{dec(inf)} | {rouge(inf):.3f} | {pct(inf['linear'].get('control_token_recovery'))} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "split-inversion")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k-a", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=20, help="training steps per client")
    p.add_argument("--examples", type=int, default=320, help="examples per client")
    p.add_argument("--eval", type=int, default=32, help="held-out examples for the loss")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--nopeek-weight", type=float, default=10.0)
    p.add_argument("--nopeek-noise", type=float, default=1.0, help="r of the NoPeek + noise cells")
    p.add_argument("--draws", type=int, default=2, help="noise draws of the colluder's data for the attacker")
    p.add_argument("--probe-steps", type=int, default=150)
    p.add_argument("--decoder-steps", type=int, default=100)
    p.add_argument("--decoder-width", type=int, default=256)
    p.add_argument("--no-decoder", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="cell names to run (e.g. ka1-r0-w0)")
    p.add_argument("--extra", nargs="*", default=[], help="cells beyond the grid, by name (e.g. ka2-r4-w0)")
    p.add_argument("--doc", type=Path, default=DOC, help="where the markdown goes ('-': nowhere)")
    return p


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    (args.out / "cells").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wanted = cells(args.k_a, args.nopeek_weight, args.nopeek_noise)
    wanted += [parse_cell(name) for name in args.extra if parse_cell(name) not in wanted]
    if args.only is not None:
        wanted = [c for c in wanted if cell_name(*c) in args.only]
    resident = None
    base_file = args.out / "base.json"
    if base_file.exists():
        base_loss = json.loads(base_file.read_text())["eval_loss"]
    else:
        resident = Resident(make_cfg(args, 1, 0.0, 0.0))
        base_loss = base_eval(args, resident)
        base_file.write_text(json.dumps({"eval_loss": base_loss}))
    print(f"held-out loss before training: {base_loss:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = []
    for k_a, r, w in wanted:
        path = args.out / "cells" / f"{cell_name(k_a, r, w)}.json"
        if path.exists():
            res = json.loads(path.read_text())
        else:
            resident = resident or Resident(make_cfg(args, 1, 0.0, 0.0))
            res = run_cell(args, resident, k_a, r, w)
            path.write_text(json.dumps(res, indent=1))
        results.append(res)
        tt, inf = res["train_time"], res["inference_time"]
        print(f"{cell_name(k_a, r, w)}: held-out {res['eval_loss']:.3f}, train-time linear "
              f"{pct(tt['linear']['token_recovery'])} %, inference linear {pct(inf['linear']['token_recovery'])} %, "
              f"prior {pct(inf['prior']['token_recovery'])} % ({res['seconds']['total']:.0f} s; "
              f"{time.perf_counter() - t0:.0f} s so far)", flush=True)
    md = table(results, base_loss)
    print("\n" + md)
    print(f"\n{len(results)} cells, {time.perf_counter() - t0:.0f} s")
    if str(args.doc) != "-":
        write_doc(args, md, results, time.perf_counter() - t0)


def write_doc(args, md: str, results: list[dict], seconds: float) -> None:
    reading = ""
    if args.doc.exists():
        old = args.doc.read_text(encoding="utf-8")
        if "\n## Reading" in old:
            reading = old[old.index("\n## Reading"):]
    x = results[0] if results else {}
    inf = x.get("inference_time", {})
    cmd = "FEDGUARD_CACHE=.cache/fedguard .venv/bin/python docs/results/split_inversion.py --out runs/split-inversion"
    extra = [a for a in sys.argv[1:] if a not in ("--out", str(args.out))]
    if extra:
        cmd += " " + " ".join(extra)
    doc = f"""# Inversion attack on split learning: SmolLM2-135M-Instruct

Command: `{cmd}`
({time.strftime('%Y-%m-%d')}, 2-core AMD EPYC, torch {args.threads} threads, precision {args.precision}; {seconds:.0f} s
for the cells run in this invocation, finished cells are read back from `{args.out.name}/cells`).

Setup. Per row a fresh LoRA (r 8, α 16, q/v, dropout 0.05) on the split SmolLM2 (30 blocks; the clients hold the
embedding and blocks [0, k_a) and the last 2 blocks, norm and head; k_c = 2), two clients with disjoint iid halves
of the built-in benign corpus ({args.examples} examples each: client 0 colludes with the server, client 1 is the
victim), {args.steps} split training steps each (batch 4, AdamW lr {args.lr:g} constant, clipping 1.0 per part,
interleaved, sequential server). Noise: relative, mean|ε| = r · mean|h_A| of the step's batch (FedSEA's noise;
not DP, no ε). NoPeek: the client's front adds w · R*(tokens, h_A) (bias-corrected distance correlation over the
batch's real tokens, `split.nopeek`); "dCor after": R* between the victim's tokens and its clean h_A after
training (8 batches of 8 sequences, every row).
Held-out loss: the victim's completion-token loss through the server, clean, on {args.eval} held-out examples.

Attack (`fedguard.split.attacks`): the server trains inverters on the colluder's (hidden state, token) pairs, 80 %
of its sequences ({x.get('inference_time', {}).get('attacker_sequences', '?')} sequences,
{inf.get('attacker_tokens', '?')} tokens; vocabulary: the {inf.get('vocabulary', '?')} distinct tokens it saw)
and reads the victim's tokens off the victim's hidden states. Linear: a probe H → vocabulary per position
({args.probe_steps} AdamW steps); decoder: projection to {args.decoder_width}, learned positions, one bidirectional
transformer block, head ({args.decoder_steps} steps), trained from scratch: a CPU-sized stand-in for FedSEA's
k_a-block LLaMA decoder. Training time: the victim's {args.steps} training messages as the server received them
(noised), inverters trained on {args.draws} fresh noise draws of the colluder's messages. Inference time: the
victim's clean prefill states of all its sequences, inverters trained on the colluder's clean states. Scores
count the positions after the chat-template header all sequences share (the first
{inf.get('start', '?')} tokens: SmolLM2's default system prompt and the user turn's opening); victim tokens the
colluder never sent ({100 * inf.get('oov_rate', 0):.1f} % of them) count as misses. Prior: the colluder's most
frequent token at each position, no hidden state. ROUGE-L: token-level LCS F1 per sequence, the better inverter.
Same-A control: the inference-time linear probe on the colluder's own held-out 20 %.

{md}
{reading if reading else chr(10) + "## Reading" + chr(10) + chr(10) + "(to be written from the table)" + chr(10)}"""
    args.doc.write_text(doc, encoding="utf-8")
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
