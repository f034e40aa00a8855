"""Named chat templates: LLaMA-Factory's `template:` names, encoded into the token ids LLaMA-Factory trains on.

Every template LLaMA-Factory 0.9.5 registers (`template_names()`; `check_template_name` validates a name without
loading anything). `encode_conversation` and `encode_prompt` give LLaMA-Factory's ids for a conversation and
its prompt, `get_template` the template's Jinja (for display and a saved tokenizer). `choose_template` is the
one rule for which template a conversation goes through, wherever preftune tokenizes one: the named template, else
the tokenizer's own Jinja, else "default" with a warning.

Decisions and the differences from LLaMA-Factory: docs/chat-templates.md; the rule: docs/tokenization.md.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass

from preftune.data.llamafactory_templates import LLAMAFACTORY_TEMPLATES
from preftune.data.template_format import BOS, CONTENT, EOS, ChatTemplate, Slot, Special, Token
from preftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

LLAMAFACTORY_VERSION = "0.9.5"
TEMPLATES: dict[str, ChatTemplate] = {template.name: template for template in LLAMAFACTORY_TEMPLATES}

# LLaMA-Factory names that are not in 0.9.5: registered by its main branch after 0.9.5, or by releases 0.8.0 to
# 0.9.4 and removed since. preftune answers them with the reason rather than as unknown names.
NOT_SUPPORTED: dict[str, str] = {
    **{name: f"added to LLaMA-Factory after {LLAMAFACTORY_VERSION}" for name in ("hy_dense_1_8b", "hy_dense_7b",
                                                                                  "moss_vl")},
    **{name: "removed from LLaMA-Factory in 0.9.5 with other obsolete models"
       for name in ("aquila", "atom", "baichuan", "baichuan2", "belle", "bluelm", "chatglm2", "codegeex2", "codegeex4",
                    "cpm", "cpm3", "intern", "marco", "orion", "skywork_o1", "telechat", "xverse", "yayi", "ziya")},
    "chatglm3_system": "removed from LLaMA-Factory in 0.8.3; use chatglm3",
    "intern3": "removed from LLaMA-Factory before 0.9.2; intern2 has the same turns",
}

_FALLBACK_EOS = "<|endoftext|>"  # LLaMA-Factory's EOS for a tokenizer that has none


# --------------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------------


def template_names() -> list[str]:
    """The valid template names, sorted."""
    return sorted(TEMPLATES)


def check_template_name(name) -> str:
    """`name` if it names a template; else ConfigError(key="template"): "not supported yet: template X (why)" for a
    name preftune knows but refuses, or the close matches of an unknown name. Needs no tokenizer or model."""
    if isinstance(name, str) and name in TEMPLATES:
        return name
    if isinstance(name, str) and name in NOT_SUPPORTED:
        raise ConfigError(f"not supported yet: template {name!r} ({NOT_SUPPORTED[name]})", key="template")
    close = difflib.get_close_matches(str(name), list(TEMPLATES) + list(NOT_SUPPORTED), n=6, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"expected one of: {', '.join(template_names())}"
    raise ConfigError(f"unknown chat template {name!r}; {hint} (LLaMA-Factory {LLAMAFACTORY_VERSION}'s names)",
                      key="template")


def get_chat_template(name: str) -> ChatTemplate:
    """The named template; ConfigError(key="template") for a name that is unknown or not supported."""
    return TEMPLATES[check_template_name(name)]


def _as_template(template: str | ChatTemplate) -> ChatTemplate:
    return template if isinstance(template, ChatTemplate) else get_chat_template(template)


# --------------------------------------------------------------------------------------------------------------
# Token ids (what training uses)
# --------------------------------------------------------------------------------------------------------------


def encode_conversation(template: str | ChatTemplate, tokenizer, prompt_messages: list[dict],
                        response_messages: list[dict], *, enable_thinking: bool = True,
                        row: int | None = None) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) of one conversation, exactly as LLaMA-Factory's `encode_oneturn` (plus the EOS
    its DPO/KTO processors append with `efficient_eos`) gives them; see docs/chat-templates.md.

    Args:
        template: a template name or a ChatTemplate.
        prompt_messages: an optional leading system message, then user and assistant messages alternating,
            starting and ending with a user message ({"role", "content"} dicts).
        response_messages: the response: one assistant message.
        enable_thinking: reasoning templates only: train on an empty thought (True) or put it in the prompt (False).
        row: the row number, for errors.

    Raises:
        ConfigError: an unknown template name, or a template token the tokenizer does not have.
        DataError: the messages are not in that shape.
    """
    template = _as_template(template)
    system, turns = _split_system(prompt_messages, row)
    if len(response_messages) != 1 or response_messages[0].get("role") != "assistant":
        raise DataError(f"expected the response to be one assistant message, got {len(response_messages)} "
                        f"message(s); template {template.name!r} (LLaMA-Factory) trains on one", row=row)
    turns = turns + [response_messages[0]["content"]]
    if template.reasoning:
        turns = _without_history_thoughts(template, turns)
        if not enable_thinking:
            turns[-1] = _remove_thought(template, turns[-1])
    encoded = _encode_turns(template, tokenizer, system, turns)
    prompt_ids = [token for turn in encoded[:-1] for token in turn]
    response_ids = encoded[-1]
    if template.reasoning and not _has_thought_words(template, turns[-1]):
        empty_thought = tokenizer.encode(template.empty_thought_text, add_special_tokens=False)
        if enable_thinking:
            response_ids = empty_thought + response_ids
        else:
            prompt_ids = prompt_ids + empty_thought
    if template.efficient_eos:
        response_ids = response_ids + _eos_ids(template, tokenizer)
    return prompt_ids, response_ids


