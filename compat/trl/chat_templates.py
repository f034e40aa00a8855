"""Chat templates (Jinja) for the tiny stand-in models of compat/trl, one per model family.

Written for this harness: they reproduce the *shape* of each family's real template (turn markers, a default
system prompt, where reasoning and tool calls go, which token closes the last assistant turn), which is what
TRL's tests exercise. They are not the hub's files. Every template renders
``messages`` (each ``{"role", "content"}``, assistant messages optionally with ``tool_calls`` and
``thinking``/``reasoning_content``, tool messages optionally with ``name``), the optional ``tools`` list (JSON
schemas as produced by ``transformers.utils.get_json_schema``) and ``add_generation_prompt``.

One property matters for preference training and holds for every template here: the rendering of
``prompt`` with ``add_generation_prompt=True`` is a prefix of the rendering of ``prompt + completion``
(build_assets.py checks it), so the completion tokens are exactly what follows the prompt.
"""

from __future__ import annotations

# -- pieces shared by the templates ------------------------------------------------------------------------

# A tool call's arguments arrive as a mapping (datasets' Json feature) or as a JSON string.
_ARGUMENTS_AS_JSON = "{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}"

# Sets `fn` to the function part of a tool call or a tool schema ({"type": "function", "function": {...}}).
_FUNCTION_OF_CALL = "{%- set fn = call.function if call.function is defined else call -%}"


def _chatml_tool_block(system_expr: str) -> str:
    """System turn of a ChatML template: `system_expr` then, with tools, their schemas and the call format."""
    return (
        "{%- set system_text = " + system_expr + " -%}"
        '{{- "<|im_start|>system\\n" + system_text -}}'
        "{%- if tools -%}"
        '{%- if system_text -%}{{- "\\n\\n" -}}{%- endif -%}'
        '{{- "# Tools\\n\\nYou can call the functions listed between <tools> and </tools>:\\n<tools>" -}}'
        '{%- for tool in tools -%}{{- "\\n" + (tool | tojson) -}}{%- endfor -%}'
        '{{- "\\n</tools>\\n\\nTo call one, reply with a JSON object giving its name and arguments, wrapped in '
        '<tool_call></tool_call>:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
        '<args-json-object>}\\n</tool_call>" -}}'
        "{%- endif -%}"
        '{{- "<|im_end|>\\n" -}}'
    )


