"""FedSEA-style U-shaped split learning (Zhang et al., arXiv 2505.15683), beside ``fedguard.federated``.

Each client holds the token embedding, the first ``k_a`` decoder blocks (part A) and the last ``k_c`` blocks,
the final norm, the LM head and the loss (part C) of the model; the server holds the blocks in between
(part B) with their global layer indices. LoRA trains on all three parts, base weights frozen. Per training
step the client sends its (optionally noised) hidden state and per-row token counts, gets B's output back,
computes the completion-only loss, sends the gradient of B's output and gets the gradient of its own output
back (``client``, ``server``). Generation runs with a KV cache per party (``generate``). Every message goes
through a transport object (``transport``: in process, metered, through bytes; ``grpc_transport``: over the
network); what each message carries is listed in ``messages``. ``train`` is the recipe behind
``fedguard split train``.

Names are imported on first use, so ``fedguard.split.messages`` stays light for transports.
"""

from importlib import import_module

_EXPORTS = {
    "KINDS": "messages", "PROTOCOL_VERSION": "messages", "ProtocolError": "messages", "Transport": "messages",
    "decode_message": "messages", "encode_message": "messages", "split_spec": "messages",
    "SplitClient": "client", "SplitServer": "server", "InProcessTransport": "transport", "PartLora": "params",
    "collaborative_greedy": "generate", "generate_texts": "generate",
    "aggregate_client_parts": "train", "build_split_system": "train", "train_split": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedguard.split' has no attribute {name!r}")
    return getattr(import_module(f"fedguard.split.{_EXPORTS[name]}"), name)