def encode_prompt(template: str | ChatTemplate, tokenizer, prompt_messages: list[dict], *,
                  enable_thinking: bool = True, row: int | None = None) -> list[int]:
    """The prompt ids `encode_conversation` gives for these prompt messages and a plain answer (no thought)."""
    response = [{"role": "assistant", "content": ""}]
    return encode_conversation(template, tokenizer, prompt_messages, response, enable_thinking=enable_thinking,
                               row=row)[0]


def _split_system(messages: list[dict], row) -> tuple[str, list[str]]:
    """(system text or "", the contents of the alternating user/assistant turns that must end with a user turn)."""
    system = ""
    if messages and messages[0].get("role") == "system":
        system, messages = messages[0]["content"], messages[1:]
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise DataError(f"message {index} has role {message.get('role')!r}; expected {expected!r} (an optional "
                            "system message, then user and assistant alternating)", row=row, field="prompt")
    if len(messages) % 2 != 1:
        raise DataError("expected the prompt to end with a user message", row=row, field="prompt")
    return system, [message["content"] for message in messages]


def _encode_turns(template: ChatTemplate, tokenizer, system: str, turns: list[str]) -> list[list[int]]:
    """Token ids of each turn (user, assistant, user, ...); the first also holds the prefix and system prompt."""
    system = system or template.default_system
    encoded = []
    for index, content in enumerate(turns):
        slots: list[Slot] = []
        if index == 0:
            slots += template.prefix
            if system and template.system_in_first_user:
                content = _fill(template.system[:1], system)[0] + content
            elif system:
                slots += _fill(template.system, system)
        slots += _fill(template.user if index % 2 == 0 else template.assistant, content)
        encoded.append([token for slot in slots for token in _slot_ids(template, tokenizer, slot)])
    return encoded


def _fill(slots: tuple[Slot, ...], content: str) -> list[Slot]:
    """The slots with the first `{{content}}` of each string replaced by `content`."""
    return [slot.replace(CONTENT, content, 1) if isinstance(slot, str) else slot for slot in slots]


def _slot_ids(template: ChatTemplate, tokenizer, slot: Slot) -> list[int]:
    if isinstance(slot, str):
        return tokenizer.encode(slot, add_special_tokens=False) if slot else []
    if isinstance(slot, Token):
        token_id = _known_token_id(tokenizer, slot.text)
        if token_id is None:
            raise ConfigError(f"template {template.name!r} writes the token {slot.text!r}, which this tokenizer "
                              "does not have; expected the tokenizer of the template's model family", key="template")
        return [token_id]
    if slot is Special.BOS:
        return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return _eos_ids(template, tokenizer)