def _chatml_template(default_system: str | None, final_think_block: bool, bos: bool) -> str:
    """A ChatML template (Qwen, OLMo, Nemotron, LFM families).

    default_system: system prompt used when the conversation has none (None: no system turn unless given or tools).
    final_think_block: the last assistant turn opens with a ``<think>...</think>`` block (its reasoning, or empty),
        as Qwen3-style reasoning models render it.
    bos: the rendering starts with ``bos_token``.
    """
    head = "{{- bos_token -}}" if bos else ""
    if default_system is None:
        system = (
            "{%- if messages and messages[0].role == 'system' -%}"
            "{%- set rest = messages[1:] -%}" + _chatml_tool_block("messages[0].content") + "{%- else -%}"
            "{%- set rest = messages -%}"
            "{%- if tools -%}" + _chatml_tool_block('""') + "{%- endif -%}"
            "{%- endif -%}"
        )
    else:
        system = (
            "{%- if messages and messages[0].role == 'system' -%}"
            "{%- set given_system = messages[0].content -%}{%- set rest = messages[1:] -%}"
            "{%- else -%}"
            '{%- set given_system = "' + default_system + '" -%}{%- set rest = messages -%}'
            "{%- endif -%}" + _chatml_tool_block("given_system")
        )
    reasoning = (
        "{%- set reasoning = message.reasoning_content if message.reasoning_content is defined and "
        "message.reasoning_content else (message.thinking if message.thinking is defined and message.thinking "
        'else "") -%}'
    )
    # `has_text`: text follows the turn's opening "assistant\n", so a tool call starts on a new line; otherwise the
    # call follows that newline directly (a second newline would merge with it into a different token).
    if final_think_block:
        assistant_open = (
            reasoning + '{{- "<|im_start|>assistant\\n" -}}'
            '{%- if loop.last -%}{{- "<think>\\n" + reasoning + "\\n</think>\\n\\n" -}}{%- endif -%}'
            '{%- if message.content -%}{{- message.content -}}{%- endif -%}'
            "{%- set has_text = loop.last or message.content -%}"
        )
    else:
        assistant_open = (
            '{{- "<|im_start|>assistant" -}}{%- if message.content -%}{{- "\\n" + message.content -}}{%- endif -%}'
            "{%- set has_text = true -%}"
        )
    body = (
        "{%- for message in rest -%}"
        "{%- if message.role == 'tool' -%}"
        "{%- if loop.first or rest[loop.index0 - 1].role != 'tool' -%}{{- \"<|im_start|>user\" -}}{%- endif -%}"
        '{{- "\\n<tool_response>\\n" + message.content + "\\n</tool_response>" -}}'
        "{%- if loop.last or rest[loop.index0 + 1].role != 'tool' -%}{{- \"<|im_end|>\\n\" -}}{%- endif -%}"
        "{%- elif message.role == 'assistant' -%}" + assistant_open + "{%- for call in message.tool_calls or [] -%}"
        + _FUNCTION_OF_CALL
        + '{%- if has_text or not loop.first -%}{{- "\\n" -}}{%- endif -%}'
        + '{{- "<tool_call>\\n{\\"name\\": \\"" + fn.name + "\\", \\"arguments\\": " -}}'
        + _ARGUMENTS_AS_JSON
        + '{{- "}\\n</tool_call>" -}}'
        "{%- endfor -%}"
        '{{- "<|im_end|>\\n" -}}'
        "{%- else -%}"
        '{{- "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>\\n" -}}'
        "{%- endif -%}"
        "{%- endfor -%}"
    )
    if final_think_block:
        generation = (
            "{%- if add_generation_prompt -%}"
            '{{- "<|im_start|>assistant\\n" -}}'
            '{%- if enable_thinking is defined and enable_thinking is false -%}{{- "<think>\\n\\n</think>\\n\\n" -}}'
            "{%- endif -%}"
            "{%- endif -%}"
        )
    else:
        generation = '{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\\n" -}}{%- endif -%}'
    return head + system + body + generation


QWEN2_5 = _chatml_template(
    default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    final_think_block=False,
    bos=False,
)
"""Qwen2.5-Instruct family: ChatML, a default system prompt, tools in the system turn, tool results as user turns."""

QWEN3 = _chatml_template(default_system=None, final_think_block=True, bos=False)
"""Qwen3 family: ChatML without default system prompt; the final assistant turn carries a <think> block."""

OLMO3 = _chatml_template(
    default_system="You are OLMo, a helpful AI assistant built by Ai2.", final_think_block=False, bos=False
)
"""OLMo 3 family: ChatML with its own default system prompt."""

NEMOTRON_H = _chatml_template(default_system=None, final_think_block=True, bos=False)
"""Nemotron 3 (hybrid Mamba) family: ChatML with a reasoning block on the final assistant turn."""

LFM2 = _chatml_template(default_system=None, final_think_block=False, bos=True)
"""LFM2 / LFM2.5 family: ChatML preceded by the BOS token."""


COHERE2 = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set rest = messages[1:] -%}"
    '{{- "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>" + messages[0].content -}}'
    "{%- else -%}{%- set rest = messages -%}"
    '{{- "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are Aya, a helpful multilingual assistant." -}}'
    "{%- endif -%}"
    "{%- if tools -%}"
    '{{- "\\n\\n## Available Tools\\n```json\\n" + (tools | tojson) + "\\n```" -}}'
    "{%- endif -%}"
    '{{- "<|END_OF_TURN_TOKEN|>" -}}'
    "{%- for message in rest -%}"
    "{%- if message.role == 'user' -%}"
    '{{- "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>" + message.content + "<|END_OF_TURN_TOKEN|>" -}}'
    "{%- elif message.role == 'assistant' -%}"
    '{{- "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>" -}}'
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}" + _FUNCTION_OF_CALL + '{{- "\\nAction: " + fn.name + " " -}}'
    + _ARGUMENTS_AS_JSON
    + "{%- endfor -%}"
    '{{- "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>" -}}'
    "{%- else -%}"
    '{{- "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>" + message.content + "</results><|END_OF_TURN_TOKEN|>" -}}'
    "{%- endif -%}"
    "{%- endfor -%}"
    '{%- if add_generation_prompt -%}{{- "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>" -}}{%- endif -%}'
)
"""Cohere2 (Aya / Command) family: turn tokens, BOS first, a default system turn, responses between
<|START_RESPONSE|> and <|END_RESPONSE|>."""


