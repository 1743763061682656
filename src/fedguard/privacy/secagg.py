"""Secure aggregation (SecAgg+, Bell et al. CCS 2020; SecAgg, Bonawitz et al. CCS 2017) for the embedded engine.

What it protects: the server learns the sum of the surviving clients' vectors and nothing else about any one of
them. Each client quantises its vector to integers mod M and adds (1) a private mask PRG(b_u) and (2) for every
neighbour v in the key-sharing graph a pairwise mask ±PRG(ECDH(sk1_u, pk1_v)). Pairwise masks cancel in the sum;
the server strips the survivors' private masks by reconstructing b_u from Shamir shares held by their
neighbours, and the pairwise masks of clients that dropped after key sharing by reconstructing their sk1. No
client ever reveals both b_u and sk1_u of the same client, so an honest-but-curious server (colluding with fewer
than `threshold` clients) never sees an unmasked individual vector. With share_fraction = 1 every client shares
with every other (SecAgg); below 1 each shares with a random ring neighbourhood (SecAgg+).

The stages and checks follow Flower's own implementation (flwr.client.mod.secaggplus_mod and
flwr.server.workflow.SecAggPlusWorkflow): setup -> share keys -> collect masked vectors -> unmask. Every
primitive is Flower's (flwr.common.secure_aggregation: ECDH + HKDF, Fernet, Shamir, PRG, quantisation, mod
arithmetic); this module only routes the stages in process, without Flower messages.

In this embedded engine all parties run in one process, so it demonstrates correctness and cost (bytes on the
wire, dropout recovery), not a trust boundary; the Flower engine gives the real one.

Randomness: key pairs, mask seeds b_u and Shamir coefficients come from the OS (as in Flower), so they differ
from run to run; masks cancel exactly, so the sum does not depend on them. Flower's stochastic rounding draws from
numpy's *global* RandomState; each client loads it from a seed derived from (seed, client id) for the call and
restores the caller's state afterwards, so `total` is reproducible. The neighbour graph is drawn from `seed`.

Differences from Flower: no weighting factor (Flower uploads [w, w*x] for a weighted mean; callers pre-weight), the
threshold check covers the clients that completed key sharing, the masks removed for a dropped client are exactly
those its surviving neighbours added, and a client refuses to reveal both secrets of one peer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedguard.aggregators.base import AdapterLayout
from fedguard.messages import UpdateSum
from fedguard.seeding import derive_seed, numpy_rng

PublicKeys = tuple[bytes, bytes]  # (pk1: pairwise masks, pk2: encrypting shares), PEM bytes


@dataclass(frozen=True)
class SecAggSettings:
    clipping_range: float  # |coordinate| bound before quantisation (values beyond are clipped)
    quantization_range: int = 2**22
    modulus_range: int = 2**32  # Flower's default
    share_fraction: float = 1.0  # each client shares keys with this fraction of the others (SecAgg+ graph; 1.0 = SecAgg)
    # Shares needed to reconstruct a secret, as a fraction of each client's shares (= of the round's clients when
    # share_fraction = 1.0), at least 2 (Flower's rule).
    reconstruction_fraction: float = 0.67

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ValueError(f"clipping_range must be finite and > 0, got {self.clipping_range}")
        # Flower's quantize casts to int32.
        if not (isinstance(self.quantization_range, int) and 0 < self.quantization_range < 2**31):
            raise ValueError(f"quantization_range must be an int in (0, 2**31), got {self.quantization_range}")
        # Power of 2 (Flower's mod is a bit mask) and at most 2**32 so the int64 sums of masked values cannot overflow.
        m = self.modulus_range
        if not (isinstance(m, int) and self.quantization_range < m <= 2**32 and m & (m - 1) == 0):
            raise ValueError(f"modulus_range must be a power of 2 in (quantization_range, 2**32], got {m}")
        if not 0 < self.share_fraction <= 1:
            raise ValueError(f"share_fraction must be in (0, 1], got {self.share_fraction}")
        if not 0 < self.reconstruction_fraction <= 1:
            raise ValueError(f"reconstruction_fraction must be in (0, 1], got {self.reconstruction_fraction}")


@dataclass(frozen=True)
class SetupConfig:
    """What the server sends every client in the setup stage (Flower's SecAgg+ config record)."""

    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int


@dataclass
class SecureSum:
    total: np.ndarray  # float64, the dequantised sum of the surviving clients' vectors
    survivors: list[str]  # whose vectors are in the sum (sorted)
    dropped: list[str]  # shared keys but never sent a masked vector; their pairwise masks were removed via shares
    bytes_up: int  # total bytes clients sent the server (public keys, encrypted shares, masked vectors, shares)
    bytes_down: int  # total bytes the server sent clients


def wire_bytes(payload: Any) -> int:
    """Payload bytes of a message: bytes by length, arrays by nbytes, ints/floats (node ids, config) as 8 bytes,
    containers and dataclasses as the sum of their parts. Framing (field names, headers) is not counted."""
    if isinstance(payload, (bytes, bytearray)):
        return len(payload)
    if isinstance(payload, np.ndarray):
        return int(payload.nbytes)
    if isinstance(payload, (int, float, np.integer, np.floating)):
        return 8
    if isinstance(payload, str):
        return len(payload.encode("utf-8"))
    if isinstance(payload, Mapping):
        return sum(wire_bytes(k) + wire_bytes(v) for k, v in payload.items())
    if isinstance(payload, (list, tuple, set, frozenset)):
        return sum(wire_bytes(x) for x in payload)
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        return wire_bytes(dataclasses.astuple(payload))
    raise TypeError(f"cannot size a {type(payload).__name__} for the wire")


_GLOBAL_NUMPY_RNG = threading.Lock()


@contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    """Flower's stochastic rounding calls np.random.rand (the global RandomState): load that state from an
    MT19937 seeded with `seed` for the duration, then give the caller's state back."""
    with _GLOBAL_NUMPY_RNG:
        saved = np.random.get_state()
        np.random.set_state(np.random.MT19937(seed).state)
        try:
            yield
        finally:
            np.random.set_state(saved)


def _stage_after(current: str, nxt: str) -> None:
    # Same order check as Flower's secaggplus_mod.check_stage: a stage may only follow its predecessor.
    stages = Stage.all()
    if stages[(stages.index(current) + 1) % len(stages)] != nxt:
        raise RuntimeError(f"secure aggregation: stage {nxt!r} cannot follow {current!r}")


class SecAggClient:
    """One client's side of SecAgg+ (Flower's secaggplus_mod, stage by stage). Its plain vector enters only
    `mask`, which returns it quantised and masked; its secrets never leave it except as Shamir shares."""

    def __init__(self, client_id: str, node_id: int, seed: int) -> None:
        self.client_id = client_id
        self.node_id = node_id
        self._quantize_seed = derive_seed(seed, "secagg-quantize", client_id)
        self._stage: str = Stage.UNMASK  # so that setup is the only valid first stage
        self.quantized: np.ndarray | None = None  # client-side only; kept so tests can compare with the upload

    # -- stage 0: setup ---------------------------------------------------------------------------------
    def setup(self, config: SetupConfig) -> PublicKeys:
        _stage_after(self._stage, Stage.SETUP)
        self._stage = Stage.SETUP
        self.config = config
        self._seed_shares: dict[int, bytes] = {}  # owner -> my share of the owner's mask seed b
        self._sk1_shares: dict[int, bytes] = {}  # owner -> my share of the owner's sk1
        self._ss2: dict[int, bytes] = {}  # peer -> key for the share ciphertexts between us
        # Two key pairs: sk1/pk1 derive the pairwise masks, sk2/pk2 encrypt the shares in transit.
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self._sk1, self._sk2 = private_key_to_bytes(sk1), private_key_to_bytes(sk2)
        self.public_keys: PublicKeys = (public_key_to_bytes(pk1), public_key_to_bytes(pk2))
        return self.public_keys

    # -- stage 1: share keys ----------------------------------------------------------------------------
    def share_keys(self, public_keys: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Given the neighbours' public keys (itself included), the encrypted shares for each neighbour."""
        _stage_after(self._stage, Stage.SHARE_KEYS)
        self._stage = Stage.SHARE_KEYS
        cfg = self.config
        if len(public_keys) < cfg.threshold:
            raise ValueError(f"{len(public_keys)} neighbours, fewer than the threshold {cfg.threshold}")
        flat = [pk for pair in public_keys.values() for pk in pair]
        if len(set(flat)) != len(flat):
            raise ValueError("some public keys are identical")
        if tuple(public_keys[self.node_id]) != self.public_keys:
            raise ValueError("the server relayed this client's own public keys wrongly")
        self._peer_keys = {nid: tuple(pks) for nid, pks in public_keys.items()}

        # b seeds the private mask; sharing b and sk1 lets the server remove whichever mask it must.
        self._seed = os.urandom(32)
        seed_shares = create_shares(self._seed, cfg.threshold, cfg.num_shares)
        sk1_shares = create_shares(self._sk1, cfg.threshold, cfg.num_shares)
        sk2 = bytes_to_private_key(self._sk2)
        out: dict[int, bytes] = {}
        for idx, (nid, (_, pk2)) in enumerate(self._peer_keys.items()):
            if nid == self.node_id:
                self._seed_shares[nid], self._sk1_shares[nid] = seed_shares[idx], sk1_shares[idx]
                continue
            self._ss2[nid] = generate_shared_key(sk2, bytes_to_public_key(pk2))
            plaintext = share_keys_plaintext_concat(self.node_id, nid, seed_shares[idx], sk1_shares[idx])
            out[nid] = encrypt(self._ss2[nid], plaintext)
        return out

    # -- stage 2: collect masked vectors ----------------------------------------------------------------
    def mask(self, ciphertexts: Mapping[int, bytes], vector: np.ndarray) -> np.ndarray:
        """Store the shares other clients sent (src -> ciphertext) and return `vector` quantised and masked."""
        _stage_after(self._stage, Stage.COLLECT_MASKED_VECTORS)
        self._stage = Stage.COLLECT_MASKED_VECTORS
        cfg = self.config
        if len(ciphertexts) + 1 < cfg.threshold:
            raise ValueError("not enough neighbours left to reach the threshold")
        for src, ciphertext in ciphertexts.items():
            actual_src, dst, seed_share, sk1_share = share_keys_plaintext_separate(decrypt(self._ss2[src], ciphertext))
            if actual_src != src or dst != self.node_id:
                raise ValueError(f"node {self.node_id}: misrouted share ({actual_src} -> {dst}, relayed from {src})")
            self._seed_shares[src], self._sk1_shares[src] = seed_share, sk1_share

        with _seeded_global_numpy(self._quantize_seed):
            [q] = quantize([np.asarray(vector, dtype=np.float64)], cfg.clipping_range, cfg.quantization_range)
        self.quantized = q
        shape = [q.shape]
        [masked] = parameters_addition([q], pseudo_rand_gen(self._seed, cfg.modulus_range, shape))
        sk1 = bytes_to_private_key(self._sk1)
        # Pairwise masks only with the peers whose shares arrived: those are the ones the server can account for.
        for peer in ciphertexts:
            key = generate_shared_key(sk1, bytes_to_public_key(self._peer_keys[peer][0]))
            pairwise = pseudo_rand_gen(key, cfg.modulus_range, shape)
            op = parameters_addition if self.node_id > peer else parameters_subtraction
            [masked] = op([masked], pairwise)
        [masked] = parameters_mod([masked], cfg.modulus_range)
        return masked

    # -- stage 3: unmask --------------------------------------------------------------------------------
    def reveal_shares(self, active: Collection[int], dead: Collection[int]) -> dict[int, bytes]:
        """Shares of b for surviving neighbours, of sk1 for dropped ones (owner -> share)."""
        _stage_after(self._stage, Stage.UNMASK)
        self._stage = Stage.UNMASK
        if set(active) & set(dead):
            # Revealing both b_u and sk1_u would let the server unmask u's individual vector.
            raise ValueError(f"clients {sorted(set(active) & set(dead))} listed as both surviving and dropped")
        if len(active) < self.config.threshold:
            raise ValueError(f"{len(active)} surviving neighbours, fewer than the threshold {self.config.threshold}")
        shares = {nid: self._seed_shares[nid] for nid in active}
        shares.update({nid: self._sk1_shares[nid] for nid in dead})
        return shares


class SecAggServer:
    """The server's side of SecAgg+ (Flower's SecAggPlusWorkflow). Each `collect_*` method takes one stage's
    replies (node id -> reply; a client missing from the dict has dropped) and returns the next stage's messages.
    It receives masked vectors only; the one plain vector it ever holds is the unmasked sum."""

    def __init__(self, clients: Sequence[str], settings: SecAggSettings, seed: int) -> None:
        names = sorted(clients)
        n = len(names)
        if n < 2 or len(set(names)) != n:
            raise ValueError(f"secure aggregation needs at least 2 distinct clients, got {n}")
        if n * settings.quantization_range >= settings.modulus_range:
            # Quantised values lie in [0, quantization_range]; their sum must stay below M or it wraps around.
            raise ValueError(f"{n} clients x quantization_range {settings.quantization_range} does not fit in "
                             f"modulus_range {settings.modulus_range}")
        self.settings = settings
        self.node_ids = {name: i + 1 for i, name in enumerate(names)}  # Flower packs node ids as unsigned ints
        self._names = {nid: name for name, nid in self.node_ids.items()}

        # Flower's rule: shares = fraction of the clients, odd when below n, all clients when that leaves <= 2.
        num_shares = round(settings.share_fraction * n)
        if num_shares < n and num_shares % 2 == 0:
            num_shares += 1
        if num_shares <= 2:
            num_shares = n
        self.num_shares = num_shares
        self.threshold = max(round(settings.reconstruction_fraction * num_shares), 2)

        # Ring of a random permutation: each client's neighbours are the num_shares // 2 on either side (and itself).
        order = [int(x) for x in numpy_rng(seed, "secagg-graph").permutation(list(self._names))]
        half = num_shares // 2
        self.neighbours: dict[int, set[int]] = {
            nid: {order[(i + off) % n] for off in range(-half, half + 1)} for i, nid in enumerate(order)
        }
        self.active: set[int] = set(self._names)
        self.public_keys: dict[int, PublicKeys] = {}
        self.masked_vectors: dict[int, np.ndarray] = {}  # what each survivor uploaded: masked, never plain
        self.bytes_up = 0
        self.bytes_down = 0

    def name(self, nid: int) -> str:
        return self._names[nid]

    def _send(self, messages: dict[int, Any]) -> dict[int, Any]:
        self.bytes_down += sum(wire_bytes(m) for m in messages.values())
        return messages

    def _receive(self, replies: Mapping[int, Any]) -> None:
        unknown = set(replies) - self.active
        if unknown:
            raise ValueError(f"replies from clients not in this stage: {sorted(unknown)}")
        self.bytes_up += sum(wire_bytes(r) for r in replies.values())
        self.active = set(replies)

    def _check_threshold(self, holders: Collection[int]) -> None:
        # Every secret of `holders` must still be reconstructable from the shares of its surviving neighbours.
        for nid in sorted(holders):
            alive = len(self.neighbours[nid] & self.active)
            if alive < self.threshold:
                raise ValueError(
                    f"secure aggregation aborted: client {self.name(nid)!r} has {alive} surviving neighbours "
                    f"(itself included), fewer than the reconstruction threshold {self.threshold} "
                    f"({len(self.active)} of {len(self._names)} clients survive)")

    # -- stage 0 ----------------------------------------------------------------------------------------
    def setup(self) -> dict[int, SetupConfig]:
        s = self.settings
        cfg = SetupConfig(self.num_shares, self.threshold, float(s.clipping_range), s.quantization_range,
                          s.modulus_range)
        return self._send({nid: cfg for nid in sorted(self.active)})

    # -- stage 1 ----------------------------------------------------------------------------------------
    def collect_public_keys(self, replies: Mapping[int, PublicKeys]) -> dict[int, dict[int, PublicKeys]]:
        self._receive(replies)
        self._check_threshold(self.active)
        self.public_keys = {nid: tuple(pks) for nid, pks in replies.items()}
        return self._send({nid: {peer: self.public_keys[peer] for peer in sorted(self.neighbours[nid] & self.active)}
                           for nid in sorted(self.active)})

    # -- stage 2 ----------------------------------------------------------------------------------------
    def collect_encrypted_shares(self, replies: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        self._receive(replies)
        self._key_sharers = set(self.active)  # the clients whose secrets now exist as shares
        self._check_threshold(self._key_sharers)
        forward: dict[int, dict[int, bytes]] = {nid: {} for nid in sorted(self.active)}
        for src in sorted(replies):
            for dst, ciphertext in replies[src].items():
                if dst in forward:
                    forward[dst][src] = ciphertext
        # Who masks with whom: a client adds a pairwise mask for every peer whose shares it receives.
        self._mask_peers = {nid: set(fwd) for nid, fwd in forward.items()}
        return self._send(forward)

    # -- stage 3 ----------------------------------------------------------------------------------------
    def collect_masked_vectors(self, replies: Mapping[int, np.ndarray]) -> dict[int, tuple[list[int], list[int]]]:
        """Store the masked vectors; raise ValueError if too few survive to unmask; ask survivors for shares."""
        shapes = {np.shape(v) for v in replies.values()}
        if len(shapes) > 1 or any(not np.issubdtype(np.asarray(v).dtype, np.integer) for v in replies.values()):
            raise ValueError("masked vectors must be integer arrays of one shape")
        self._receive(replies)
        self.masked_vectors = {nid: np.asarray(v) for nid, v in replies.items()}
        self.dead = self._key_sharers - self.active
        self._check_threshold(self._key_sharers)
        return self._send({nid: (sorted(self.neighbours[nid] & self.active), sorted(self.neighbours[nid] & self.dead))
                           for nid in sorted(self.active)})

    def unmask(self, replies: Mapping[int, Mapping[int, bytes]]) -> np.ndarray:
        """Reconstruct the survivors' mask seeds and the dropped clients' sk1, strip the masks, dequantise."""
        survivors = set(self.masked_vectors)
        self._receive(replies)
        s = self.settings
        shares: dict[int, list[bytes]] = {nid: [] for nid in self._key_sharers}
        for holder in sorted(replies):
            for owner, share in replies[holder].items():
                shares[owner].append(share)

        total_list = reduce(parameters_addition, ([self.masked_vectors[nid]] for nid in sorted(survivors)))
        [total] = parameters_mod(total_list, s.modulus_range)
        shape = [total.shape]
        for owner in sorted(self._key_sharers):
            # Fewer shares than the threshold would still "combine" into garbage: refuse instead.
            if len(shares[owner]) < self.threshold:
                raise ValueError(f"only {len(shares[owner])} shares of client {self.name(owner)!r}'s secret, fewer "
                                 f"than the reconstruction threshold {self.threshold}")
            secret = combine_shares(shares[owner])
            if owner in survivors:
                [total] = parameters_subtraction([total], pseudo_rand_gen(secret, s.modulus_range, shape))
                continue
            # Dropped: undo the pairwise masks its surviving neighbours added (they added +m if their id is larger).
            sk1 = bytes_to_private_key(secret)
            for peer in sorted(nid for nid in survivors if owner in self._mask_peers[nid]):
                key = generate_shared_key(sk1, bytes_to_public_key(self.public_keys[peer][0]))
                pairwise = pseudo_rand_gen(key, s.modulus_range, shape)
                op = parameters_addition if owner > peer else parameters_subtraction
                [total] = op([total], pairwise)
        [total] = parameters_mod([total], s.modulus_range)
        [out] = dequantize([total], s.clipping_range, s.quantization_range)
        # Each quantised vector carries +clipping_range; dequantize removes one of them, the rest go here.
        return out - (len(survivors) - 1) * s.clipping_range


def secure_sum(vectors: Mapping[str, np.ndarray], settings: SecAggSettings, seed: int,
               dropped: Collection[str] = ()) -> SecureSum:
    """Runs the protocol among the clients of `vectors` (each a 1-D float array of the same length); the clients in
    `dropped` complete key sharing but never send their masked vector. Raises ValueError (clear message) when fewer
    survivors than the reconstruction threshold remain, on vectors of different lengths, NaN/Inf, or < 2 clients."""
    if len(vectors) < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {len(vectors)}")
    plain = {name: np.asarray(v, dtype=np.float64) for name, v in vectors.items()}
    lengths = {name: v.shape for name, v in plain.items()}
    if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) != 1:
        raise ValueError(f"vectors must be 1-D and of one length, got shapes {lengths}")
    bad = sorted(name for name, v in plain.items() if not np.all(np.isfinite(v)))
    if bad:
        raise ValueError(f"vectors of {bad} contain NaN or Inf")
    unknown = sorted(set(dropped) - set(plain))
    if unknown:
        raise ValueError(f"dropped clients {unknown} are not among the vectors' clients")

    server = SecAggServer(list(plain), settings, seed)
    clients = {nid: SecAggClient(name, nid, seed) for name, nid in server.node_ids.items()}
    gone = {server.node_ids[name] for name in dropped}

    keys = {nid: clients[nid].setup(cfg) for nid, cfg in server.setup().items()}
    peer_keys = server.collect_public_keys(keys)
    encrypted = {nid: clients[nid].share_keys(pks) for nid, pks in peer_keys.items()}
    forwarded = server.collect_encrypted_shares(encrypted)
    # The server gets masked vectors only: each client masks its own vector before replying.
    masked = {nid: clients[nid].mask(cts, plain[clients[nid].client_id])
              for nid, cts in forwarded.items() if nid not in gone}
    requests = server.collect_masked_vectors(masked)
    revealed = {nid: clients[nid].reveal_shares(active, dead) for nid, (active, dead) in requests.items()}
    total = server.unmask(revealed)

    return SecureSum(total=total, survivors=sorted(server.name(n) for n in masked),
                     dropped=sorted(server.name(n) for n in server.dead), bytes_up=server.bytes_up,
                     bytes_down=server.bytes_down)


# -- one federated round's updates -----------------------------------------------------------------------------


def round_settings(rc, quantization_range: int, share_fraction: float,
                   reconstruction_fraction: float) -> SecAggSettings:
    """Settings for updates clipped to ``rc.update_clip`` plus noise of ``rc.update_noise_std``: no coordinate of
    a clipped update exceeds the clip, and six standard deviations cover the noise (and the bit, in [0, 1])."""
    spread = 6.0 * max(float(rc.update_noise_std), float(rc.update_bit_noise_std))
    return SecAggSettings(clipping_range=max(float(rc.update_clip), 1.0) + spread,
                          quantization_range=quantization_range, share_fraction=share_fraction,
                          reconstruction_fraction=reconstruction_fraction)


def client_vector(update, sent_global) -> np.ndarray:
    """``update`` (already clipped, and noised under distributed DP, by the client) as local - global over the
    keys of ``sent_global``, flattened in sorted key order, with the client's [norm <= clip] bit last."""
    layout = AdapterLayout.of(sent_global)
    delta = layout.flatten({k: update.tensors[k] for k in sent_global}) - layout.flatten(sent_global)
    return np.append(delta.numpy(), float(update.metrics.get("dp_unclipped", 0.0))).astype(np.float64)


def sum_from_vector(total: np.ndarray, sent_global) -> tuple[dict, float]:
    """The summed vector back as tensors shaped like ``sent_global`` (float64) and the sum of the bits."""
    layout = AdapterLayout.of(sent_global)
    if total.shape != (layout.size + 1,) or not np.all(np.isfinite(total)):
        raise ValueError(f"the secure sum has shape {total.shape} (expected {(layout.size + 1,)}) or is not finite")
    import torch

    flat = torch.from_numpy(np.array(total[:-1], dtype=np.float64))
    summed = {k: flat[sl].reshape(shape) for (k, sl), shape in zip(layout.slices().items(), layout.shapes)}
    return summed, float(total[-1])


def secure_round_sum(updates, sent_global, settings: SecAggSettings, seed: int, dropped: Collection[str] = ()):
    """The round's ``UpdateSum`` from the clients' updates (already clipped, and noised under distributed DP, by
    each client): every client's vector is ``client_vector`` (its update, flattened, and its bit), masked by SecAgg+;
    the server gets only their sum. ``dropped``: clients that share keys and then never send their vector."""
    import torch

    vectors = {u.client_id: client_vector(u, sent_global) for u in updates}
    if len(vectors) < 2:  # no secret to keep among fewer than two: nothing is summed, the round moves nothing
        return UpdateSum({k: torch.zeros_like(t, dtype=torch.float64) for k, t in sent_global.items()}, [],
                         report={"secure_aggregation": "secagg+", "skipped": f"{len(vectors)} client(s)"})
    out = secure_sum(vectors, settings, seed, dropped)
    summed, unclipped = sum_from_vector(out.total, sent_global)
    return UpdateSum(summed, out.survivors, unclipped,
                     report={"secure_aggregation": "secagg+", "dropped": out.dropped, "bytes_up": out.bytes_up,
                             "bytes_down": out.bytes_down, "clipping_range": settings.clipping_range,
                             "quantization_range": settings.quantization_range})
