"""Named chat templates (Jinja) for conversational preference data, in the spirit of LLaMA-Factory's `template:`.

Each template is a Jinja string for `tokenizer.apply_chat_template(messages, chat_template=..., tokenize=False,
add_generation_prompt=...)`. Rendering the prompt with `add_generation_prompt=True` gives exactly the text that
rendering prompt + assistant answer starts with, so the prompt is a text prefix of every full conversation.

The rendered text reproduces what LLaMA-Factory's exported Jinja template (`Template._get_jinja_template`) renders
for the same name, with these notes:

- `qwen` uses LLaMA-Factory's current default system prompt, "You are Qwen, created by Alibaba Cloud. You are a
  helpful assistant." (Qwen2.5's own default; LLaMA-Factory used "You are a helpful assistant." before Qwen2.5).
- `default` is LLaMA-Factory's current `default`: "Human: {user}<eos>\\nAssistant:{answer}<eos>\\n" (older releases
  had no <eos> after the user turn).
- LLaMA-Factory itself tokenizes each template piece separately at training time, so with a SentencePiece tokenizer
  its ids carry a dummy-prefix space before the answer ("Assistant: answer") that the rendered text does not have;
  preftune tokenizes the rendered text as a whole, like TRL.
- `vicuna` follows FastChat's Vicuna v1.1 format ("{system} USER: {user} ASSISTANT: {answer}</s>"), the format Vicuna
  models were trained on; LLaMA-Factory's Jinja export drops those spaces.

End of an assistant turn: every template declares the string that ends an assistant turn (`ChatTemplate.end_of_turn`:
"<|im_end|>" for chatml/qwen, "<|eot_id|>" for llama3, the tokenizer's EOS for the others). The rendered full
conversation already ends with it, so conversational completions need no extra EOS. When the tokenizer does not know
such a marker as a special token (e.g. "<|im_end|>" on a Llama tokenizer), it is tokenized as ordinary text, i.e.
several tokens: training still teaches the model to write it, but generation must then stop on the string rather
than on one token id. Templates that use the tokenizer's `bos_token`/`eos_token` render nothing in their place when
the tokenizer has none.
"""

from __future__ import annotations

from dataclasses import dataclass

from preftune.errors import ConfigError


@dataclass(frozen=True)
class ChatTemplate:
    """One named chat template.

    Attributes:
        name: the name used in configs (`template: qwen`).
        jinja: the Jinja source for `apply_chat_template(chat_template=...)`.
        end_of_turn: the text that ends an assistant turn; None means the tokenizer's `eos_token`.
        default_system: the system prompt used when the conversation has none, or None.
    """

    name: str
    jinja: str
    end_of_turn: str | None
    default_system: str | None = None


def _split_system(default_system: str | None) -> str:
    """Jinja preamble: `system_message` (first system turn, else the default if any) and `loop_messages`."""
    preamble = ""
    if default_system is not None:
        preamble += "{%- set system_message = " + _quote(default_system) + " -%}"
    return preamble + (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    )


def _quote(text: str) -> str:
    """A Jinja string literal for `text`."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return "'" + escaped + "'"


def _chatml(default_system: str | None) -> str:
    return (
        _split_system(default_system)
        + "{%- if system_message is defined -%}"
        "{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_LLAMA3 = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

_DEFAULT = (
    _split_system(None)
    + "{%- if system_message is defined -%}{{ 'System: ' + system_message }}{{ eos_token }}{{ '\\n' }}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'Human: ' + message['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant:' + message['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

# Llama 2 chat: the system prompt is folded into the first user turn; every user turn starts with BOS.
_LLAMA2 = (
    _split_system(None)
    + "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message is defined -%}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{ bos_token }}{{ '[INST] ' + content + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Mistral (tokenizer v3): one BOS, the system prompt folded into the first user turn.
_MISTRAL = (
    "{{ bos_token }}"
    + _split_system(None)
    + "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message is defined -%}"
    "{%- set content = system_message + '\\n\\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{ '[INST] ' + content + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)

_ALPACA = (
    _split_system(_ALPACA_SYSTEM)
    + "{{ system_message }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Response:\\n' + message['content'] }}{{ eos_token }}{{ '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_VICUNA = (
    _split_system(_VICUNA_SYSTEM)
    + "{{ system_message + ' ' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + message['content'] }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    template.name: template
    for template in (
        ChatTemplate("default", _DEFAULT, end_of_turn=None),
        ChatTemplate("chatml", _chatml(None), end_of_turn="<|im_end|>"),
        ChatTemplate("qwen", _chatml(_QWEN_SYSTEM), end_of_turn="<|im_end|>", default_system=_QWEN_SYSTEM),
        ChatTemplate("llama3", _LLAMA3, end_of_turn="<|eot_id|>"),
        ChatTemplate("llama2", _LLAMA2, end_of_turn=None),
        ChatTemplate("mistral", _MISTRAL, end_of_turn=None),
        ChatTemplate("alpaca", _ALPACA, end_of_turn=None, default_system=_ALPACA_SYSTEM),
        ChatTemplate("vicuna", _VICUNA, end_of_turn=None, default_system=_VICUNA_SYSTEM),
    )
}


def template_names() -> list[str]:
    """The valid template names, sorted."""
    return sorted(TEMPLATES)


def get_chat_template(name: str) -> ChatTemplate:
    """The named template; ConfigError(key="template") listing the valid names when `name` is unknown."""
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown chat template {name!r}; expected one of: {', '.join(template_names())}", key="template"
        ) from None


def get_template(name: str) -> str:
    """The Jinja source of the named template; ConfigError(key="template") for an unknown name."""
    return get_chat_template(name).jinja


def end_of_turn_text(name: str, tokenizer) -> str | None:
    """The text that ends an assistant turn for template `name` with this tokenizer (None: tokenizer has no EOS)."""
    template = get_chat_template(name)
    return template.end_of_turn if template.end_of_turn is not None else tokenizer.eos_token


def resolve_chat_template(tokenizer, template_name: str | None) -> str | None:
    """The Jinja template to use for conversational data.

    An explicit `template_name` wins (ConfigError for an unknown name); else the tokenizer's own `chat_template`
    (when it is a string); else None, and the caller decides whether that is an error.
    """
    if template_name is not None:
        return get_template(template_name)
    own = getattr(tokenizer, "chat_template", None)
    return own if isinstance(own, str) and own else None