GLM4_MOE = (
    '{{- "[gMASK]<sop>" -}}'
    "{%- if tools -%}"
    '{{- "<|system|>\\n# Tools\\n\\nYou may call the functions below.\\n<tools>" -}}'
    '{%- for tool in tools -%}{{- "\\n" + (tool | tojson) -}}{%- endfor -%}'
    '{{- "\\n</tools>\\nWrite each call as <tool_call>{name}\\n<arg_key>{key}</arg_key>\\n<arg_value>{value}'
    '</arg_value>\\n</tool_call>." -}}'
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{- \"<|system|>\\n\" + message.content -}}"
    "{%- elif message.role == 'user' -%}{{- \"<|user|>\\n\" + message.content -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is defined and "
    'message.reasoning_content else "" -%}'
    '{{- "<|assistant|>\\n<think>" + reasoning + "</think>" -}}'
    '{%- if message.content -%}{{- "\\n" + message.content -}}{%- endif -%}'
    "{%- for call in message.tool_calls or [] -%}" + _FUNCTION_OF_CALL + '{{- "\\n<tool_call>" + fn.name -}}'
    "{%- if fn.arguments is mapping -%}"
    '{%- for key, value in fn.arguments.items() -%}{{- "\\n<arg_key>" + key + "</arg_key>\\n<arg_value>" -}}'
    "{%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}"
    '{{- "</arg_value>" -}}{%- endfor -%}'
    "{%- else -%}{{- \"\\n\" + fn.arguments -}}{%- endif -%}"
    '{{- "\\n</tool_call>" -}}'
    "{%- endfor -%}"
    "{%- else -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- \"<|observation|>\" -}}{%- endif -%}"
    '{{- "\\n<tool_response>\\n" + message.content + "\\n</tool_response>" -}}'
    "{%- endif -%}"
    "{%- endfor -%}"
    '{%- if add_generation_prompt -%}{{- "<|assistant|>" -}}{%- endif -%}'
)
"""GLM-4.5 (Glm4Moe) family: "[gMASK]<sop>" first, role tokens without closing tokens, a <think> block on every
assistant turn, tool calls as <arg_key>/<arg_value> pairs, tool results as <|observation|> turns."""


HARMONY = (
    "{%- set identity = model_identity if model_identity is defined and model_identity else "
    '"You are ChatGPT, a large language model trained by OpenAI." -%}'
    "{%- set effort = reasoning_effort if reasoning_effort is defined and reasoning_effort else "
    '"medium" -%}'
    '{{- "<|start|>system<|message|>" + identity + "\\nKnowledge cutoff: 2024-06\\n\\nReasoning: " + effort -}}'
    '{{- "\\n\\n# Valid channels: analysis, commentary, final. Channel must be included for every message." -}}'
    "{%- if tools -%}"
    '{{- "\\nCalls to these tools must go to the commentary channel: \'functions\'." -}}'
    "{%- endif -%}"
    '{{- "<|end|>" -}}'
    "{%- set has_instructions = messages and messages[0].role in ['system', 'developer'] -%}"
    "{%- if has_instructions or tools -%}"
    '{{- "<|start|>developer<|message|>" -}}'
    '{%- if has_instructions -%}{{- "# Instructions\\n\\n" + messages[0].content -}}{%- endif -%}'
    "{%- if tools -%}"
    '{{- "\\n\\n# Tools\\n\\n## functions\\n\\nnamespace functions {\\n" -}}'
    "{%- for tool in tools -%}"
    "{%- set fn = tool.function if tool.function is defined else tool -%}"
    '{{- "\\n// " + (fn.description if fn.description is defined and fn.description else "") + "\\ntype " + fn.name'
    ' + " = (_: " + (fn.parameters | tojson) + ") => any;\\n" -}}'
    "{%- endfor -%}"
    '{{- "\\n} // namespace functions" -}}'
    "{%- endif -%}"
    '{{- "<|end|>" -}}'
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and has_instructions -%}"
    "{%- elif message.role == 'user' -%}"
    '{{- "<|start|>user<|message|>" + message.content + "<|end|>" -}}'
    "{%- elif message.role == 'assistant' -%}"
    "{%- set thinking = message.thinking if message.thinking is defined and message.thinking else "
    '(message.reasoning_content if message.reasoning_content is defined and message.reasoning_content else "") -%}'
    "{%- if thinking and (loop.last or message.tool_calls) -%}"
    '{{- "<|start|>assistant<|channel|>analysis<|message|>" + thinking + "<|end|>" -}}'
    "{%- endif -%}"
    "{%- if message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}" + _FUNCTION_OF_CALL + '{{- "<|start|>assistant to=functions." + fn.name'
    ' + "<|channel|>commentary json<|message|>" -}}' + _ARGUMENTS_AS_JSON + '{{- "<|call|>" -}}'
    "{%- endfor -%}"
    "{%- else -%}"
    '{{- "<|start|>assistant<|channel|>final<|message|>" + message.content -}}'
    '{%- if loop.last -%}{{- "<|return|>" -}}{%- else -%}{{- "<|end|>" -}}{%- endif -%}'
    "{%- endif -%}"
    "{%- elif message.role == 'tool' -%}"
    '{{- "<|start|>functions." + (message.name if message.name is defined and message.name else "tool")'
    ' + " to=assistant<|channel|>commentary<|message|>" + message.content + "<|end|>" -}}'
    "{%- endif -%}"
    "{%- endfor -%}"
    '{%- if add_generation_prompt -%}{{- "<|start|>assistant" -}}{%- endif -%}'
)
"""gpt-oss harmony format: a system turn with the model identity and reasoning effort (chat template kwargs
``model_identity`` and ``reasoning_effort``), instructions and tools in a developer turn, the assistant's
``thinking`` on the analysis channel (kept for the last turn only), its answer on the final channel, closed by
<|return|> on the last turn and <|end|> before."""


