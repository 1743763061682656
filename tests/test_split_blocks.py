"""The block-level seam (fedguard.model.blocks): front / middle / back over one resident model equal the
unsplit model in the forward pass, in LoRA gradients (also across detach + hand-passed gradients, as split
training over a network does), in KV-cached greedy decoding, and in the attention masks rebuilt from counts."""

import pytest
import torch

from fedguard.model.blocks import (BlockSeam, PartCache, SplitPoints, attention_mask_from_counts, greedy_decode,
                                   padding_mask_from_counts)

SPLITS = [(1, 1), (1, 2), (2, 1)]  # on 4 layers: middles of 2, 1 and 1 blocks

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (conftest)


def _sharpen(model):
    # The random model's weights (std 0.02) give near-uniform logits, and greedy decoding repeats one token,
    # which would hide a position bug; larger weights make the greedy path vary.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8)


@pytest.fixture(scope="module")
def tiny4(tiny4_path):
    """A 4-layer tiny LLaMA (eager attention, fp32) with LoRA on q/v, dropout 0, and a nonzero adapter (B = 0
    at init would leave every lora_A gradient zero)."""
    from fedguard.config import LoraSettings, ModelConfig
    from fedguard.model import attach_lora, load_base_model

    loaded = load_base_model(ModelConfig(name_or_path=str(tiny4_path), precision="fp32"))
    _sharpen(loaded.model)
    peft_model, slot = attach_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0, init_seed=5))
    g = torch.Generator().manual_seed(11)
    slot.load({k: 0.3 * torch.randn(shape, generator=g) for k, shape in slot.shapes().items()})
    peft_model.eval()
    return loaded, peft_model, slot


@pytest.fixture(scope="module")
def plain_sdpa(tiny4_path):
    """The same 4 layers as a plain transformers model (no PEFT) with sdpa attention."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny4_path, dtype=torch.float32, attn_implementation="sdpa")
    _sharpen(model)
    return model.eval()


def _batch(vocab=1024, pad=2, counts=(9, 5, 2), seed=0):
    """Right-padded token ids [B, T] with the given real-token counts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    ids = torch.randint(3, vocab, (len(counts), int(counts.max())), generator=g)
    valid = torch.zeros(ids.shape, dtype=torch.bool)  # built here, not by the code under test
    for row, n in enumerate(counts.tolist()):
        valid[row, :n] = True
    return ids.masked_fill(~valid, pad), counts, valid


