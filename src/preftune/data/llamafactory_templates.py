"""LLaMA-Factory 0.9.5's registered chat templates (`src/llamafactory/data/template.py`), as preftune data.

Every name LLaMA-Factory 0.9.5 registers is here, in its order, with the text part of its formatters (system, user,
assistant, prefix slots), default system prompt, stop words and flags; `preftune.data.templates` encodes them.
Tool formatters (function calls, observations, tool descriptions) are not carried: preftune's conversational rows
have system, user and assistant turns only. `tests/test_templates_llamafactory.py` checks every entry against
LLaMA-Factory 0.9.5 itself, token id by token id.
"""

from __future__ import annotations

from preftune.data.template_format import BOS, EOS, Token, define

_CHATML_TURNS = dict(
    system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
    user=("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
    assistant=("{{content}}<|im_end|>\n",),
)

_GEMMA_TURNS = dict(
    system=("{{content}}\n\n",),
    user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    assistant=("{{content}}<end_of_turn>\n",),
)

_GLM4_TURNS = dict(
    system=("<|system|>\n{{content}}",),
    user=("<|user|>\n{{content}}<|assistant|>",),
    assistant=("\n{{content}}",),
)

_LLAMA3_TURNS = dict(
    system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
    user=(
        "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>"
        "assistant<|end_header_id|>\n\n",
    ),
    assistant=("{{content}}<|eot_id|>",),
)

_LLAVA_TURNS = dict(
    system=("{{content}}",),
    user=("USER: {{content}} ASSISTANT:",),
    assistant=("{{content}}", EOS),
)

_LLAVA_NEXT_MISTRAL_TURNS = dict(
    system=("{{content}}\n\n",),
    user=("[INST] {{content}}[/INST]",),
    assistant=(" {{content}}", EOS),
)

_MINISTRAL_TURNS = dict(
    system=("{{content}}\n\n",),
    user=("[INST]{{content}}[/INST]",),
    assistant=("{{content}}", EOS),
)

LLAMAFACTORY_TEMPLATES = (
    define(
        "alpaca",
        user=("### Instruction:\n{{content}}\n\n### Response:\n",),
        assistant=("{{content}}", EOS, "\n\n"),
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n"
        ),
    ),
    define(
        "bailing",
        system=("<role>SYSTEM</role>{{content}}",),
        user=("<role>HUMAN</role>{{content}}<role>ASSISTANT</role>",),
        stop_words=("<|endoftext|>",),
        efficient_eos=True,
    ),
    define(
        "bailing_v2",
        system=("<role>SYSTEM</role>{{content}}<|role_end|>",),
        user=("<role>HUMAN</role>{{content}}<|role_end|><role>ASSISTANT</role>",),
        assistant=("{{content}}<|role_end|>",),
        stop_words=("<|endoftext|>",),
        efficient_eos=True,
    ),
    define("breeze", user=("[INST] {{content}} [/INST] ",), prefix=(BOS,), efficient_eos=True),
    define(
        "chatglm3",
        system=(Token("<|system|>"), "\n", "{{content}}"),
        user=(Token("<|user|>"), "\n", "{{content}}", Token("<|assistant|>")),
        assistant=("\n", "{{content}}"),
        prefix=(Token("[gMASK]"), Token("sop")),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
    ),
    define("chatml", **_CHATML_TURNS, stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True),
    define(
        "chatml_de",
        **_CHATML_TURNS,
        default_system="Du bist ein freundlicher und hilfsbereiter KI-Assistent.",
        stop_words=("<|im_end|>", "<|im_start|>"),
        replace_eos=True,
    ),
    define(
        "cohere",
        system=("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>",),
        user=(
            "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>"
            "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        ),
        prefix=(BOS,),
    ),
    define("cpm4", **_CHATML_TURNS, prefix=(BOS,), stop_words=("<|im_end|>",)),
    define(
        "dbrx",
        **_CHATML_TURNS,
        default_system=(
            "You are DBRX, created by Databricks. You were last updated in December 2023. You "
            "answer questions based on information available up to that point.\nYOU PROVIDE SHORT "
            "RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough responses to more "
            "complex and open-ended questions.\nYou assist with various tasks, from writing to "
            "coding (using markdown for code blocks — remember to use ``` with code, JSON, and "
            "tables).\n(You do not have real-time data access or code execution capabilities. You "
            "avoid stereotyping and provide balanced perspectives on controversial topics. You "
            "do not provide song lyrics, poems, or news articles and do not divulge details of "
            "your training data.)\nThis is your system prompt, guiding your responses. Do not "
            "reference it, just respond to the user. If you find yourself talking about this "
            "message, stop. You should be responding appropriately and usually that means not "
            "mentioning this.\nYOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS "
            "THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY."
        ),
        stop_words=("<|im_end|>",),
        replace_eos=True,
    ),
    define("deepseek", system=("{{content}}\n\n",), user=("User: {{content}}\n\nAssistant:",), prefix=(BOS,)),
    define("deepseek3", user=("<｜User｜>{{content}}<｜Assistant｜>",), prefix=(BOS,)),
    define("deepseekr1", user=("<｜User｜>{{content}}<｜Assistant｜>",), prefix=(BOS,), reasoning=True),
    define(
        "hy3",
        user=("<｜hy_User｜>{{content}}<｜hy_Assistant｜>",),
        assistant=("{{content}}<｜hy_eos｜>",),
        prefix=(BOS,),
        stop_words=("<｜hy_eos｜>",),
        replace_eos=True,
        reasoning=True,
        thought_words=("<think>", "</think>"),
    ),
    define(
        "deepseekcoder",
        user=("### Instruction:\n{{content}}\n### Response:",),
        assistant=("\n{{content}}\n<|EOT|>\n",),
        prefix=(BOS,),
        default_system=(
            "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed "
            "by DeepSeek Company, and you only answer questions related to computer science. For "
            "politically sensitive questions, security and privacy issues, and other "
            "non-computer science questions, you will refuse to answer.\n"
        ),
    ),
    define(
        "default",
        system=("System: {{content}}", EOS, "\n"),
        user=("Human: {{content}}", EOS, "\nAssistant:"),
        assistant=("{{content}}", EOS, "\n"),
    ),
    define(
        "dots_ocr",
        system=("<|system|>{{content}}<|endofsystem|>\n",),
        user=("<|user|>{{content}}<|endofuser|><|assistant|>",),
        assistant=("{{content}}<|endofassistant|>",),
        stop_words=("<|endofassistant|>",),
        efficient_eos=True,
        multimodal="Qwen2VL",
    ),
    define("empty", assistant=("{{content}}",)),
    define(
        "ernie",
        system=("<|im_start|>system\n{{content}}<|im_end|>\n\n",),
        user=("<|im_start|>user\n{{content}}<|im_end|>\n\n<|im_start|>assistant\n",),
        assistant=("{{content}}<|im_end|>\n\n",),
        default_system="<global_setting>\nthink_mode=True\n</global_setting>",
        stop_words=("<|im_end|>",),
    ),
    define(
        "ernie_nothink",
        system=("{{content}}\n",),
        user=("User: {{content}}\nAssistant: ",),
        assistant=("{{content}}<|end_of_sentence|>",),
        prefix=("<|begin_of_sentence|>",),
        stop_words=("<|end_of_sentence|>",),
    ),
    define(
        "ernie_vl",
        system=("{{content}}\n",),
        user=("User: {{content}}",),
        assistant=("\nAssistant: {{content}}<|end_of_sentence|>",),
        stop_words=("<|end_of_sentence|>",),
        replace_eos=True,
        reasoning=True,
        multimodal="ErnieVL",
    ),
    define(
        "exaone",
        system=("[|system|]{{content}}[|endofturn|]\n",),
        user=("[|user|]{{content}}\n[|assistant|]",),
        assistant=("{{content}}", EOS, "\n"),
    ),
    define("falcon", user=("User: {{content}}\nFalcon:",), assistant=("{{content}}\n",), efficient_eos=True),
    define("falcon_h1", **_CHATML_TURNS, prefix=(BOS,), stop_words=("<|im_end|>", "<|end_of_text|>")),
    define("fewshot", assistant=("{{content}}\n\n",), efficient_eos=True),
    define(
        "gemma",
        **_GEMMA_TURNS,
        prefix=(BOS,),
        stop_words=("<end_of_turn>",),
        replace_eos=True,
        system_in_first_user=True,
    ),
    define(
        "gemma2",
        **_GEMMA_TURNS,
        prefix=(BOS,),
        stop_words=("<eos>", "<end_of_turn>"),
        efficient_eos=True,
        system_in_first_user=True,
    ),
    define(
        "gemma3",
        **_GEMMA_TURNS,
        prefix=(BOS,),
        stop_words=("<end_of_turn>",),
        replace_eos=True,
        system_in_first_user=True,
        multimodal="Gemma3",
    ),
    define(
        "gemma3n",
        **_GEMMA_TURNS,
        prefix=(BOS,),
        stop_words=("<end_of_turn>",),
        replace_eos=True,
        system_in_first_user=True,
        multimodal="Gemma3n",
    ),
    define(
        "gemma4",
        system=("<|turn>system\n<|think|>{{content}}<turn|>\n",),
        user=("<|turn>user\n{{content}}<turn|>\n<|turn>model\n",),
        assistant=("{{content}}<turn|>\n",),
        prefix=(BOS,),
        default_system="You are a helpful assistant.",
        stop_words=("<turn|>",),
        replace_eos=True,
        reasoning=True,
        thought_words=("<|channel>thought\n", "<channel|>"),
        multimodal="Gemma4",
    ),
    define(
        "gemma4n",
        system=("<|turn>system\n<|think|>{{content}}<turn|>\n",),
        user=("<|turn>user\n{{content}}<turn|>\n<|turn>model\n",),
        assistant=("{{content}}<turn|>\n",),
        prefix=(BOS,),
        default_system="You are a helpful assistant.",
        stop_words=("<turn|>",),
        replace_eos=True,
        reasoning=True,
        thought_words=("<|channel>thought\n", "<channel|>"),
        multimodal="Gemma4",
    ),
    define(
        "glm4",
        **_GLM4_TURNS,
        prefix=("[gMASK]<sop>",),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
    ),
    define(
        "glm4_moe",
        **_GLM4_TURNS,
        prefix=("[gMASK]<sop>",),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
        reasoning=True,
    ),
    define(
        "glm4v",
        **_GLM4_TURNS,
        prefix=("[gMASK]<sop>",),
        stop_words=("<|user|>", "<|observation|>", "</answer>"),
        efficient_eos=True,
        reasoning=True,
        multimodal="GLM4V",
    ),
    define(
        "glm4_5v",
        **_GLM4_TURNS,
        prefix=("[gMASK]<sop>",),
        stop_words=("<|user|>", "<|observation|>", "</answer>"),
        efficient_eos=True,
        reasoning=True,
        multimodal="GLM4V",
    ),
    define(
        "glm_ocr",
        **_GLM4_TURNS,
        prefix=("[gMASK]<sop>",),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
        multimodal="GLM4V",
    ),
    define(
        "glm4_7",
        **_GLM4_TURNS,
        prefix=("[gMASK]<sop>",),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
        reasoning=True,
        empty_thought="</think>",
        thought_words=("<think>", "</think>"),
    ),
    define(
        "glmz1",
        **_GLM4_TURNS,
        prefix=("[gMASK]<sop>",),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
        reasoning=True,
    ),
    define(
        "gpt_oss",
        system=("<|start|>system<|message|>{{content}}<|end|>",),
        user=("<|start|>user<|message|>{{content}}<|end|><|start|>assistant",),
        default_system="You are ChatGPT, a large language model trained by OpenAI.",
        efficient_eos=True,
        reasoning=True,
        thought_words=("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>"),
    ),
    define(
        "granite3",
        system=("<|start_of_role|>system<|end_of_role|>{{content}}<|end_of_text|>\n",),
        user=(
            "<|start_of_role|>user<|end_of_role|>{{content}}<|end_of_text|>\n<|start_of_role|>"
            "assistant<|end_of_role|>",
        ),
        assistant=("{{content}}<|end_of_text|>\n",),
    ),
    define(
        "granite3_vision",
        system=("<|system|>\n{{content}}\n",),
        user=("<|user|>\n{{content}}\n<|assistant|>\n",),
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        multimodal="LlavaNext",
    ),
    define(
        "granite4",
        system=("<|start_of_role|>system<|end_of_role|>{{content}}<|end_of_text|>\n",),
        user=(
            "<|start_of_role|>user<|end_of_role|>{{content}}<|end_of_text|>\n<|start_of_role|>"
            "assistant<|end_of_role|>",
        ),
        assistant=("{{content}}<|end_of_text|>\n",),
        default_system="You are Granite, developed by IBM. You are a helpful AI assistant.",
        stop_words=("<|end_of_text|>",),
    ),
    define("index", system=("<unk>{{content}}",), user=("reserved_0{{content}}reserved_1",), efficient_eos=True),
    define(
        "hunyuan",
        system=("{{content}}<|extra_4|>",),
        user=("{{content}}<|extra_0|>",),
        assistant=("{{content}}<|eos|>",),
        prefix=("<|startoftext|>",),
        stop_words=("<|eos|>",),
    ),
    define(
        "hunyuan_small",
        system=("{{content}}<｜hy_place▁holder▁no▁3｜>",),
        user=("<｜hy_User｜>{{content}}<｜hy_place▁holder▁no▁8｜>",),
        assistant=("{{content}}<｜hy_place▁holder▁no▁2｜>",),
        prefix=("<｜hy_begin▁of▁sentence｜>",),
        stop_words=("<｜hy_place▁holder▁no▁2｜>",),
    ),
    define(
        "intern2",
        **_CHATML_TURNS,
        prefix=(BOS,),
        default_system=(
            "You are an AI assistant whose name is InternLM (书生·浦语).\n- InternLM (书生·浦语) is a "
            "conversational language model that is developed by Shanghai AI Laboratory "
            "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n- InternLM (书生·浦语) "
            "can understand and communicate fluently in the language chosen by the user such as "
            "English and 中文."
        ),
        stop_words=("<|im_end|>",),
    ),
    define(
        "intern_vl",
        **_CHATML_TURNS,
        prefix=(BOS,),
        default_system="你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
        stop_words=("<|im_end|>",),
        multimodal="InternVL",
    ),
    define("intern_s1", **_CHATML_TURNS, prefix=(BOS,), stop_words=("<|im_end|>",), multimodal="InternVL"),
    define(
        "keye_vl",
        **_CHATML_TURNS,
        stop_words=("<|im_end|>",),
        replace_eos=True,
        reasoning=True,
        multimodal="Qwen2VL",
    ),
    define(
        "kimi_vl",
        system=("<|im_system|>system<|im_middle|>{{content}}<|im_end|>",),
        user=(
            "<|im_user|>user<|im_middle|>{{content}}<|im_end|><|im_assistant|>"
            "assistant<|im_middle|>",
        ),
        assistant=("{{content}}<|im_end|>",),
        default_system="You are a helpful assistant",
        stop_words=("<|im_end|>",),
        reasoning=True,
        thought_words=("◁think▷", "◁/think▷"),
        multimodal="KimiVL",
    ),
    define(
        "lfm2",
        **_CHATML_TURNS,
        default_system="You are a helpful AI assistant.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
    ),
    define(
        "lfm2_vl",
        **_CHATML_TURNS,
        default_system="You are a helpful multimodal assistant by Liquid AI.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
        multimodal="LFMVL",
    ),
    define(
        "llama2",
        system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
        user=(BOS, "[INST] {{content}} [/INST]"),
        system_in_first_user=True,
    ),
    define(
        "llama2_zh",
        system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
        user=(BOS, "[INST] {{content}} [/INST]"),
        default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
        system_in_first_user=True,
    ),
    define("llama3", **_LLAMA3_TURNS, prefix=(BOS,), stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True),
    define(
        "llama4",
        system=("<|header_start|>system<|header_end|>\n\n{{content}}<|eot|>",),
        user=(
            "<|header_start|>user<|header_end|>\n\n{{content}}<|eot|><|header_start|>"
            "assistant<|header_end|>\n\n",
        ),
        assistant=("{{content}}<|eot|>",),
        prefix=(BOS,),
        stop_words=("<|eot|>", "<|eom|>"),
        replace_eos=True,
        multimodal="Llama4",
    ),
    define(
        "mllama",
        **_LLAMA3_TURNS,
        prefix=(BOS,),
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        replace_eos=True,
        multimodal="Mllama",
    ),
    define(
        "moonlight",
        system=("<|im_system|>system<|im_middle|>{{content}}<|im_end|>",),
        user=(
            "<|im_user|>user<|im_middle|>{{content}}<|im_end|><|im_assistant|>"
            "assistant<|im_middle|>",
        ),
        assistant=("{{content}}<|im_end|>",),
        default_system="You are a helpful assistant provided by Moonshot-AI.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
    ),
    define(
        "llava",
        **_LLAVA_TURNS,
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        multimodal="Llava",
    ),
    define(
        "llava_next",
        **_LLAVA_TURNS,
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        multimodal="LlavaNext",
    ),
    define(
        "llava_next_llama3",
        **_LLAMA3_TURNS,
        prefix=(BOS,),
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        replace_eos=True,
        multimodal="LlavaNext",
    ),
    define(
        "llava_next_mistral",
        **_LLAVA_NEXT_MISTRAL_TURNS,
        prefix=(BOS,),
        system_in_first_user=True,
        multimodal="LlavaNext",
    ),
    define(
        "llava_next_qwen",
        **_CHATML_TURNS,
        default_system="You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
        multimodal="LlavaNext",
    ),
    define("llava_next_yi", **_CHATML_TURNS, stop_words=("<|im_end|>",), multimodal="LlavaNext"),
    define(
        "llava_next_video",
        **_LLAVA_TURNS,
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        multimodal="LlavaNextVideo",
    ),
    define(
        "llava_next_video_mistral",
        **_LLAVA_NEXT_MISTRAL_TURNS,
        prefix=(BOS,),
        system_in_first_user=True,
        multimodal="LlavaNextVideo",
    ),
    define("llava_next_video_yi", **_CHATML_TURNS, stop_words=("<|im_end|>",), multimodal="LlavaNextVideo"),
    define(
        "mimo",
        **_CHATML_TURNS,
        default_system="You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
        reasoning=True,
    ),
    define(
        "mimo_v2",
        **_CHATML_TURNS,
        default_system="You are MiMo, a helpful AI assistant engineered by Xiaomi.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
        reasoning=True,
        thought_words=("<think>", "</think>"),
    ),
    define(
        "mimo_vl",
        **_CHATML_TURNS,
        default_system="You are MiMo, an AI assistant developed by Xiaomi.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
        reasoning=True,
        multimodal="Qwen2VL",
    ),
    define(
        "minicpm_v",
        **_CHATML_TURNS,
        default_system="You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        multimodal="MiniCPMV",
    ),
    define(
        "minicpm_v_4_6",
        **_CHATML_TURNS,
        default_system="You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        multimodal="MiniCPMV4_6",
    ),
    define(
        "minicpm_o",
        **_CHATML_TURNS,
        default_system=(
            "You are a helpful assistant. You can accept audio and text input and output voice "
            "and text."
        ),
        stop_words=("<|im_end|>",),
        multimodal="MiniCPMV",
    ),
    define(
        "minimax1",
        system=(
            "<beginning_of_sentence>system ai_setting=assistant\n{{content}}<end_of_sentence>\n",
        ),
        user=(
            "<beginning_of_sentence>user name=user\n{{content}}<end_of_sentence>\n"
            "<beginning_of_sentence>ai name=assistant\n",
        ),
        assistant=("{{content}}<end_of_sentence>\n",),
        default_system="You are a helpful assistant.",
        stop_words=("<end_of_sentence>",),
    ),
    define(
        "minimax2",
        system=("]~!b[]~b]system\n{{content}}[e~[\n",),
        user=("]~b]user\n{{content}}[e~[\n]~b]ai\n",),
        assistant=("{{content}}[e~[\n",),
        default_system=(
            "You are a helpful assistant. Your name is MiniMax-M2.1 and is built by MiniMax."
        ),
        stop_words=("[e~[",),
        reasoning=True,
    ),
    define("ministral", **_MINISTRAL_TURNS, prefix=(BOS,), system_in_first_user=True),
    define("mistral", **_LLAVA_NEXT_MISTRAL_TURNS, prefix=(BOS,), system_in_first_user=True),
    define(
        "mistral_small",
        system=("[SYSTEM_PROMPT]{{content}}[/SYSTEM_PROMPT]",),
        user=("[INST]{{content}}[/INST]",),
        prefix=(BOS,),
        multimodal="Pixtral",
    ),
    define("ministral3", **_MINISTRAL_TURNS, prefix=(BOS,), system_in_first_user=True, multimodal="Pixtral"),
    define("olmo", user=("<|user|>\n{{content}}<|assistant|>\n",), prefix=(EOS,)),
    define("openchat", user=("GPT4 Correct User: {{content}}", EOS, "GPT4 Correct Assistant:"), prefix=(BOS,)),
    define(
        "openchat-3.6",
        user=(
            "<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n",
        ),
        prefix=(BOS,),
        stop_words=("<|eot_id|>",),
    ),
    define(
        "opencoder",
        **_CHATML_TURNS,
        default_system="You are OpenCoder, created by OpenCoder Team.",
        stop_words=("<|im_end|>",),
    ),
    define("paligemma", user=("{{content}}\n",), prefix=(BOS,), system_in_first_user=True, multimodal="PaliGemma"),
    define(
        "paligemma_chat",
        user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        assistant=("{{content}}<end_of_turn>\n",),
        prefix=(BOS,),
        stop_words=("<end_of_turn>",),
        replace_eos=True,
        system_in_first_user=True,
        multimodal="PaliGemma",
    ),
    define(
        "phi",
        system=("<|system|>\n{{content}}<|end|>\n",),
        user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",),
        assistant=("{{content}}<|end|>\n",),
        stop_words=("<|end|>",),
        replace_eos=True,
    ),
    define(
        "phi_small",
        system=("<|system|>\n{{content}}<|end|>\n",),
        user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",),
        assistant=("{{content}}<|end|>\n",),
        # no prefix: LLaMA-Factory declares {"<|endoftext|>"}, a slot it never writes (neither BOS nor EOS)
        stop_words=("<|end|>",),
        replace_eos=True,
    ),
    define(
        "phi4",
        system=("<|im_start|>system<|im_sep|>{{content}}<|im_end|>",),
        user=("<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",),
        assistant=("{{content}}<|im_end|>",),
        stop_words=("<|im_end|>",),
        replace_eos=True,
    ),
    define(
        "phi4_mini",
        system=("<|system|>{{content}}<|end|>",),
        user=("<|user|>{{content}}<|end|><|assistant|>",),
        assistant=("{{content}}<|end|>",),
        stop_words=("<|end|>",),
        replace_eos=True,
    ),
    define("pixtral", **_MINISTRAL_TURNS, prefix=(BOS,), system_in_first_user=True, multimodal="Pixtral"),
    define(
        "qwen",
        **_CHATML_TURNS,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
    ),
    define("qwen3", **_CHATML_TURNS, stop_words=("<|im_end|>",), replace_eos=True, reasoning=True),
    define("qwen3_nothink", **_CHATML_TURNS, stop_words=("<|im_end|>",), replace_eos=True),
    define(
        "qwen2_audio",
        **_CHATML_TURNS,
        default_system="You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
        multimodal="Qwen2Audio",
    ),
    define(
        "qwen2_omni",
        **_CHATML_TURNS,
        default_system="You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
        multimodal="Qwen2Omni",
    ),
    define(
        "qwen3_omni",
        **_CHATML_TURNS,
        stop_words=("<|im_end|>",),
        replace_eos=True,
        reasoning=True,
        multimodal="Qwen2Omni",
    ),
    define("qwen3_omni_nothink", **_CHATML_TURNS, stop_words=("<|im_end|>",), replace_eos=True, multimodal="Qwen2Omni"),
    define(
        "qwen2_vl",
        **_CHATML_TURNS,
        default_system="You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
        multimodal="Qwen2VL",
    ),
    define(
        "qwen3_vl",
        **_CHATML_TURNS,
        stop_words=("<|im_end|>",),
        replace_eos=True,
        reasoning=True,
        multimodal="Qwen3VL",
    ),
    define("qwen3_vl_nothink", **_CHATML_TURNS, stop_words=("<|im_end|>",), replace_eos=True, multimodal="Qwen3VL"),
    define(
        "qwen3_5",
        **_CHATML_TURNS,
        stop_words=("<|im_end|>",),
        replace_eos=True,
        reasoning=True,
        multimodal="Qwen3VL",
    ),
    define("qwen3_5_nothink", **_CHATML_TURNS, stop_words=("<|im_end|>",), replace_eos=True, multimodal="Qwen3VL"),
    define(
        "qwen3_6",
        **_CHATML_TURNS,
        stop_words=("<|im_end|>",),
        replace_eos=True,
        reasoning=True,
        multimodal="Qwen3VL",
    ),
    define(
        "sailor",
        system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
        user=("<|im_start|>question\n{{content}}<|im_end|>\n<|im_start|>answer\n",),
        assistant=("{{content}}<|im_end|>\n",),
        default_system=(
            "You are an AI assistant named Sailor created by Sea AI Lab. Your answer should be "
            "friendly, unbiased, faithful, informative and detailed."
        ),
        stop_words=("<|im_end|>",),
    ),
    define(
        "seed_coder",
        system=(BOS, "system\n{{content}}", EOS),
        user=(BOS, "user\n{{content}}", EOS, BOS, "assistant\n"),
        default_system=(
            "You are an AI programming assistant, utilizing the Seed-Coder model, developed by "
            "ByteDance Seed, and you only answer questions related to computer science. For "
            "politically sensitive questions, security and privacy issues, and other "
            "non-computer science questions, you will refuse to answer.\n\n"
        ),
    ),
    define(
        "seed_oss",
        system=(BOS, "system\n{{content}}", EOS),
        user=(BOS, "user\n{{content}}", EOS, BOS, "assistant\n"),
        reasoning=True,
        thought_words=("<seed:think>", "</seed:think>"),
    ),
    define("smollm", **_CHATML_TURNS, stop_words=("<|im_end|>",)),
    define(
        "smollm2",
        **_CHATML_TURNS,
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
        stop_words=("<|im_end|>",),
    ),
    define(
        "solar",
        system=("### System:\n{{content}}\n\n",),
        user=("### User:\n{{content}}\n\n### Assistant:\n",),
        efficient_eos=True,
    ),
    define(
        "starchat",
        system=("<|system|>\n{{content}}<|end|>\n",),
        user=("<|user|>\n{{content}}<|end|>\n<|assistant|>",),
        assistant=("{{content}}<|end|>\n",),
        stop_words=("<|end|>",),
    ),
    define(
        "telechat2",
        system=("<_system>{{content}}",),
        user=("<_user>{{content}}<_bot>",),
        default_system="你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）研发的人工智能助手。",
    ),
    define(
        "vicuna",
        **_LLAVA_TURNS,
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
    ),
    define(
        "video_llava",
        **_LLAVA_TURNS,
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        multimodal="VideoLlava",
    ),
    define(
        "xuanyuan",
        user=("Human: {{content}} Assistant:",),
        default_system=(
            "以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，会对人类提出的问题给出有帮助、高质量、详细和礼貌的回答，"
            "并且总是拒绝参与与不道德、不安全、有争议、政治敏感等相关的话题、问题和指示。\n"
        ),
    ),
    define("yi", **_CHATML_TURNS, stop_words=("<|im_end|>",)),
    define(
        "yi_vl",
        user=("### Human: {{content}}\n### Assistant:",),
        assistant=("{{content}}\n",),
        default_system=(
            "This is a chat between an inquisitive human and an AI assistant. Assume the role of "
            "the AI assistant. Read all the images carefully, and respond to the human's "
            "questions with informative, helpful, detailed and polite answers. "
            "这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。仔细阅读所有的图像，并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。\n\n"
        ),
        stop_words=("###",),
        efficient_eos=True,
        multimodal="Llava",
    ),
    define(
        "youtu",
        user=("<|User|>{{content}}<|Assistant|>",),
        assistant=("{{content}}<|end_of_text|>",),
        prefix=(BOS,),
        stop_words=("<|end_of_text|>",),
        replace_eos=True,
        reasoning=True,
    ),
    define(
        "youtu_vl",
        system=("<|begin_of_text|>system\n{{content}}<|end_of_text|>\n",),
        user=(
            "<|begin_of_text|>user\n{{content}}<|end_of_text|>\n<|begin_of_text|>assistant\n",
        ),
        assistant=("{{content}}<|end_of_text|>\n",),
        default_system="You are a helpful assistant.",
        stop_words=("<|end_of_text|>",),
        multimodal="YoutuVL",
    ),
    define("yuan", user=("{{content}}", Token("<sep>")), assistant=("{{content}}<eod>\n",), stop_words=("<eod>",)),
    define(
        "zephyr",
        system=("<|system|>\n{{content}}", EOS),
        user=("<|user|>\n{{content}}", EOS, "<|assistant|>\n"),
        default_system="You are Zephyr, a helpful assistant.",
    ),
    define(
        "aeva",
        **_GLM4_TURNS,
        prefix=("[gMASK]<sop>",),
        default_system=(
            "You are an AI assistant named Aeva created by Zongzhi Lou. Your answer should be "
            "friendly, unbiased, faithful, informative and detailed."
        ),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
        reasoning=True,
        empty_thought="</think>",
        thought_words=("<think>", "</think>"),
    ),
)