LLAMA3 = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system_text = messages[0].content -%}{%- set rest = messages[1:] -%}"
    '{%- else -%}{%- set system_text = "" -%}{%- set rest = messages -%}{%- endif -%}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n\\n" -}}'
    "{%- if tools -%}"
    '{{- "You can call these functions; answer with {\\"name\\": ..., \\"parameters\\": ...}:\\n" -}}'
    '{%- for tool in tools -%}{{- (tool | tojson) + "\\n" -}}{%- endfor -%}'
    "{%- endif -%}"
    '{{- system_text + "<|eot_id|>" -}}'
    "{%- for message in rest -%}"
    "{%- set role = 'ipython' if message.role == 'tool' else message.role -%}"
    '{{- "<|start_header_id|>" + role + "<|end_header_id|>\\n\\n" -}}'
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}" + _FUNCTION_OF_CALL + '{{- "{\\"name\\": \\"" + fn.name + '
    '"\\", \\"parameters\\": " -}}' + _ARGUMENTS_AS_JSON + '{{- "}" -}}'
    "{%- endfor -%}"
    '{{- "<|eot_id|>" -}}'
    "{%- endfor -%}"
    '{%- if add_generation_prompt -%}{{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" -}}{%- endif -%}'
)
"""Llama 3 family (used by the remote-code model, whose reference tokenizer is Llama 3.2's): header tokens,
BOS first, <|eot_id|> after every turn."""