def _known_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` as one token of the tokenizer's vocabulary, or None when it is not one."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    if token_id is None or (token_id == tokenizer.unk_token_id and text != tokenizer.unk_token):
        return None
    return token_id


def eos_text(template: str | ChatTemplate, tokenizer) -> str:
    """The template's EOS: `stop_words[0]` with `replace_eos`, else the tokenizer's EOS (else "<|endoftext|>")."""
    template = _as_template(template)
    if template.replace_eos:
        return template.stop_words[0]
    return tokenizer.eos_token if tokenizer.eos_token_id is not None else _FALLBACK_EOS


def _eos_ids(template: ChatTemplate, tokenizer) -> list[int]:
    text = eos_text(template, tokenizer)
    if not template.replace_eos and tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    token_id = _known_token_id(tokenizer, text)
    if token_id is not None:
        return [token_id]
    _warn_once(template, tokenizer, text)
    return tokenizer.encode(text, add_special_tokens=False)


_warned: set[tuple[str, str, str]] = set()


def _warn_once(template: ChatTemplate, tokenizer, text: str) -> None:
    key = (template.name, str(getattr(tokenizer, "name_or_path", "")), text)
    if key not in _warned:
        _warned.add(key)
        logger.warning("template %r ends turns with %r, which is not a token of this tokenizer; LLaMA-Factory would "
                       "add it as a new token (resize_vocab), preftune tokenizes it as text, so these token ids "
                       "differ from LLaMA-Factory's", template.name, text)


def _thought_pattern(template: ChatTemplate) -> re.Pattern:
    opening, closing = template.thought_words
    return re.compile(f"{re.escape(opening)}(.*?){re.escape(closing)}", re.DOTALL)


def _remove_thought(template: ChatTemplate, content: str) -> str:
    return _thought_pattern(template).sub("", content).lstrip("\n")


def _without_history_thoughts(template: ChatTemplate, turns: list[str]) -> list[str]:
    """The turns with the thoughts of every assistant turn before the response removed."""
    return [_remove_thought(template, content) if index % 2 == 1 and index < len(turns) - 1 else content
            for index, content in enumerate(turns)]


def _has_thought_words(template: ChatTemplate, content: str) -> bool:
    opening, closing = template.thought_words
    return opening.strip() in content or closing.strip() in content


# --------------------------------------------------------------------------------------------------------------
# Jinja (what generation and a saved tokenizer use)
# --------------------------------------------------------------------------------------------------------------


def get_template(name: str) -> str:
    """The Jinja source of the named template (ConfigError(key="template") for an unknown name)."""
    return jinja_source(get_chat_template(name))


def jinja_source(template: ChatTemplate) -> str:
    """Jinja for `apply_chat_template` rendering what LLaMA-Factory's Jinja export renders for this template."""
    parts = []
    if template.prefix:
        parts.append("{{ " + _jinja_expression(template, template.prefix, "content") + " }}")
    if template.default_system:
        parts.append("{% set system_message = " + _jinja_literal(template.default_system) + " %}")
    parts.append("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                 "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                 "{% endif %}")
    if not template.system_in_first_user:
        system = _jinja_expression(template, template.system, "system_message")
        parts.append("{% if system_message is defined %}{{ " + system + " }}{% endif %}")
    parts.append("{% for message in loop_messages %}")
    if template.system_in_first_user:
        system = _jinja_expression(template, template.system[:1], "system_message")
        parts.append("{% if loop.index0 == 0 and system_message is defined %}"
                     "{% set content = " + system + " + message['content'] %}"
                     "{% else %}{% set content = message['content'] %}{% endif %}")
    else:
        parts.append("{% set content = message['content'] %}")
    parts.append("{% if message['role'] == 'user' %}{{ " + _jinja_expression(template, template.user, "content")
                 + " }}{% elif message['role'] == 'assistant' %}{{ "
                 + _jinja_expression(template, template.assistant, "content") + " }}{% endif %}{% endfor %}")
    return "".join(parts)


def _jinja_expression(template: ChatTemplate, slots: tuple[Slot, ...], placeholder: str) -> str:
    """A Jinja expression concatenating the slots, `{{content}}` standing for the variable `placeholder`."""
    items = []
    for slot in slots:
        if isinstance(slot, str):
            before, found, after = slot.partition(CONTENT)
            items += [_jinja_literal(before)] if before else []
            items += [placeholder] if found else []
            items += [_jinja_literal(after)] if after else []
        elif isinstance(slot, Token):
            items.append(_jinja_literal(slot.text))
        elif slot is BOS:
            items.append("(bos_token or '')")
        elif slot is EOS:
            items.append(_jinja_literal(template.stop_words[0]) if template.replace_eos
                         else f"(eos_token or {_jinja_literal(_FALLBACK_EOS)})")
    return " + ".join(items) if items else "''"


def _jinja_literal(text: str) -> str:
    """A Jinja string literal for `text`."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def end_of_turn_text(name: str, tokenizer) -> str | None:
    """The text that ends an assistant turn for template `name` with this tokenizer (what generation stops on):
    the template's EOS when its assistant turn ends with EOS, else the first stop word its assistant turn writes,
    else the tokenizer's EOS (None when it has none)."""
    template = get_chat_template(name)
    if template.efficient_eos or EOS in template.assistant:
        return eos_text(template, tokenizer)
    written = "".join(slot for slot in template.assistant if isinstance(slot, str))
    return next((word for word in template.stop_words if word in written), tokenizer.eos_token)


def resolve_chat_template(tokenizer, template_name: str | None) -> str | None:
    """The Jinja source of `template_name` (ConfigError for an unknown name), else the tokenizer's own
    `chat_template` (when it is a string), else None. Callers that turn conversations into ids use
    `choose_template`, which decides what happens then."""
    if template_name is not None:
        return get_template(template_name)
    own = getattr(tokenizer, "chat_template", None)
    return own if isinstance(own, str) and own else None


# --------------------------------------------------------------------------------------------------------------
# The one rule for conversations: training, sampling, evaluation and `preftune data check`
# --------------------------------------------------------------------------------------------------------------

FALLBACK_TEMPLATE = "default"  # LLaMA-Factory's; used when neither `template` nor the tokenizer gives a template


@dataclass(frozen=True)
class TemplateChoice:
    """How conversations become token ids; exactly one field is set.

    Attributes:
        name: a named template: LLaMA-Factory's ids (`encode_conversation`, `encode_prompt`) and its truncation.
        jinja: a Jinja chat template: conversations rendered by `apply_chat_template`, then tokenized.
    """

    name: str | None = None
    jinja: str | None = None

    @property
    def jinja_source(self) -> str:
        """The Jinja that renders a conversation as text (a named template's own Jinja, `get_template`)."""
        return self.jinja if self.jinja is not None else get_template(self.name)


_warned_fallback: set[str] = set()


def choose_template(tokenizer, template_name: str | None = None, chat_template: str | None = None) -> TemplateChoice:
    """The template for conversations, by one rule wherever preftune tokenizes them (training, sampling,
    evaluation, `preftune data check`):

    1. `template_name` (the config's `template:`) → that named template (ConfigError for an unknown name);
    2. else `chat_template` (Jinja source) when given, else the tokenizer's own `chat_template` → that Jinja;
    3. else the named template "default" (LLaMA-Factory's), with one warning per tokenizer and process.
    """
    if template_name is not None:
        return TemplateChoice(name=check_template_name(template_name))
    jinja = chat_template if chat_template is not None else resolve_chat_template(tokenizer, None)
    if jinja is not None:
        return TemplateChoice(jinja=jinja)
    key = str(getattr(tokenizer, "name_or_path", "") or id(tokenizer))
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        logger.warning("the tokenizer has no chat template and no `template` was set; using template %r",
                       FALLBACK_TEMPLATE)
    return TemplateChoice(name=FALLBACK_TEMPLATE)
