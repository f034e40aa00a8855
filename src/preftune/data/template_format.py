"""The data a named chat template is made of (see `preftune.data.templates` for how it is encoded).

A template is a handful of *slot* sequences, one per kind of turn, plus a few flags. A slot is one of:

- a string, in which the placeholder `{{content}}` stands for the turn's text (replaced once per string);
- `Token("<|user|>")`: a token written by its id (`tokenizer.convert_tokens_to_ids`), never through the text
  tokenizer;
- `BOS` / `EOS`: the tokenizer's BOS token (nothing when it has none), the template's EOS token (see
  `ChatTemplate.replace_eos`).

These are the concepts of LLaMA-Factory's `register_template` (formatter slots, `efficient_eos`, `replace_eos`,
`stop_words`, `thought_words`, `Llama2Template`, `ReasoningTemplate`), written as preftune's own data.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

CONTENT = "{{content}}"
DEFAULT_THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")


class Special(enum.Enum):
    """A slot for the tokenizer's BOS token or the template's EOS token."""

    BOS = "bos_token"
    EOS = "eos_token"


BOS = Special.BOS
EOS = Special.EOS


@dataclass(frozen=True)
class Token:
    """A slot written as one token id, looked up by its text in the tokenizer's vocabulary."""

    text: str


Slot = str | Token | Special


@dataclass(frozen=True)
class ChatTemplate:
    """One named chat template.

    Attributes:
        name: the name used in configs (`template: qwen`).
        system: slots of the system prompt (`{{content}}` = the system text); written once, after `prefix`, before
            the first user turn, when there is a system prompt or a `default_system`.
        user: slots of a user turn; they also carry the header that opens the assistant's answer.
        assistant: slots of an assistant turn.
        prefix: slots written once at the very start.
        default_system: the system prompt used when a conversation has none (or an empty one); "" for none.
        stop_words: texts that end generation; the first is the end of an assistant turn for most templates.
        efficient_eos: the assistant slots carry no EOS; EOS is appended to each trained response instead.
        replace_eos: the template's EOS is `stop_words[0]` rather than the tokenizer's EOS.
        system_in_first_user: the system text, rendered through `system[0]`, is prepended to the first user
            message's content instead of being written on its own (LLaMA-Factory's `Llama2Template`).
        reasoning: a reasoning template (LLaMA-Factory's `ReasoningTemplate`): thoughts in earlier assistant turns
            are removed, and a response without a thought gets an empty one (see `templates.encode_conversation`).
        thought_words: the (opening, closing) texts around a thought.
        empty_thought: what an empty thought is written as; None means `thought_words` joined.
        multimodal: the name of LLaMA-Factory's multimodal plugin for this template, or None; preftune encodes the
            text part only (text rows have no images, videos or audio).
    """

    name: str
    system: tuple[Slot, ...] = (CONTENT,)
    user: tuple[Slot, ...] = (CONTENT,)
    assistant: tuple[Slot, ...] = (CONTENT, EOS)
    prefix: tuple[Slot, ...] = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    system_in_first_user: bool = False
    reasoning: bool = False
    thought_words: tuple[str, str] = DEFAULT_THOUGHT_WORDS
    empty_thought: str | None = None
    multimodal: str | None = None

    @property
    def empty_thought_text(self) -> str:
        """The text of an empty thought (added to responses without one by reasoning templates)."""
        return self.empty_thought if self.empty_thought is not None else "".join(self.thought_words)


def define(name: str, *, assistant: tuple[Slot, ...] | None = None, efficient_eos: bool = False,
           **fields) -> ChatTemplate:
    """A ChatTemplate with LLaMA-Factory's defaults: without `assistant` slots an assistant turn is its content
    followed by EOS, or its content alone with `efficient_eos` (EOS is then appended by the encoder)."""
    if assistant is None:
        assistant = (CONTENT,) if efficient_eos else (CONTENT, EOS)
    return ChatTemplate(name=name, assistant=assistant, efficient_eos=efficient_eos, **fields)
