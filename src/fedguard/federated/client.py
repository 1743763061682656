"""Client role: local LoRA training on one resident model.

``Client.run(instructions, local_data, client_state) -> ClientUpdate`` is the whole role: take the
downlink (FLoRA: merge the server's update into the base, re-initialise an adapter of the client's own
rank), train (``LocalTrainer``), encode what goes on the wire (compression with the client's own
error-feedback memory). ``ClientState`` is everything a client carries between the rounds it joins
(optimizer moments, error-feedback residual); the engine keeps it where its platform keeps client state
(the embedded simulation: a dict; Flower: the node's ``Context.state``).

The base model is loaded once per process. A client is simulated by loading the global adapter
tensors into the live LoRA parameters, training, and reading them back; the optimizer object is
created once and its state cleared (or swapped per client), never rebuilt per client per round.

The training step computes logits only at completion positions: the LM head and cross-entropy run on
a fraction of the tokens, and no full [batch, length, vocab] tensor is ever built.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from fedguard.data.federation import ClientData
from fedguard.data.tokenize import collate
from fedguard.federated.batches import batch_plan, sample_rate
from fedguard.federated.compression import ErrorFeedback
from fedguard.federated.lora_exact import lora_scaling, merge_delta, reinit_adapter
from fedguard.federated.transport import WireSpec, encode_update
from fedguard.messages import AdapterState, ClientUpdate, Instructions, RoundConfig
from fedguard.model.keys import is_lora_a
from fedguard.model.loading import LoadedModel
from fedguard.model.loss import CompletionLoss
from fedguard.model.lora import AdapterSlot, embed_rank
from fedguard.privacy.accountant import epsilon
from fedguard.privacy.client_dp import privatize_update
from fedguard.privacy.dpsgd import PrivateSteps, empty_step
from fedguard.seeding import derive_seed, torch_generator


def _with_proximal_term(objective, mu: float, anchor: AdapterState, params: dict[str, torch.nn.Parameter]):
    """FedProx (Li et al. 2020): ``objective`` plus mu/2 ||w - w_global||^2 over the trainable LoRA
    parameters, anchored at the round-start global adapter; ``objective`` itself when mu is 0."""
    if not mu:
        return objective
    anchors = {k: anchor[k].detach().to(device=p.device, dtype=p.dtype) for k, p in params.items()}

    def objective_with_proximal(live: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        proximal = 0.5 * mu * sum((p - anchors[k]).square().sum() for k, p in live.items())
        return proximal if objective is None else objective(live) + proximal

    return objective_with_proximal


class LocalTrainer:
    """Runs the client role for any client on the one resident model."""

    def __init__(self, loaded: LoadedModel, peft_model, slot: AdapterSlot, keep_optimizer_state: bool = False):
        self.loaded = loaded
        self.model = peft_model
        self.slot = slot
        self.loss = CompletionLoss(loaded, peft_model)
        self.keep_optimizer_state = keep_optimizer_state
        self.params = slot.named_parameters()
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=1e-4, weight_decay=0.0, foreach=True)
        self.client_optimizer_states: dict[str, dict[str, torch.Tensor]] = {}
        self.pad_id = loaded.tokenizer.pad_token_id
        self.private_steps = None  # Opacus' per-example gradients, set up on the first DP-SGD round

    def _private(self):
        if self.private_steps is None:
            self.private_steps = PrivateSteps(self.model)
        return self.private_steps

    # -- optimizer state per client (kept across rounds when configured) --------------------------
    @contextmanager
    def holding(self, client_id: str, moments: dict[str, torch.Tensor]) -> Iterator[dict[str, dict]]:
        """Train with one client's optimizer moments (a ``ClientState``'s) instead of this trainer's store;
        yields the store, where the client's new moments are once the block ends."""
        outer = self.client_optimizer_states
        self.client_optimizer_states = {str(client_id): moments} if moments else {}
        try:
            yield self.client_optimizer_states
        finally:
            self.client_optimizer_states = outer

    def _restore_optimizer(self, client_id: str) -> None:
        self.optimizer.state.clear()
        saved = self.client_optimizer_states.get(client_id) if self.keep_optimizer_state else None
        if not saved:
            return
        for key, p in self.params.items():
            if f"{key}::step" not in saved:  # never stepped (FFA-LoRA's frozen A)
                continue
            self.optimizer.state[p] = {
                "step": saved[f"{key}::step"].clone(),
                "exp_avg": saved[f"{key}::exp_avg"].clone().to(p.device),
                "exp_avg_sq": saved[f"{key}::exp_avg_sq"].clone().to(p.device),
            }

    def _save_optimizer(self, client_id: str) -> None:
        if not self.keep_optimizer_state:
            return
        out = {}
        for key, p in self.params.items():
            st = self.optimizer.state.get(p)
            if st:
                out[f"{key}::step"] = torch.as_tensor(st["step"], dtype=torch.float32).detach().cpu().clone()
                out[f"{key}::exp_avg"] = st["exp_avg"].detach().cpu().clone()
                out[f"{key}::exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().clone()
        self.client_optimizer_states[client_id] = out

    # -- the client role ---------------------------------------------------------------------------
    def train(self, global_adapter: AdapterState, rc: RoundConfig, data: ClientData,
              on_step: Callable[[int, float], None] | None = None,
              objective: Callable[[dict[str, torch.nn.Parameter]], torch.Tensor] | None = None,
              theta0: AdapterState | None = None) -> ClientUpdate:
        """Local training from ``global_adapter``; ``objective`` adds a term to the loss (used only by
        simulated attackers); ``theta0`` is the fixed initial adapter, needed when the round asks for a
        shadow branch."""
        client_id = str(data.client_id)
        t0 = time.perf_counter()
        n = len(data.examples)
        private = rc.dpsgd_clip is not None
        plan = batch_plan(rc, n, client_id)  # the batch sampler is a part: Poisson batches under DP-SGD
        q = sample_rate(rc.batch_size, rc.grad_accum, n)

        self.slot.load(global_adapter)
        # FFA-LoRA: a frozen A gets no gradient, so AdamW (decay included) never touches it.
        self.slot.set_lora_a_trainable(rc.train_lora_a)
        self._restore_optimizer(client_id)
        attachments: dict[str, torch.Tensor] = {}
        snap = (lambda t: self._snapshot(attachments, f"step/{t}", rc.snapshot_keys, global_adapter)) \
            if rc.snapshot_steps else None
        # Per (round, client) streams: batches and LoRA dropout are the same whether or not the run resumed.
        torch.manual_seed(derive_seed(rc.seed, "dropout", rc.server_round, client_id))
        main_objective = _with_proximal_term(objective, rc.proximal_mu, global_adapter, self.params)
        if private:  # the optimizer is a part too: Opacus' DPOptimizer around the same AdamW
            noise = torch_generator(rc.seed, "dpsgd-noise", rc.server_round, client_id)
            with self._private().active(self.optimizer, rc.dpsgd_clip, rc.dpsgd_noise_multiplier, q * n,
                                        noise) as dp:
                losses, tokens, targets = self._run_steps(data, plan, rc, rc.lr, on_step, main_objective, snap, dp)
        else:
            losses, tokens, targets = self._run_steps(data, plan, rc, rc.lr, on_step, main_objective, snap)
        self._save_optimizer(client_id)
        tensors = self.slot.read()
        train_seconds = time.perf_counter() - t0

        if rc.shadow_steps:
            if theta0 is None:
                raise ValueError("the round asks for a shadow branch but the client has no θ₀")
            # Shadow branch (Safe-FedLLM shadow level): the same round data from the fixed θ₀, probed
            # step by step; its weights are never sent for aggregation.
            self.slot.load(theta0)
            self.optimizer.state.clear()
            torch.manual_seed(derive_seed(rc.seed, "shadow-dropout", rc.server_round, client_id))
            self._run_steps(data, plan[: rc.shadow_steps], rc, rc.shadow_lr, None, objective,
                            lambda t: self._snapshot(attachments, f"shadow/{t}", rc.snapshot_keys, theta0))
        finite = [x for x in losses if x is not None]  # a DP-SGD step no example joined has no loss
        nan = float("nan")
        metrics = {
            "train_loss": sum(finite) / len(finite) if finite else nan,
            "train_loss_first": finite[0] if finite else nan,
            "train_loss_last": finite[-1] if finite else nan,
            "tokens": float(tokens),
            "completion_tokens": float(targets),
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        if private:  # what the client's accountant needs: steps at this sampling rate and noise
            metrics.update(dpsgd_sample_rate=q, dpsgd_steps=float(rc.local_steps),
                           dpsgd_noise_multiplier=float(rc.dpsgd_noise_multiplier))
        return ClientUpdate(client_id=client_id, tensors=tensors, num_examples=n, metrics=metrics,
                            attachments=attachments)

    def _snapshot(self, out: dict[str, torch.Tensor], prefix: str, keys, reference: AdapterState) -> None:
        with torch.no_grad():
            for k in keys:
                out[f"{prefix}/{k}"] = (self.params[k].detach().float().cpu() - reference[k]).contiguous()

    def _run_steps(self, data: ClientData, plan, rc: RoundConfig, lr: float, on_step, objective, after_step,
                   dp=None) -> tuple[list[float | None], int, int]:
        """One optimizer step per entry of ``plan`` (its physical batches). Without ``dp``: the loss is the mean
        over all completion tokens of the step, the gradient clipped to ``rc.max_grad_norm``. With ``dp`` (an
        Opacus DPOptimizer): per-example losses, each physical batch's per-example gradients clipped and
        accumulated, noise added once per step, the data-free ``objective`` (FedProx) added after the noise."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = rc.weight_decay
        self.model.train()
        device = self.loaded.device
        step_losses: list[float | None] = []
        tokens, targets_seen = 0, 0
        for step, micro in enumerate(plan):
            batches = [collate([data.examples[i] for i in idx], self.pad_id).to(device) for idx in micro if len(idx)]
            n_targets = sum(b.targets.numel() for b in batches)  # mean over all completion tokens of the step
            step_loss, examples = 0.0, 0
            for i, b in enumerate(batches):
                if dp is None:
                    loss_sum, _ = self.loss(b)
                    (loss_sum / n_targets).backward()
                    step_loss += float(loss_sum.detach())
                else:
                    loss_mean, count = self.loss(b, per_example=True)
                    loss_mean.backward()
                    step_loss += float(loss_mean.detach()) * count
                    examples += count
                    if i < len(batches) - 1:  # only accumulate this physical batch's clipped gradients
                        dp.signal_skip_step(do_skip=True)
                        dp.step()
                        dp.zero_grad(set_to_none=True)
                tokens += b.num_tokens
            if dp is None:
                if objective is not None:
                    objective(self.params).backward()
                if rc.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params.values(), rc.max_grad_norm, foreach=True)
                self.optimizer.step()
                step_losses.append(step_loss / n_targets if n_targets else None)
            else:
                if not batches:
                    empty_step(dp)
                if dp.pre_step():  # clip, sum, noise, divide by the expected batch
                    if objective is not None:  # no data in it: added after the noise, costs no privacy
                        objective(self.params).backward()
                    self.optimizer.step()
                dp.zero_grad(set_to_none=True)
                step_losses.append(step_loss / examples if examples else None)
            self.optimizer.zero_grad(set_to_none=True)
            targets_seen += n_targets
            if after_step is not None:
                after_step(step + 1)
            if on_step is not None:
                on_step(step + 1, step_losses[-1] if step_losses[-1] is not None else float("nan"))
        return step_losses, tokens, targets_seen


# -- the client role ---------------------------------------------------------------------------------------
OPTIMIZER_PREFIX = "optimizer/"
RESIDUAL_PREFIX = "residual/"
DPSGD_KEY = "dpsgd/history"


@dataclass
class ClientState:
    """What one client keeps between the rounds it joins: its AdamW moments (``train.optimizer_state:
    keep``), its error-feedback residual (compression with ``error_feedback``) and its DP-SGD history (one row
    (sample rate, noise multiplier, steps) per round it trained in, for its own accountant). Tensors only, so
    a Flower ``Context.state`` (or a checkpoint) holds ``state_dict()`` as it is."""

    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    dpsgd: torch.Tensor | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{OPTIMIZER_PREFIX + k: t for k, t in self.optimizer.items()},
                **{RESIDUAL_PREFIX + k: t for k, t in self.residual.items()},
                **({DPSGD_KEY: self.dpsgd} if self.dpsgd is not None else {})}

    @classmethod
    def from_state_dict(cls, flat: Mapping[str, torch.Tensor]) -> ClientState:
        unknown = [k for k in flat if not k.startswith((OPTIMIZER_PREFIX, RESIDUAL_PREFIX)) and k != DPSGD_KEY]
        if unknown:
            raise ValueError(f"client state has unknown entries (e.g. {unknown[0]!r})")
        history = flat.get(DPSGD_KEY)
        if history is not None and (history.dim() != 2 or history.shape[1] != 3):
            raise ValueError(f"client state {DPSGD_KEY!r} must have shape [rounds, 3], not {tuple(history.shape)}")
        return cls({k[len(OPTIMIZER_PREFIX):]: t for k, t in flat.items() if k.startswith(OPTIMIZER_PREFIX)},
                   {k[len(RESIDUAL_PREFIX):]: t for k, t in flat.items() if k.startswith(RESIDUAL_PREFIX)},
                   history)

    def account_dpsgd(self, metrics: Mapping[str, float], delta: float) -> float:
        """Add one round of DP-SGD (from the trainer's metrics) to the history; the client's epsilon so far."""
        row = torch.tensor([[metrics["dpsgd_sample_rate"], metrics["dpsgd_noise_multiplier"],
                             metrics["dpsgd_steps"]]], dtype=torch.float64)
        self.dpsgd = row if self.dpsgd is None else torch.cat([self.dpsgd, row])
        return epsilon([(q, s, int(n)) for q, s, n in self.dpsgd.tolist()], delta)


class EncodeError(ValueError):
    """The trained update cannot be put on the wire (NaN/Inf, a value that overflows the codec); ``update``
    keeps the client's metrics for the run's log."""

    def __init__(self, update: ClientUpdate, reason: str):
        super().__init__(reason)
        self.update = update


# A replacement for honest local training (a simulated attacker's): (start adapter, round config) -> update.
TrainStep = Callable[[AdapterState, RoundConfig], ClientUpdate]


class MergedBase:
    """FLoRA's base weights on one resident model: W0 + ΔW, ΔW the server's merged update after a round.

    The originals are kept and W0 + ΔW is always set whole (one rounding, the same whether the run went
    straight through or resumed); setting the round the weights already hold is free.
    """

    def __init__(self, slot: AdapterSlot):
        self.slot = slot
        self.base0 = {m: p.detach().to("cpu", copy=True) for m, p in slot.base_weights().items()}
        self.merged_round: int | None = None

    def sync(self, delta: Mapping[str, torch.Tensor], server_round: int) -> None:
        if self.merged_round == server_round:
            return
        merged = merge_delta(self.base0, delta)
        with torch.no_grad():
            for m, p in self.slot.base_weights().items():
                p.copy_(merged.get(m, self.base0[m]))
        self.merged_round = server_round


class Client:
    """The client role for any client on one resident model (the base model is loaded once per process).

    ``merged_base``: FLoRA (the client merges the server's update into its base weights each round);
    ``rank_of``: FLoRA, each client's own LoRA rank (its compute budget; default: the configured r).
    """

    def __init__(self, trainer: LocalTrainer, wire: WireSpec, theta0: AdapterState, *,
                 merged_base: MergedBase | None = None, lora_alpha: float = 1.0,
                 rank_of: Callable[[str], int] | None = None):
        self.trainer, self.slot, self.wire, self.theta0 = trainer, trainer.slot, wire, theta0
        self.merged_base, self.lora_alpha = merged_base, float(lora_alpha)
        self.full_rank = max(int(t.shape[0]) for k, t in theta0.items() if is_lora_a(k))
        self.rank_of = rank_of or (lambda cid: self.full_rank)

    def run(self, ins: Instructions, data: ClientData, state: ClientState,
            on_step: Callable[[int, float], None] | None = None, train: TrainStep | None = None) -> ClientUpdate:
        """Downlink, local training (or ``train``), encoding: the message this client sends. ``EncodeError``
        when the update cannot be encoded (NaN/Inf, overflow); ``state`` is updated in place."""
        start, rank, scaling = self.start_adapter(ins)
        cid = str(ins.client_id)
        with self.trainer.holding(cid, state.optimizer) as held, self.slot.scaled(scaling):
            if train is None:
                update = self.trainer.train(start, ins.config, data, on_step=on_step, theta0=self.theta0)
            else:
                update = train(start, ins.config)
        state.optimizer = held.get(cid, {})
        if "dpsgd_steps" in update.metrics:  # sample-level DP: this client's own epsilon, over all its rounds
            spent = state.account_dpsgd(update.metrics, ins.config.dpsgd_delta)
            update = replace(update, metrics={**update.metrics, "dpsgd_epsilon": spent})
        if ins.config.update_clip is not None:  # privacy before anything leaves the client
            tensors, extra = privatize_update(update.tensors, start, self.wire.sent_keys(start), ins.config, cid)
            update = replace(update, tensors=tensors, metrics={**update.metrics, **extra})
        return self.encode(update, start, rank, state)

    def start_adapter(self, ins: Instructions) -> tuple[AdapterState, int | None, float | None]:
        """The adapter training starts from, the client's FLoRA rank and the scaling it runs at."""
        if self.merged_base is None:
            return ins.global_adapter, None, None
        self.merged_base.sync(ins.flora_delta or {}, ins.flora_round)
        rank, rc = int(self.rank_of(str(ins.client_id))), ins.config
        fresh = reinit_adapter(self.slot.shapes(), rank,
                               derive_seed(rc.seed, "flora-reinit", rc.server_round, int(ins.client_id)))
        return embed_rank(fresh, self.full_rank), rank, lora_scaling(self.lora_alpha, rank)

    def encode(self, update: ClientUpdate, start: AdapterState, rank: int | None, state: ClientState) -> ClientUpdate:
        """Compression is the last thing a client does; its error-feedback memory lives in ``state``."""
        feedback = None
        if self.wire.compressed and self.wire.error_feedback:
            feedback = ErrorFeedback()
            feedback.load_state_dict(state.residual)
        try:
            message = encode_update(update, start, self.wire, feedback, rank)
        except ValueError as exc:
            raise EncodeError(update, str(exc)) from exc
        if feedback is not None:
            state.residual = feedback.state_dict()
        return message
