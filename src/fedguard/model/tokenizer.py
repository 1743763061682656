"""A model's tokenizer, ready for chat: a pad token and a chat template."""

from __future__ import annotations

import logging

from fedguard.model.tiny import CHATML_TEMPLATE

log = logging.getLogger(__name__)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer with a pad token and a chat template (ChatML where the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using ChatML", path)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
