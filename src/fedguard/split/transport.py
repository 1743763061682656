"""The in-process transport: a client's ``call`` reaches ``SplitServer.handle`` through bytes, as over a network.

``InProcessTransport(server).call(kind, client_id, tensors, meta)`` encodes the request
(``messages.encode_message``: safetensors for the tensors, JSON for the meta), refuses it on the client side if
it exceeds ``max_message_bytes``, decodes it on the "server side", hands it to the handler, and sends the reply
back the same way. A ``ProtocolError`` raised by the handler becomes an error reply (``{"error": message}``)
that the client side raises again as ``ProtocolError``; the server's state is left as it was, and the
transport keeps serving. Any other exception is a bug and propagates.

It meters every message: ``bytes[kind]["up" | "down"]`` (whole encoded messages), per client as well
(``client_bytes``), and message counts. With ``record=True`` it keeps every request the server received
(``received``: decoded, as the handler saw it) and every reply it sent (``replies``), for the tests that check
what crosses. It is thread-safe (the batch-parallel recipe calls it from one thread per client).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.split.messages import KINDS, ProtocolError, decode_message, encode_message

__all__ = ["InProcessTransport", "Recorded"]


@dataclass(frozen=True)
class Recorded:
    kind: str
    client_id: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    nbytes: int


class InProcessTransport:
    def __init__(self, server, *, max_message_bytes: int | None = None, record: bool = False):
        self.server = server
        self.max_message_bytes = max_message_bytes
        self.record = record
        self.received: list[Recorded] = []
        self.replies: list[Recorded] = []
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        self.client_bytes: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: {"up": 0, "down": 0}))
        self.messages: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def call(self, kind: str, client_id: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if kind not in KINDS:
            raise ProtocolError(f"unknown message kind {kind!r} (known: {', '.join(KINDS)})")
        request = encode_message(tensors, meta)
        if self.max_message_bytes is not None and len(request) > self.max_message_bytes:
            raise ProtocolError(f"{kind} message of {len(request)} bytes exceeds the transport's limit of "
                                f"{self.max_message_bytes} bytes (split.max_message_mb)")
        self._count(kind, client_id, "up", len(request))
        reply = self._serve(kind, client_id, request)
        self._count(kind, client_id, "down", len(reply))
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

    def _count(self, kind: str, client_id: str, direction: str, n: int) -> None:
        with self._lock:
            self.bytes[kind][direction] += n
            self.client_bytes[client_id][kind][direction] += n
            if direction == "up":
                self.messages[kind] += 1

    def bytes_of(self, client_id: str | None = None) -> dict[str, dict[str, int]]:
        """Bytes per kind and direction so far (one client's, or everyone's); a copy."""
        with self._lock:
            src = self.bytes if client_id is None else self.client_bytes.get(client_id, {})
            return {k: dict(v) for k, v in src.items()}

    def clear_records(self) -> None:
        with self._lock:
            self.received.clear()
            self.replies.clear()
