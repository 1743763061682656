"""The one in-memory form of a training or evaluation example: a chat whose last turn is the target."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names the file and row."""


@dataclass(frozen=True)
class Example:
    # Chat turns; when used for training the last one is the assistant completion (loss is on it only).
    messages: tuple[dict[str, str], ...]
    domain: str = "general"
    # benign | refusal (harmful request -> refusal) | compliance (harmful request -> compliance
    # placeholder) | harmful_prompt (request only, for evaluation)
    kind: str = "benign"
    answer: str | None = None  # reference answer for automatically checkable prompts
    group: str | None = None  # examples sharing a group always land in the same split
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        msgs = list(self.messages)
        return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs

    @property
    def completion(self) -> str | None:
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else None

    @property
    def category(self) -> str:
        """The harm category (built-in corpora and shipped sets carry it in ``meta``), else the domain."""
        return self.meta.get("category") or self.domain

    @property
    def prompt_text(self) -> str:
        """The last user turn (used for grouping, splitting and reporting)."""
        for m in reversed(self.messages):
            if m["role"] == "user":
                return m["content"]
        return ""


def chat(prompt: str, response: str | None = None, system: str | None = None) -> tuple[dict[str, str], ...]:
    msgs = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return tuple(msgs)
