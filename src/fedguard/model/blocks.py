"""A block-level seam through a loaded LLaMA-architecture causal LM, for U-shaped split learning.

``BlockSeam(model, k_a, k_c)`` cuts the decoder stack of one resident model (plain or PEFT-wrapped, as
``fedguard.model.attach_lora`` returns it) into three callables that run only their own modules:

* ``front(input_ids, counts)``: the token embedding and decoder layers ``[0, kA)`` (no final norm);
* ``middle(hidden, counts)``: layers ``[kA, L - kC)``, keeping their global layer indices (what a server holds);
* ``back(hidden, counts)``: layers ``[L - kC, L)`` and the final norm. The LM head is not applied: the caller
  (the loss) applies it at the positions it needs; ``seam.logits(hidden_final)`` is there for convenience.

The parts hold references to the model's own modules: no weights are copied, LoRA layers injected by PEFT
run (and train) wherever they sit, and ``part.named_parameters()`` gives each part its own parameters
(one optimizer per part). Validation: ``k_a >= 1``, ``k_c >= 1`` and ``k_a + k_c < L`` (the server holds
at least one block); a violation raises ``ValueError`` naming the field.

Design decisions
----------------
What crosses between parts is the hidden state ``[B, q, H]`` and, in a prefill/training call, the
per-sample token counts ``counts`` (``[B]`` int64, right padding: row ``b`` holds ``counts[b]`` real tokens
followed by padding). Everything else is rebuilt by each part locally:

* **Positions.** A chunk of ``q`` tokens gets ``position_ids[b] = seen[b] + arange(q)``, where ``seen[b]``
  is the number of *real* tokens the part's cache has already seen for row ``b`` (0 without a cache). A
  right-padded prefill thus gets ``arange(T)`` in every row, exactly what ``LlamaModel.forward`` uses, and
  the first decoded token of row ``b`` gets position ``counts[b]`` whatever the padded width ``T`` was.
  Each part computes its rotary embeddings with the model's own ``model.model.rotary_emb`` from these
  positions (``positions=`` overrides them, e.g. for a protocol that does send position ids).
* **Attention masks ("attention-mask compression").** The 2-D padding mask is
  ``arange(q) < counts[:, None]`` (``padding_mask_from_counts``), appended to the padding mask the part's
  cache remembers; the 4-D causal + padding mask is then built by transformers' own
  ``masking_utils.create_causal_mask`` with the model's config, exactly as ``LlamaModel.forward`` builds it
  (``attention_mask_from_counts``): a float ``0 / finfo.min`` mask for eager attention, a boolean mask, or
  ``None`` (``is_causal``) where sdpa can skip it. No mask tensor ever needs to cross.
* **KV cache (collaborative decoding).** ``part.new_cache()`` (or ``seam.new_caches()``) returns a
  ``PartCache``: a transformers ``DynamicCache`` indexed by *global* layer index that only the part's own
  layers may write (a stray write to another layer raises) and whose lengths are read from the part's first
  layer, plus the 2-D padding mask of everything the part has seen (``cache.valid``), from which positions
  and masks of later chunks follow. It uses only the public cache API (``update``, ``get_seq_length``,
  ``reset``, ``create_causal_mask(layer_idx=...)``): no layer classes of transformers' internals. So a decode
  step sends only ``[B, 1, H]`` between parts: no counts (a decode chunk is all real tokens), no positions, no
  mask, no K/V. ``greedy_decode`` runs prefill and decode through the three parts
  with three such caches; rows may be right-padded to different lengths (the pad slots stay in each cache,
  masked, so a padded batch decodes like each prompt alone, up to fp32 rounding of the longer reductions).
  Right padding (fedguard's convention) rather than FedSEA's left padding to a fixed length: with per-row
  positions from the counts, neither side needs the padded length as a protocol constant.
* **Precision.** The parts run in whatever dtype the model runs in; under bf16 the caller enters
  ``LoadedModel.autocast()`` around the calls, as ``CompletionLoss`` does. Hidden states sent over a wire in
  a lower precision must be cast back by the receiver.

Scope: LLaMA-style decoders (``embed_tokens -> layers -> norm``, ``rotary_emb``, full causal attention, a
plain head). Models whose forward does more (sliding-window layers, logit soft-capping or scaling) are
refused, since the seam would silently compute something else. With tied embeddings the head shares the
embedding weight; both live on the client (front and back), but LoRA on ``embed_tokens`` would then move
the head as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

__all__ = ["BlockPart", "BlockSeam", "PartCache", "SplitPoints", "attention_mask_from_counts", "chunk_positions",
           "greedy_decode", "padding_mask_from_counts"]


@dataclass(frozen=True)
class SplitPoints:
    """Partition points of a U-shaped split over ``num_layers`` decoder blocks."""

    k_a: int  # kA: client input blocks (with the embedding)
    k_c: int  # kC: client output blocks (with the final norm and the head)
    num_layers: int

    def __post_init__(self):
        for name, value in (("k_a", self.k_a), ("k_c", self.k_c)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                side = "input" if name == "k_a" else "output"
                raise ValueError(f"{name} (client {side} blocks) must be >= 1, got {value}")
        if self.k_a + self.k_c >= self.num_layers:
            raise ValueError(
                f"k_a + k_c must be < the model's {self.num_layers} decoder layers so the server holds at least one "
                f"block; got k_a={self.k_a}, k_c={self.k_c}")

    @property
    def front(self) -> range:
        return range(self.k_a)

    @property
    def middle(self) -> range:
        return range(self.k_a, self.num_layers - self.k_c)

    @property
    def back(self) -> range:
        return range(self.num_layers - self.k_c, self.num_layers)


def padding_mask_from_counts(counts: torch.Tensor | None, length: int, batch: int | None = None,
                             device: torch.device | None = None) -> torch.Tensor:
    """The 2-D right-padding mask ``[B, length]`` (True on real tokens) of per-sample token counts;
    ``counts=None``: every position is real (``batch`` rows)."""
    if counts is None:
        if batch is None:
            raise ValueError("padding_mask_from_counts: give counts or batch")
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    counts = torch.as_tensor(counts, device=device)
    if counts.ndim != 1 or (batch is not None and counts.shape[0] != batch):
        raise ValueError(f"counts must have shape [{batch if batch is not None else 'B'}], got {tuple(counts.shape)}")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"counts must be integers, got {counts.dtype}")
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > length):
        raise ValueError(f"counts must lie in [0, {length}] (the chunk length), got {counts.tolist()}")
    return torch.arange(length, device=counts.device) < counts[:, None]


class PartCache(DynamicCache):
    """The KV cache of one part: a ``DynamicCache`` over the global layer indices in which only the part's own
    layers store keys and values (a write to another layer raises), plus ``valid``, the 2-D padding mask of every
    token seen so far. Every owned layer holds the same tokens, so lengths are read from the first one."""

    def __init__(self, config, layers: Iterable[int]):
        super().__init__(config=config)
        self.owned = tuple(layers)
        if not self.owned:
            raise ValueError("a PartCache needs at least one layer")
        self.valid: torch.Tensor | None = None  # [B, seen] bool

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.owned:
            raise ValueError(f"layer {layer_idx} wrote to the cache of the part holding layers {list(self.owned)}")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        return super().get_seq_length(self.owned[0] if layer_idx is None else layer_idx)

    def seen_tokens(self) -> int:
        return 0 if self.valid is None else int(self.valid.shape[1])

    def reset(self):
        super().reset()
        self.valid = None

    def __repr__(self):
        return f"PartCache(layers={list(self.owned)}, seen={self.seen_tokens()})"


def chunk_positions(batch: int, length: int, cache=None, device: torch.device | None = None) -> torch.Tensor:
    """Position ids ``[B, length]`` of the next chunk: each row continues after the real tokens the cache
    has seen for it (``arange(length)`` without a cache)."""
    base = torch.arange(length, device=device)
    valid = getattr(cache, "valid", None)
    if valid is None:
        return base.expand(batch, length)
    seen = valid.sum(dim=-1).to(device=base.device)
    return seen[:, None] + base


def attention_mask_from_counts(config, hidden: torch.Tensor, counts: torch.Tensor | None = None, *, cache=None,
                               positions: torch.Tensor | None = None):
    """The attention mask the decoder layers take for the chunk ``hidden`` ``[B, q, H]``, rebuilt from
    per-sample token counts (right padding) and what ``cache`` has seen, with transformers'
    ``create_causal_mask`` the way ``LlamaModel.forward`` calls it (float for eager attention; bool or
    ``None`` for sdpa)."""
    batch, length = hidden.shape[:2]
    kv_valid = _kv_valid(counts, batch, length, cache, hidden.device)
    if positions is None:
        positions = chunk_positions(batch, length, cache, hidden.device)
    return _causal_mask(config, hidden, kv_valid, cache, positions)


def _causal_mask(config, hidden: torch.Tensor, kv_valid: torch.Tensor, cache, positions: torch.Tensor):
    # A part's cache is sized by its own first layer (by default transformers reads the model's first layer).
    owned = getattr(cache, "owned", None)
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=kv_valid, cache=cache,
                              position_ids=positions, layer_idx=owned[0] if owned else None)


def _kv_valid(counts, batch: int, length: int, cache, device) -> torch.Tensor:
    chunk = padding_mask_from_counts(counts, length, batch, device)
    valid = getattr(cache, "valid", None)
    if valid is None:
        return chunk
    if valid.shape[0] != batch:
        raise ValueError(f"the cache holds {valid.shape[0]} rows, the chunk has {batch}")
    return torch.cat([valid.to(device), chunk], dim=1)


def _causal_lm(model):
    get_base = getattr(model, "get_base_model", None)  # a PEFT model
    return get_base() if callable(get_base) else model


class BlockPart:
    """One part of the seam: runs the embedding (front only), its decoder layers and the final norm
    (back only) of the shared model."""

    def __init__(self, seam: BlockSeam, role: str, layers: range, embed: bool, final_norm: bool):
        self.seam = seam
        self.role = role
        self.layers = layers
        self.embed = embed
        self.final_norm = final_norm

    def modules(self) -> list[torch.nn.Module]:
        decoder = self.seam.decoder
        mods = [decoder.embed_tokens] if self.embed else []
        mods += [decoder.layers[i] for i in self.layers]
        if self.final_norm:
            mods += [decoder.norm, self.seam.head]
        return mods

    def named_parameters(self, trainable_only: bool = True) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This part's parameters under their names in the model given to the seam (each once; with tied
        embeddings the head's weight is the embedding's)."""
        names = {id(p): n for n, p in self.seam.model.named_parameters(remove_duplicate=False)}
        seen: set[int] = set()
        for module in self.modules():
            for p in module.parameters():
                if id(p) in seen or (trainable_only and not p.requires_grad):
                    continue
                seen.add(id(p))
                yield names[id(p)], p

    def parameters(self, trainable_only: bool = True) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters(trainable_only)]

    def new_cache(self):
        """An empty KV cache over this part's layers (global indices)."""
        return PartCache(self.seam.config, self.layers)

    def __call__(self, x: torch.Tensor, counts: torch.Tensor | None = None, *, positions: torch.Tensor | None = None,
                 cache=None) -> torch.Tensor:
        """Run the part on a chunk: ``x`` is ``input_ids [B, q]`` for the front, else hidden states
        ``[B, q, H]``; ``counts`` the real tokens per row of this chunk (right padding; None: all real);
        ``cache`` this part's ``PartCache`` (None: no cache, as in training), which the call extends."""
        decoder = self.seam.decoder
        if self.embed:
            if x.dtype.is_floating_point:
                raise ValueError("the front part takes input_ids, not hidden states")
            hidden = decoder.embed_tokens(x)
        else:
            if x.ndim != 3:
                raise ValueError(f"the {self.role} part takes hidden states [B, q, H], got shape {tuple(x.shape)}")
            hidden = x
        if cache is not None and (not isinstance(cache, PartCache) or cache.owned != tuple(self.layers)):
            raise ValueError(f"the {self.role} part needs its own cache (part.new_cache()), got {cache!r}")
        batch, length = hidden.shape[:2]
        kv_valid = _kv_valid(counts, batch, length, cache, hidden.device)
        if positions is None:
            positions = chunk_positions(batch, length, cache, hidden.device)
        mask = _causal_mask(self.seam.config, hidden, kv_valid, cache, positions)
        rotary = decoder.rotary_emb(hidden, position_ids=positions)
        for i in self.layers:
            hidden = decoder.layers[i](hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions,
                                       cache=cache, use_cache=cache is not None)
        if cache is not None:
            cache.valid = kv_valid
        if self.final_norm:
            hidden = decoder.norm(hidden)
        return hidden

    def __repr__(self):
        return f"BlockPart({self.role}, layers={list(self.layers)})"