def _layer_mask_recorder(model):
    """Records the attention_mask the model's first decoder layer receives (what LlamaModel.forward built)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = []
    handle = lm.get_decoder().layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    return seen, handle


def _same_mask(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# --- 1. forward ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k_a,k_c", SPLITS)
def test_front_middle_back_then_head_equals_full_logits(tiny4, k_a, k_c):
    _, peft_model, _ = tiny4
    ids, counts, valid = _batch()
    seam = BlockSeam(peft_model, k_a, k_c)
    assert [list(p.layers) for p in seam.parts] == [list(range(k_a)), list(range(k_a, 4 - k_c)),
                                                   list(range(4 - k_c, 4))]
    with torch.no_grad():
        full = peft_model(input_ids=ids, attention_mask=valid.long()).logits
        h = seam.front(ids, counts)
        h = seam.middle(h, counts)
        split = seam.logits(seam.back(h, counts))
    assert (split - full)[valid].abs().max() <= 1e-5
    assert (split - full).abs().max() <= 1e-5  # pad rows see the same (masked) context in both


def test_plain_model_with_sdpa_and_the_unwrapped_peft_model(tiny4, plain_sdpa):
    _, peft_model, _ = tiny4
    ids, counts, valid = _batch(counts=(7, 7, 3, 6))
    with torch.no_grad():
        for model in (plain_sdpa, peft_model.get_base_model()):
            full = model(input_ids=ids, attention_mask=valid.long()).logits
            split = BlockSeam(model, 1, 2)
            assert (split.logits(split(ids, counts)) - full)[valid].abs().max() <= 1e-5


def test_parts_share_the_resident_weights_and_partition_the_lora_parameters(tiny4):
    _, peft_model, slot = tiny4
    seam = BlockSeam(peft_model, 1, 2)
    lora = {id(p) for p in slot.parameters()}
    per_part = [{id(p) for p in part.parameters()} for part in seam.parts]
    assert all(per_part) and set().union(*per_part) == lora and sum(map(len, per_part)) == len(lora)
    names = [dict(part.named_parameters()) for part in seam.parts]
    assert all(".layers.0." in n for n in names[0]) and all(".layers.3." in n or ".layers.2." in n for n in names[2])
    model_params = {id(p) for p in peft_model.parameters()}
    assert all(id(p) in model_params for part in seam.parts for p in part.parameters(trainable_only=False))
    assert seam.front.parameters(trainable_only=False)[0] is seam.decoder.embed_tokens.weight


# --- 2. backward --------------------------------------------------------------------------------------------

def _next_token_loss(logits, ids, valid):
    targets = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                                             reduction="sum")


def _grads(slot):
    return {k: p.grad.clone() for k, p in slot.named_parameters().items()}


@pytest.mark.parametrize("k_a,k_c", SPLITS)
def test_lora_gradients_equal_the_unsplit_model(tiny4, k_a, k_c):
    _, peft_model, slot = tiny4
    ids, counts, valid = _batch(counts=(9, 6, 3))
    seam = BlockSeam(peft_model, k_a, k_c)
    params = slot.named_parameters()

    peft_model.zero_grad(set_to_none=True)
    _next_token_loss(peft_model(input_ids=ids, attention_mask=valid.long()).logits, ids, valid).backward()
    full = _grads(slot)

    # one autograd graph through the three parts
    peft_model.zero_grad(set_to_none=True)
    _next_token_loss(seam.logits(seam(ids, counts)), ids, valid).backward()
    joined = _grads(slot)

    # split training over a network: each crossing is a detached leaf, gradients are handed back by hand
    peft_model.zero_grad(set_to_none=True)
    h_a = seam.front(ids, counts)
    server_in = h_a.detach().requires_grad_()
    h_b = seam.middle(server_in, counts)
    client_in = h_b.detach().requires_grad_()
    _next_token_loss(seam.logits(seam.back(client_in, counts)), ids, valid).backward()
    back_keys = {k for k, p in params.items() if p.grad is not None}
    h_b.backward(client_in.grad)
    h_a.backward(server_in.grad)
    handed = _grads(slot)
    peft_model.zero_grad(set_to_none=True)

    assert back_keys == {k for k in params if any(f".layers.{i}." in k for i in seam.back.layers)}
    for k in params:
        assert full[k].abs().max() > 0, k
        torch.testing.assert_close(joined[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(handed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)


# --- 3. decoding with per-part KV caches ----------------------------------------------------------------------

PROMPTS = ["How do I bake bread at home?", "Name three colours.", "Explain what a compiler does, briefly and simply."]


def _right_padded(tok, texts):
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    counts = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(counts.max())), tok.pad_token_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    return ids, counts


@pytest.mark.parametrize("k_a,k_c", [(1, 1), (2, 1)])
def test_greedy_decode_with_part_caches_equals_generate(tiny4, k_a, k_c):
    loaded, peft_model, _ = tiny4
    tok = loaded.tokenizer
    ids, counts = _right_padded(tok, PROMPTS)
    assert len(set(counts.tolist())) == len(PROMPTS)
    new = 12
    split = greedy_decode(BlockSeam(peft_model, k_a, k_c), ids, counts, max_new_tokens=new,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for row, n in enumerate(counts.tolist()):
        with torch.no_grad():
            gen = peft_model.generate(input_ids=ids[row:row + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long),
                                      max_new_tokens=new, do_sample=False, use_cache=True, temperature=None,
                                      top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)[0, n:]
        got = split[row, :len(gen)]
        assert got.tolist() == gen.tolist(), f"prompt {row}"
        assert (split[row, len(gen):] == tok.pad_token_id).all()  # generate stopped at EOS, the row padded
    assert len({tuple(r) for r in split.tolist()}) == len(PROMPTS)
    assert any(len(set(r)) > 3 for r in split.tolist())  # a path that varies, not one token repeated


def test_each_decode_step_moves_one_hidden_state_and_matches_the_full_cache(tiny4):
    """Stepwise: the parts exchange only [B, 1, H] per new token (no counts, positions or mask), and the
    logits equal the full model's, each prompt run unpadded with the model's own cache."""
    from transformers import DynamicCache

    loaded, peft_model, _ = tiny4
    tok = loaded.tokenizer
    ids, counts = _right_padded(tok, PROMPTS)
    seam = BlockSeam(peft_model, 1, 1)
    caches = seam.new_caches()
    batch = ids.shape[0]
    rows = torch.arange(batch)
    with torch.no_grad():
        h = ids
        for part, cache in zip(seam.parts, caches):
            h = part(h, counts, cache=cache)
        step_logits = [seam.logits(h[rows, counts - 1])]
        tokens = [step_logits[-1].argmax(-1)]
        for _ in range(5):
            h = tokens[-1][:, None]
            for part, cache in zip(seam.parts, caches):
                h = part(h, cache=cache)
                assert h.shape == (batch, 1, seam.config.hidden_size)
            step_logits.append(seam.logits(h[:, -1]))
            tokens.append(step_logits[-1].argmax(-1))
        assert [c.get_seq_length() for c in caches] == [ids.shape[1] + 5] * 3
        assert [c.layers[i].keys is not None for c in caches for i in range(4)] == [
            i in part.layers for part in seam.parts for i in range(4)]
        for row, n in enumerate(counts.tolist()):
            cache = DynamicCache(config=peft_model.config)
            out = peft_model(input_ids=ids[row:row + 1, :n], cache=cache, use_cache=True)
            full = [out.logits[0, -1]]
            for t in tokens[:-1]:
                out = peft_model(input_ids=t[row].view(1, 1), cache=cache, use_cache=True)
                full.append(out.logits[0, -1])
            for step, (a, b) in enumerate(zip(step_logits, full)):
                # batch of 3 (padded) against batch of 1: fp32 rounding, relative to the logits' scale
                assert (a[row] - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), f"prompt {row}, step {step}"


def test_caches_belong_to_their_part(tiny4):
    _, peft_model, _ = tiny4
    seam = BlockSeam(peft_model, 1, 2)
    ids, counts, valid = _batch()
    front_cache, middle_cache, _ = seam.new_caches()
    with torch.no_grad():
        h = seam.front(ids, counts, cache=front_cache)
        with pytest.raises(ValueError, match="own cache"):
            seam.middle(h, counts, cache=front_cache)
        first = seam.middle(h, counts, cache=middle_cache)
        assert isinstance(middle_cache, PartCache) and middle_cache.owned == (1,)
        assert middle_cache.valid.equal(valid) and middle_cache.get_seq_length() == ids.shape[1]
        middle_cache.reset()  # per request: the cache is reused empty
        assert middle_cache.valid is None and middle_cache.get_seq_length() == 0
        assert seam.middle(h, counts, cache=middle_cache).equal(first)
        assert seam.middle(h, counts).equal(first)
        # only the part's own layers may write to its cache (a layer of the front writing here is a wiring bug)
        kv = torch.zeros(ids.shape[0], peft_model.config.num_key_value_heads, 1,
                         peft_model.config.hidden_size // peft_model.config.num_attention_heads)
        with pytest.raises(ValueError, match="wrote to the cache"):
            middle_cache.update(kv, kv, 0)


# --- 4. masks from counts; partition points ------------------------------------------------------------------

@pytest.mark.parametrize("which", ["eager", "sdpa"])
@pytest.mark.parametrize("counts", [(9, 5, 2), (6, 6)])
def test_mask_from_counts_equals_the_full_models_mask(tiny4, plain_sdpa, which, counts):
    from transformers import DynamicCache

    model = tiny4[1] if which == "eager" else plain_sdpa
    ids, counts, valid = _batch(counts=counts)
    seen, handle = _layer_mask_recorder(model)
    full_cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=valid.long(), cache=full_cache, use_cache=True)
            step_mask = torch.cat([valid, torch.ones(len(counts), 1, dtype=torch.bool)], dim=1)
            model(input_ids=ids[:, :1], attention_mask=step_mask.long(), cache=full_cache, use_cache=True)
    finally:
        handle.remove()
    full_prefill, full_step = seen

    seam = BlockSeam(model, 1, 1)
    cache = seam.middle.new_cache()  # the server: only hidden states and counts arrive
    hidden = torch.zeros(len(counts), ids.shape[1], seam.config.hidden_size)
    ours = attention_mask_from_counts(seam.config, hidden, counts)
    assert _same_mask(ours, full_prefill)
    if which == "eager" or not bool((counts == ids.shape[1]).all()):
        assert ours is not None and ours.shape == (len(counts), 1, ids.shape[1], ids.shape[1])
    with torch.no_grad():
        seam.middle(seam.front(ids, counts), counts, cache=cache)
    ours_step = attention_mask_from_counts(seam.config, hidden[:, :1], cache=cache)
    assert _same_mask(ours_step, full_step)


def test_padding_mask_from_counts():
    assert padding_mask_from_counts(torch.tensor([3, 1, 0]), 3).tolist() == [
        [True, True, True], [True, False, False], [False, False, False]]
    with pytest.raises(ValueError, match="counts"):
        padding_mask_from_counts(torch.tensor([4]), 3)
    with pytest.raises(ValueError, match="counts"):
        padding_mask_from_counts(torch.tensor([[1]]), 3)


@pytest.mark.parametrize("k_a,k_c,field", [(0, 1, "k_a"), (1, 0, "k_c"), (-1, 1, "k_a"), (1.5, 1, "k_a"),
                                           (1, True, "k_c"), (2, 2, "k_a \\+ k_c"), (3, 1, "k_a \\+ k_c")])
def test_bad_partition_points_are_refused_by_name(tiny4, k_a, k_c, field):
    with pytest.raises(ValueError, match=field):
        BlockSeam(tiny4[1], k_a, k_c)


def test_two_layer_model_has_no_middle(tiny_loaded):
    with pytest.raises(ValueError, match=r"k_a \+ k_c .*2 decoder layers"):
        BlockSeam(tiny_loaded[1], 1, 1)
    assert list(SplitPoints(1, 1, 3).middle) == [1]
