"""The in-process transport: a client's ``call`` reaches ``SplitServer.handle`` through bytes, as over a network.

``InProcessTransport(server).call(kind, client_id, tensors, meta)`` encodes the request
(``messages.encode_message``: safetensors for the tensors, JSON for the meta), refuses it on the client side if
it exceeds ``max_message_bytes``, decodes it on the "server side", hands it to the handler, and sends the reply
back the same way. A ``ProtocolError`` raised by the handler becomes an error reply (``{"error": message}``)
that the client side raises again as ``ProtocolError``; the server's state is left as it was, and the
transport keeps serving. Any other exception is a bug and propagates.

It meters every message as the gRPC transport and server do (``ByteMeter``): ``bytes[kind]["up" | "down"]``
(whole encoded messages), per client (``bytes_of(client_id)``), and exchanges per kind (``messages``). With ``record=True`` it keeps every request the server received
(``received``: decoded, as the handler saw it) and every reply it sent (``replies``), for the tests that check
what crosses. It is thread-safe (the batch-parallel recipe calls it from one thread per client).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.split.messages import KINDS, ProtocolError, decode_message, encode_message

__all__ = ["ByteMeter", "InProcessTransport", "Recorded"]


@dataclass(frozen=True)
class Recorded:
    kind: str
    client_id: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    nbytes: int


class ByteMeter:
    """Message bytes per client and kind, "up" (client -> server) and "down", and exchanges per kind: what every
    split transport and the gRPC server meter (``bytes`` / ``bytes_of`` / ``messages``). Thread-safe; reads are
    copies."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset_bytes()

    def reset_bytes(self) -> None:
        with self._lock:
            self._bytes: dict[str, dict[str, dict[str, int]]] = {}  # client_id -> kind -> up/down
            self._messages: dict[str, int] = {}

    def _count(self, client_id: str, kind: str, up: int, down: int, exchange: bool = True) -> None:
        """Add bytes; ``exchange``: this is a new request/reply exchange of ``kind`` (counted once)."""
        with self._lock:
            d = self._bytes.setdefault(client_id, {}).setdefault(kind, {"up": 0, "down": 0})
            d["up"] += up
            d["down"] += down
            if exchange:
                self._messages[kind] = self._messages.get(kind, 0) + 1

    def bytes_of(self, client_id: str | None = None) -> dict[str, dict[str, int]]:
        """Bytes per kind and direction so far (one client's, or everyone's)."""
        with self._lock:
            out: dict[str, dict[str, int]] = {}
            for cid, kinds in self._bytes.items():
                if client_id is None or cid == client_id:
                    for kind, d in kinds.items():
                        o = out.setdefault(kind, {"up": 0, "down": 0})
                        o["up"] += d["up"]
                        o["down"] += d["down"]
            return out

    @property
    def bytes(self) -> dict[str, dict[str, int]]:
        return self.bytes_of()

    @property
    def messages(self) -> dict[str, int]:
        with self._lock:
            return dict(self._messages)

    def total_bytes(self) -> dict[str, int]:
        """{"up": .., "down": ..} over every kind and client."""
        b = self.bytes
        return {d: sum(v[d] for v in b.values()) for d in ("up", "down")}

class InProcessTransport(ByteMeter):
    def __init__(self, server, *, max_message_bytes: int | None = None, record: bool = False):
        super().__init__()
        self.server = server
        self.max_message_bytes = max_message_bytes
        self.record = record
        self.received: list[Recorded] = []
        self.replies: list[Recorded] = []

    def call(self, kind: str, client_id: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if kind not in KINDS:
            raise ProtocolError(f"unknown message kind {kind!r} (known: {', '.join(KINDS)})")
        request = encode_message(tensors, meta)
        if self.max_message_bytes is not None and len(request) > self.max_message_bytes:
            raise ProtocolError(f"{kind} message of {len(request)} bytes exceeds the transport's limit of "
                                f"{self.max_message_bytes} bytes (split.max_message_mb)")
        self._count(client_id, kind, len(request), 0)
        reply = self._serve(kind, client_id, request)
        self._count(client_id, kind, 0, len(reply), exchange=False)
        out_tensors, out_meta = decode_message(reply)
        if "error" in out_meta:
            raise ProtocolError(f"the server refused {kind}: {out_meta['error']}")
        return out_tensors, out_meta.get("meta", {})

    def _serve(self, kind: str, client_id: str, request: bytes) -> bytes:
        """The server's side: decode, handle, encode the reply (or the refusal)."""
        try:
            tensors, meta = decode_message(request)
            if self.record:
                with self._lock:
                    self.received.append(Recorded(kind, client_id, dict(tensors), dict(meta), len(request)))
            out_tensors, out_meta = self.server.handle(kind, client_id, tensors, meta)
            reply = encode_message(out_tensors, {"meta": out_meta})
        except ProtocolError as exc:
            return encode_message({}, {"error": str(exc)})
        if self.record:
            with self._lock:
                self.replies.append(Recorded(kind, client_id, dict(out_tensors), dict(out_meta), len(reply)))
        return reply

    def clear_records(self) -> None:
        with self._lock:
            self.received.clear()
            self.replies.clear()