class BlockSeam:
    """Front / middle / back parts over one resident causal LM (see the module docstring)."""

    def __init__(self, model, k_a: int, k_c: int):
        self.model = model
        self.lm = _causal_lm(model)
        self.decoder = self.lm.get_decoder()
        self.head = self.lm.get_output_embeddings()
        self.config = self.decoder.config
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(self.decoder, attr):
                raise TypeError(f"{type(self.decoder).__name__} has no {attr}: the block seam needs a LLaMA-style decoder")
        if self.head is None:
            raise TypeError(f"{type(self.lm).__name__} has no output embeddings (LM head)")
        refused = [f for f in ("sliding_window", "final_logit_softcapping", "logit_scale", "attn_logit_softcapping")
                   if getattr(self.config, f, None)]
        layer_types = getattr(self.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            refused.append("layer_types")
        if refused:
            raise TypeError(f"the block seam replicates LlamaModel.forward; this model's config sets {refused}")
        num_layers = len(self.decoder.layers)
        if num_layers != self.config.num_hidden_layers:
            raise TypeError(f"the decoder has {num_layers} layers but config.num_hidden_layers is "
                            f"{self.config.num_hidden_layers}")
        self.points = SplitPoints(k_a, k_c, num_layers)
        self.front = BlockPart(self, "front", self.points.front, embed=True, final_norm=False)
        self.middle = BlockPart(self, "middle", self.points.middle, embed=False, final_norm=False)
        self.back = BlockPart(self, "back", self.points.back, embed=False, final_norm=True)

    @property
    def parts(self) -> tuple[BlockPart, BlockPart, BlockPart]:
        return self.front, self.middle, self.back

    def logits(self, hidden_final: torch.Tensor) -> torch.Tensor:
        """The LM head on (the needed positions of) the back part's output."""
        return self.head(hidden_final)

    def new_caches(self):
        """Three empty caches (front, middle, back), one per part."""
        return tuple(part.new_cache() for part in self.parts)

    def __call__(self, input_ids: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """front -> middle -> back in one process (no cache): the final hidden states."""
        return self.back(self.middle(self.front(input_ids, counts), counts), counts)


@torch.no_grad()
def greedy_decode(seam: BlockSeam, input_ids: torch.Tensor, counts: torch.Tensor | None = None, *,
                  max_new_tokens: int, eos_token_id: int | Iterable[int] | None = None,
                  pad_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding through the three parts, each with its own KV cache: a prefill of the (right-padded)
    prompts, then one ``[B, 1, H]`` hidden state per part per new token. Returns the new tokens
    ``[B, n]`` (n <= max_new_tokens); rows that emitted an EOS continue with ``pad_token_id``, and decoding
    stops once every row has (as ``generate(do_sample=False)`` does)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, length = input_ids.shape
    device = input_ids.device
    counts = (torch.full((batch,), length, dtype=torch.long, device=device) if counts is None
              else torch.as_tensor(counts, device=device))
    if int(counts.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())),
                       dtype=torch.long, device=device)
    if eos.numel() and pad_token_id is None:
        raise ValueError("pad_token_id is needed with eos_token_id (rows that finished are padded)")
    caches = seam.new_caches()
    hidden = input_ids
    for part, cache in zip(seam.parts, caches):
        hidden = part(hidden, counts, cache=cache)
    nxt = seam.logits(hidden[torch.arange(batch, device=device), counts - 1]).argmax(-1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        tok = torch.where(finished, pad_token_id if pad_token_id is not None else 0, nxt)
        out.append(tok)
        if eos.numel():
            finished |= torch.isin(tok, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        hidden = tok[:, None]
        for part, cache in zip(seam.parts, caches):
            hidden = part(hidden, cache=cache)
        nxt = seam.logits(hidden[:, -1]).argmax(-1)
    return torch.stack(out, dim=1)
