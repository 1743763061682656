"""The split-learning server: the middle decoder blocks ``[k_a, L - k_c)`` and their LoRA, behind one handler.

``SplitServer.handle(kind, client_id, tensors, meta) -> (tensors, meta)`` answers every message of
``fedguard.split.messages`` (the table there lists the tensors and meta of each kind). Before any computation
it validates the request: the client said hello; the tensor names are exactly the kind's; every hidden state or
gradient is ``[B, T, H]`` in the agreed wire dtype, finite, ``T`` at most the model's positions, a gradient of
the very shape the server sent; ``counts`` is ``[B]`` int64 with every value in ``[1, T]``; the message is at
most ``split.max_message_mb``. A refused request raises ``ProtocolError`` and leaves the server's state as it
was, so it keeps serving every other client (and the refused one).

The middle blocks keep their global layer indices (``BlockSeam.middle``); the attention masks and positions
are rebuilt from ``counts`` (right padding). Hidden states arrive in the wire dtype and are cast to the model's
residual-stream dtype; bf16 models run under the model's autocast, as the client does.

Modes (``split.mode``)
----------------------
* ``sequential``: one shared LoRA of B and one AdamW; clients take turns: the server holds one client's
  training step (forward ... backward) at a time, and another client's training forward waits for it
  (in process the recipe runs clients one after another, so nothing ever waits).
* ``batch_parallel`` (FedSEA's client-batch parallelism): the server waits for the training forward of every
  registered client for the same ``step``, right-pads their hidden states to the longest ``T`` (zeros; the
  counts mark them as padding), concatenates them along the batch in client-id order, runs B once, and sends
  each client its slice; then it waits for every client's gradient, runs one backward and one optimizer
  step and slices the input gradient back. B's gradient is the sum of the clients' gradients (each client's
  loss is its own mean). The handler blocks while it waits, so a transport must serve at least as many
  calls at once as there are clients (the in-process recipe runs one thread per client).
* ``hierarchical`` (FedSEA's server-hierarchical parallelism, described in the paper's appendix and not in
  its released code): one copy of B's LoRA and one AdamW per client (a sub-server), created at the client's
  hello from the current global LoRA. After every ``split.average_every`` steps of every copy the server
  replaces all copies by their weighted FedAvg (weights: the clients' ``weight`` from hello, their number of
  training examples), the paper's rule: the A and B factors are averaged separately, which is not the mean of
  the products B·A (the copies start every period from the same state); AdamW moments stay per copy. A
  training forward for the step after an averaging point waits until that average has happened.
  ``average_copies()`` averages at the end of training (in process: called by the recipe).

Generation: ``prefill`` runs B over the prompts with a fresh per-client ``PartCache`` (the middle's layers
only, global indices), ``decode`` extends it by one position per row, ``end`` drops it. No noise, no graph.

Session state per client: its pending training step (the input leaf and B's output, with the graph),
its generation cache. ``keep_gradients`` (tests): the gradients of B's LoRA of the last optimizer step, before
clipping, in ``last_gradients[owner]``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from fedguard.config import ExperimentConfig
from fedguard.federated.sampling import round_lr
from fedguard.model.blocks import BlockSeam, PartCache
from fedguard.model.keys import AdapterState
from fedguard.seeding import derive_seed
from fedguard.split.messages import (
    KINDS,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    ProtocolError,
    spec_differences,
    tensor_nbytes,
)
from fedguard.split.params import PartLora

__all__ = ["GLOBAL", "SplitServer"]

GLOBAL = "server"  # the owner name of the server's shared (global) LoRA of B


@dataclass
class _Pending:
    """One training forward waiting for its backward."""

    step: int
    owner: str
    x: torch.Tensor  # the server's input leaf
    out: torch.Tensor  # B's output, with the graph


@dataclass
class _Group:
    """batch_parallel: one step of the whole group of clients."""

    step: int
    members: list[str]
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    replies: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_replies: dict[str, torch.Tensor] = field(default_factory=dict)
    delivered: set[str] = field(default_factory=set)
    x: torch.Tensor | None = None
    out: torch.Tensor | None = None
    rows: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # client -> (row offset, rows, T)


class SplitServer:
    def __init__(self, seam: BlockSeam, spec: dict[str, Any], cfg: ExperimentConfig, *,
                 autocast: Callable[[], AbstractContextManager] | None = None,
                 compute_lock: threading.RLock | None = None):
        self.seam = seam
        self.part = seam.middle
        self.spec = spec
        self.cfg = cfg
        self.split = cfg.split
        self.mode = cfg.split.mode
        self.wire_dtype = WIRE_DTYPES[cfg.split.wire_dtype]
        self.stream_dtype = seam.decoder.embed_tokens.weight.dtype
        self.hidden_size = int(seam.config.hidden_size)
        self.max_positions = int(getattr(seam.config, "max_position_embeddings", 1 << 30))
        self.max_message_bytes = int(cfg.split.max_message_mb * 2 ** 20)
        self.timeout = cfg.split.barrier_timeout
        self.autocast = autocast or nullcontext
        self.compute_lock = compute_lock or threading.RLock()
        self.cond = threading.Condition(threading.RLock())
        self.lora = PartLora(seam.model, [self.part])
        self.lora.add(GLOBAL)
        self.optimizers: dict[str, torch.optim.Optimizer] = {GLOBAL: self._optimizer(GLOBAL)}
        self.clients: dict[str, float] = {}  # client id -> weight (hierarchical averaging)
        self.pending: dict[str, _Pending] = {}
        self.caches: dict[str, PartCache] = {}
        self.groups: dict[int, _Group] = {}
        self.turn: str | None = None  # sequential: the client whose training step is in progress
        self.copy_steps: dict[str, int] = {}  # hierarchical: steps each copy has completed
        self.averaged_through = 0  # hierarchical: the last step boundary averaged
        self.steps_done = 0  # optimizer steps of B (all owners)
        self.keep_gradients = False
        self.last_gradients: dict[str, dict[str, torch.Tensor]] = {}

    # -- the handler ---------------------------------------------------------------------------------------
    def handle(self, kind: str, client_id: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if kind not in KINDS or kind == "aggregate":
            raise ProtocolError(f"unknown or unserved message kind {kind!r} (served: "
                                f"{', '.join(k for k in KINDS if k != 'aggregate')})")
        if not isinstance(client_id, str) or not client_id:
            raise ProtocolError("client_id must be a non-empty string")
        if not isinstance(meta, dict):
            raise ProtocolError(f"{kind}: meta must be a JSON object")
        size = tensor_nbytes(tensors)
        if size > self.max_message_bytes:
            raise ProtocolError(f"{kind} from {client_id!r}: {size} bytes of tensors exceed split.max_message_mb "
                                f"({self.split.max_message_mb} MiB)")
        with self.cond:
            if kind == "hello":
                return self._hello(client_id, tensors, meta)
            if client_id not in self.clients:
                raise ProtocolError(f"{kind} from {client_id!r}: the client has not completed the hello handshake")
            return getattr(self, f"_{kind}")(client_id, tensors, meta)

    # -- validation ----------------------------------------------------------------------------------------
    def _names(self, kind: str, cid: str, tensors: dict, expected: set[str]) -> None:
        if set(tensors) != expected:
            raise ProtocolError(f"{kind} from {cid!r}: expected tensors {sorted(expected)}, got {sorted(tensors)}")

    def _activation(self, kind: str, cid: str, name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None
                    ) -> None:
        where = f"{kind} from {cid!r}: tensor {name!r}"
        if t.dtype != self.wire_dtype:
            raise ProtocolError(f"{where} must have dtype {str(self.wire_dtype).removeprefix('torch.')} (the "
                                f"handshake's wire dtype), got {str(t.dtype).removeprefix('torch.')}")
        if shape is not None:
            if tuple(t.shape) != tuple(shape):
                raise ProtocolError(f"{where} must have shape {list(shape)}, got {list(t.shape)}")
        elif t.ndim != 3 or t.shape[2] != self.hidden_size or t.shape[0] < 1 or t.shape[1] < 1:
            raise ProtocolError(f"{where} must have shape [B, T, {self.hidden_size}] (hidden size "
                                f"{self.hidden_size}), got {list(t.shape)}")
        if t.shape[1] > self.max_positions:
            raise ProtocolError(f"{where}: {t.shape[1]} positions exceed the model's {self.max_positions}")
        if not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"{where} has non-finite values")

    def _counts(self, kind: str, cid: str, counts: torch.Tensor, batch: int, length: int) -> None:
        where = f"{kind} from {cid!r}: tensor 'counts'"
        if counts.dtype != torch.int64:
            raise ProtocolError(f"{where} must have dtype int64, got {str(counts.dtype).removeprefix('torch.')}")
        if tuple(counts.shape) != (batch,):
            raise ProtocolError(f"{where} must have shape [{batch}] (one count per row), got {list(counts.shape)}")
        if int(counts.min()) < 1 or int(counts.max()) > length:
            raise ProtocolError(f"{where}: every count must lie in [1, {length}], got {counts.tolist()}")

    @staticmethod
    def _step(kind: str, cid: str, meta: dict) -> int:
        step = meta.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ProtocolError(f"{kind} from {cid!r}: meta 'step' must be an integer >= 1, got {step!r}")
        return step

    # -- kinds ---------------------------------------------------------------------------------------------
    def _hello(self, cid: str, tensors: dict, meta: dict):
        self._names("hello", cid, tensors, set())
        diffs = spec_differences(meta.get("spec"), self.spec)
        if diffs:
            raise ProtocolError(f"hello from {cid!r} refused: " + "; ".join(diffs))
        weight = meta.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ProtocolError(f"hello from {cid!r}: meta 'weight' must be a positive number, got {weight!r}")
        self.clients[cid] = float(weight)
        if self.mode == "hierarchical" and cid not in self.lora.sets:
            self.lora.add(cid, self.lora.state(GLOBAL))
            self.optimizers[cid] = self._optimizer(cid)
            self.copy_steps[cid] = self.averaged_through
        return {}, {"spec": self.spec, "mode": self.mode, "protocol_version": PROTOCOL_VERSION}

    def _forward(self, cid: str, tensors: dict, meta: dict):
        self._names("forward", cid, tensors, {"hidden", "counts"})
        step = self._step("forward", cid, meta)
        train = meta.get("train", True)
        if not isinstance(train, bool):
            raise ProtocolError(f"forward from {cid!r}: meta 'train' must be a boolean, got {train!r}")
        hidden, counts = tensors["hidden"], tensors["counts"]
        self._activation("forward", cid, "hidden", hidden)
        self._counts("forward", cid, counts, hidden.shape[0], hidden.shape[1])
        if not train:
            with self.compute_lock, torch.no_grad():
                out = self._run(self._owner(cid), hidden, counts, train=False)
            return {"hidden": out.to(self.wire_dtype)}, {"step": step}
        if self.mode == "batch_parallel":
            return {"hidden": self._group_forward(cid, step, hidden, counts)}, {"step": step}
        if self.mode == "sequential":
            self._wait(lambda: self.turn in (None, cid), f"forward from {cid!r}: waiting for client {self.turn!r}'s "
                                                         "step to finish (sequential mode)")
            self.turn = cid
        else:  # hierarchical: a step after an averaging point waits for that average
            boundary = (step - 1) // self.split.average_every * self.split.average_every
            self._wait(lambda: self.averaged_through >= boundary,
                       f"forward from {cid!r}: waiting for the other sub-servers to reach step {boundary}")
        owner = self._owner(cid)
        self.pending.pop(cid, None)
        with self.compute_lock:
            self._seed(owner, step)
            x = hidden.to(self.stream_dtype).detach().requires_grad_(True)  # a leaf of our own
            out = self._run(owner, x, counts, train=True)
        self.pending[cid] = _Pending(step, owner, x, out)
        return {"hidden": out.detach().to(self.wire_dtype)}, {"step": step}

    def _backward(self, cid: str, tensors: dict, meta: dict):
        self._names("backward", cid, tensors, {"grad"})
        step = self._step("backward", cid, meta)
        if self.mode == "batch_parallel":
            group = self.groups.get(step)
            if group is None or cid not in group.replies:
                raise ProtocolError(f"backward from {cid!r}: no training forward of step {step} to go back through")
            shape = (group.rows[cid][1], group.rows[cid][2], self.hidden_size)
            self._activation("backward", cid, "grad", tensors["grad"], shape)
            return {"grad": self._group_backward(cid, group, tensors["grad"])}, {"step": step}
        p = self.pending.get(cid)
        if p is None or p.step != step:
            raise ProtocolError(f"backward from {cid!r}: no training forward of step {step} to go back through"
                                + (f" (the pending one is step {p.step})" if p is not None else ""))
        self._activation("backward", cid, "grad", tensors["grad"], tuple(p.out.shape))
        del self.pending[cid]
        with self.compute_lock:
            p.out.backward(tensors["grad"].to(p.out.dtype))
            g_in = p.x.grad
            self._optimizer_step(p.owner, step)
        if self.mode == "sequential":
            self.turn = None
            self.cond.notify_all()
        else:
            self.copy_steps[cid] = step
            self._maybe_average(step)
        return {"grad": g_in.to(self.wire_dtype)}, {"step": step}

    def _prefill(self, cid: str, tensors: dict, meta: dict):
        self._names("prefill", cid, tensors, {"hidden", "counts"})
        hidden, counts = tensors["hidden"], tensors["counts"]
        self._activation("prefill", cid, "hidden", hidden)
        self._counts("prefill", cid, counts, hidden.shape[0], hidden.shape[1])
        cache = self.part.new_cache()
        with self.compute_lock, torch.no_grad():
            out = self._run(self._owner(cid), hidden, counts, train=False, cache=cache)
        self.caches[cid] = cache  # a new request: any earlier cache of this client is dropped
        return {"hidden": out.to(self.wire_dtype)}, {}

    def _decode(self, cid: str, tensors: dict, meta: dict):
        self._names("decode", cid, tensors, {"hidden"})
        cache = self.caches.get(cid)
        if cache is None:
            raise ProtocolError(f"decode from {cid!r}: no prefill to continue (send prefill first)")
        rows = int(cache.valid.shape[0])
        self._activation("decode", cid, "hidden", tensors["hidden"], (rows, 1, self.hidden_size))
        if cache.seen_tokens() + 1 > self.max_positions:
            raise ProtocolError(f"decode from {cid!r}: the sequence would exceed the model's {self.max_positions} "
                                "positions")
        with self.compute_lock, torch.no_grad():
            out = self._run(self._owner(cid), tensors["hidden"], None, train=False, cache=cache)
        return {"hidden": out.to(self.wire_dtype)}, {}

    def _end(self, cid: str, tensors: dict, meta: dict):
        self._names("end", cid, tensors, set())
        self.caches.pop(cid, None)
        return {}, {}

    # -- batch_parallel --------------------------------------------------------------------------------------
    def _group_forward(self, cid: str, step: int, hidden: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        group = self.groups.get(step)
        if group is None:
            group = self.groups[step] = _Group(step, sorted(self.clients))
        if cid not in group.members:
            raise ProtocolError(f"forward from {cid!r}: step {step} is running without this client (it said hello "
                                "after the group's step began)")
        if cid in group.inputs:
            raise ProtocolError(f"forward from {cid!r}: a second training forward for step {step}")
        group.inputs[cid] = (hidden, counts)
        if len(group.inputs) == len(group.members):
            longest = max(h.shape[1] for h, _ in group.inputs.values())
            xs, cs, offset = [], [], 0
            for m in group.members:
                h, c = group.inputs[m]
                group.rows[m] = (offset, h.shape[0], h.shape[1])
                offset += h.shape[0]
                xs.append(torch.nn.functional.pad(h.to(self.stream_dtype), (0, 0, 0, longest - h.shape[1])))
                cs.append(c)
            with self.compute_lock:
                self._seed(GLOBAL, step)
                group.x = torch.cat(xs).requires_grad_(True)
                group.out = self._run(GLOBAL, group.x, torch.cat(cs), train=True)
            out = group.out.detach()
            for m in group.members:
                o, b, t = group.rows[m]
                group.replies[m] = out[o:o + b, :t].to(self.wire_dtype)
            group.inputs.clear()
            self.cond.notify_all()
        else:
            self._wait(lambda: cid in group.replies,
                       f"forward from {cid!r}: waiting for clients "
                       f"{sorted(set(group.members) - set(group.inputs))} to send step {step}",
                       undo=lambda: group.inputs.pop(cid, None))
        return group.replies[cid]

    def _group_backward(self, cid: str, group: _Group, grad: torch.Tensor) -> torch.Tensor:
        if cid in group.grads or cid in group.grad_replies:
            raise ProtocolError(f"backward from {cid!r}: a second gradient for step {group.step}")
        group.grads[cid] = grad
        if len(group.grads) == len(group.members):
            full = torch.zeros_like(group.out)
            for m in group.members:
                o, b, t = group.rows[m]
                full[o:o + b, :t] = group.grads[m].to(full.dtype)
            with self.compute_lock:
                group.out.backward(full)
                g_in = group.x.grad
                self._optimizer_step(GLOBAL, group.step)
            for m in group.members:
                o, b, t = group.rows[m]
                group.grad_replies[m] = g_in[o:o + b, :t].to(self.wire_dtype)
            group.grads.clear()
            group.x = group.out = None
            self.cond.notify_all()
        else:
            self._wait(lambda: cid in group.grad_replies,
                       f"backward from {cid!r}: waiting for clients "
                       f"{sorted(set(group.members) - set(group.grads))} to send step {group.step}'s gradient",
                       undo=lambda: group.grads.pop(cid, None))
        reply = group.grad_replies[cid]
        group.delivered.add(cid)
        if group.delivered == set(group.members):
            del self.groups[group.step]
        return reply

    # -- hierarchical ----------------------------------------------------------------------------------------
    def _maybe_average(self, step: int) -> None:
        k = self.split.average_every
        if step % k == 0 and step > self.averaged_through and all(s >= step for s in self.copy_steps.values()):
            self.average_copies()
            self.averaged_through = step
            self.cond.notify_all()

    def average_copies(self) -> AdapterState:
        """Hierarchical mode: every copy (and the global LoRA) becomes the weighted FedAvg of the copies
        (A and B averaged separately, as the paper's FedAvg); returns it. Other modes: the global LoRA."""
        with self.cond, self.compute_lock:
            if self.mode != "hierarchical" or not self.copy_steps:
                return self.lora.state(GLOBAL)
            owners = sorted(self.copy_steps)
            total = sum(self.clients[o] for o in owners)
            states = [self.lora.state(o) for o in owners]
            avg = {k: sum(self.clients[o] / total * s[k].double() for o, s in zip(owners, states)).float()
                   for k in states[0]}
            for o in [GLOBAL, *owners]:
                self.lora.load(o, avg)
            return avg

    # -- pieces ----------------------------------------------------------------------------------------------
    def _owner(self, cid: str) -> str:
        return cid if self.mode == "hierarchical" and cid in self.lora.sets else GLOBAL

    def _optimizer(self, owner: str) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.AdamW(list(self.lora.params(owner).values()), lr=t.lr, weight_decay=t.weight_decay)

    def _seed(self, owner: str, step: int) -> None:
        # LoRA dropout draws from torch's global generator: a stream per (owner, step), whatever ran before
        torch.manual_seed(derive_seed(self.cfg.seed, "split-server-dropout", owner, step))

    def _run(self, owner: str, x: torch.Tensor, counts, *, train: bool, cache=None) -> torch.Tensor:
        self.lora.use(owner)
        for module in self.part.modules():
            module.train(train)
        with self.autocast():
            return self.part(x.to(self.stream_dtype), counts, cache=cache)

    def _optimizer_step(self, owner: str, step: int) -> None:
        params = self.lora.params(owner)
        if self.keep_gradients:
            self.last_gradients[owner] = {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
        if self.cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), self.cfg.train.max_grad_norm)
        opt = self.optimizers[owner]
        for g in opt.param_groups:
            g["lr"] = round_lr(self.cfg.train, min(step, self.split.steps), self.split.steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.steps_done += 1

    def _wait(self, ready: Callable[[], bool], what: str, undo: Callable[[], Any] | None = None) -> None:
        if not self.cond.wait_for(ready, timeout=self.timeout):
            if undo is not None:
                undo()
            raise ProtocolError(f"{what}: timed out after {self.timeout:g} s (split.barrier_timeout)")

    def adapter_state(self) -> AdapterState:
        """B's LoRA (PEFT keys of the middle layers): the global one; hierarchical: the average of the copies."""
        return self.average_copies() if self.mode == "hierarchical" else self.lora.state(GLOBAL)
