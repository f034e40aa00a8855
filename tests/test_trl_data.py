"""TRL 1.16 data features read and tokenized as TRL 1.16's DPOTrainer does (the oracle): per-row tools and
chat_template_kwargs, tool-call completions (assistant call, tool result, answer), reasoning templates whose prompt
is not a prefix of the full conversation (Qwen3), and gpt-oss harmony rows (assistant "thinking").

The same rows go through preftune (formats -> tokenize) and through TRL's own dataset preparation
(`DPOTrainer._prepare_dataset`, and once a whole `DPOTrainer`); the token ids must be equal. The chat templates are
the models' own, read at test time from the installed trl package (trl/chat_templates), on the offline GPT-2
tokenizer with the templates' special tokens added.
"""

from __future__ import annotations

import copy
import json
import logging
import types
from pathlib import Path

import datasets
import pytest
import torch
from conftest import shared_asset
from transformers import AutoTokenizer

from preftune.data.collate import collate_pairs
from preftune.data.formats import canonicalize_records, load_preference_data
from preftune.data.pipeline import prepare_data
from preftune.data.tokenize import TokenizeSettings, tokenize_dataset
from preftune.data.validate import CheckSettings, check_data, find_problems, write_clean
from preftune.errors import DataError

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>",
                  "<|call|>", "<|constrain|>"]


def function(name: str, description: str, **parameters: str) -> dict:
    """A JSON-schema function description like transformers' get_json_schema writes."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {key: {"type": kind, "description": key}
                                                        for key, kind in parameters.items()},
                       "required": list(parameters)}}}


def call(name: str, **arguments) -> dict:
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name,
                                                                                  "arguments": arguments}}]}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def answer(text: str, **fields) -> dict:
    return {"role": "assistant", "content": text, **fields}


TIMER = function("start_timer", "Starts a timer.", duration="integer")
CLOCK = function("get_current_time", "Current time in a place.", location="string")

# TRL's toolcall preference rows: a tool call, its result and the answer, or a plain answer; each row its own tools,
# whose argument schemas differ (stored as columns of structs, rows would get each other's keys as nulls).
TOOLCALL_ROWS = [
    {"prompt": user("Set a timer for 10 minutes."),
     "chosen": [call("start_timer", duration=600), {"role": "tool", "name": "start_timer", "content": "600"},
                answer("Timer set for 10 minutes.")],
     "rejected": [call("start_timer", duration=10), {"role": "tool", "name": "start_timer", "content": "10"},
                  answer("Timer set for 10 seconds.")],
     "tools": [TIMER]},
    {"prompt": user("东京现在几点？"),
     "chosen": [call("get_current_time", location="Tokyo"),
                {"role": "tool", "name": "get_current_time", "content": "06:22:48"},
                answer("东京现在是早上6点22分。")],
     "rejected": [answer("It is 6:22 AM in Tokyo.")],
     "tools": [CLOCK, TIMER]},
]

# TRL's harmony preference rows: assistant messages with "thinking", template variables per row.
HARMONY_ROWS = [
    {"prompt": user("What is better than ugly?"),
     "chosen": [answer("Beautiful.", thinking="Beauty improves clarity.")],
     "rejected": [answer("Better than the moon.", thinking="This comparison is nonsensical.")],
     "chat_template_kwargs": {"reasoning_effort": "low", "model_identity": "You are Tiny ChatGPT."}},
    {"prompt": user("What is better than implicit?"),
     "chosen": [answer("Explicit.", thinking="Clarity avoids confusion.")],
     "rejected": [answer("Worse than nothing.", thinking="This dismisses clarity.")],
     "chat_template_kwargs": {"reasoning_effort": "high", "model_identity": "You are Tiny ChatGPT."}},
]


def model_template(name: str) -> str:
    """A model's own chat template as shipped in the installed trl package (used there to recognise models)."""
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def base_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"))
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer


def with_template(tokenizer, template: str):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def as_hub_dataset(rows: list[dict]) -> datasets.Dataset:
    """The rows as TRL's test datasets store them: Json columns (no nulls for keys other rows have)."""
    return datasets.Dataset.from_list(rows, features=datasets.Features({name: datasets.Json() for name in rows[0]}))


def trl_tokenized(rows: list[dict], tokenizer) -> list[dict]:
    """TRL 1.16's own tokenization of the rows: DPOTrainer._prepare_dataset (no truncation)."""
    logging.getLogger("trl").setLevel(logging.ERROR)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    prepared = DPOTrainer._prepare_dataset(trainer, as_hub_dataset(rows), tokenizer, args, "train")
    return [{key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in prepared]


def ours(rows, tokenizer):
    """preftune's reading and tokenization of the same rows (the tokenizer's own template, no truncation)."""
    loaded = canonicalize_records(rows, source="mem")
    return tokenize_dataset(loaded.dataset, tokenizer, TokenizeSettings(max_length=None))


def ids_of(tokenized) -> list[dict]:
    return [{key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in tokenized.dataset]


def rendered(tokenizer, messages, row, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tools=row.get("tools"), tokenize=False,
                                         **row.get("chat_template_kwargs", {}), **kwargs)


# ---------------------------------------------------------------- tools and tool-call completions


def test_tool_call_completions_with_tools_tokenize_like_trl_qwen25(base_tokenizer):
    tokenizer = with_template(base_tokenizer, model_template("qwen2_5"))
    tokenized = ours(TOOLCALL_ROWS, tokenizer)
    assert ids_of(tokenized) == trl_tokenized(TOOLCALL_ROWS, tokenizer)
    first = tokenized.dataset[0]
    prompt = tokenizer.decode(first["prompt_ids"])
    assert '"name": "start_timer"' in prompt and "<tools>" in prompt  # the row's tools reach the system prompt
    assert "get_current_time" not in prompt
    assert "get_current_time" in tokenizer.decode(tokenized.dataset[1]["prompt_ids"])
    # the whole completion is scored: the call, the tool's result and the answer
    assert tokenizer.decode(first["chosen_ids"]) == (
        '<tool_call>\n{"name": "start_timer", "arguments": {"duration": 600}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n600\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nTimer set for 10 minutes.<|im_end|>\n")
    assert tokenized.stats.prefix_mismatch == 0


def test_tools_given_as_one_json_string_render_like_the_list_in_trl(base_tokenizer):
    tokenizer = with_template(base_tokenizer, model_template("qwen2_5"))
    as_strings = [dict(row, tools=json.dumps(row["tools"])) for row in TOOLCALL_ROWS]
    loaded = canonicalize_records(as_strings, source="mem")
    assert loaded.dataset[1]["tools"] == [CLOCK, TIMER]
    assert ids_of(ours(as_strings, tokenizer)) == trl_tokenized(as_strings, tokenizer) == trl_tokenized(
        TOOLCALL_ROWS, tokenizer)


def test_completion_mask_scores_tool_results_like_trl_collator(base_tokenizer):
    tokenizer = with_template(base_tokenizer, model_template("qwen2_5"))
    examples = ours(TOOLCALL_ROWS, tokenizer).dataset.to_list()
    trl_batch = DataCollatorForPreference(pad_token_id=0)(trl_tokenized(TOOLCALL_ROWS, tokenizer))
    batch = collate_pairs(examples, pad_token_id=0)
    assert torch.equal(batch.input_ids, trl_batch["input_ids"])
    scored = torch.zeros_like(batch.input_ids)
    scored[batch.score_rows, batch.score_positions + 1] = 1  # the token each scored hidden state predicts
    assert torch.equal(scored, trl_batch["completion_mask"])
    assert torch.equal(batch.input_ids[scored.bool()], trl_batch["input_ids"][trl_batch["completion_mask"].bool()])


def test_canonical_rows_keep_each_rows_own_tool_fields_without_nulls():
    loaded = canonicalize_records(TOOLCALL_ROWS, source="mem")
    assert loaded.is_conversational and loaded.dataset.column_names == [
        "prompt", "chosen", "rejected", "row", "tools"]
    for index, row in enumerate(TOOLCALL_ROWS):
        stored = loaded.dataset[index]
        assert (stored["chosen"], stored["rejected"], stored["tools"]) == (row["chosen"], row["rejected"],
                                                                          row["tools"])


def test_a_tool_source_and_a_plain_source_concatenate_with_null_tools(tmp_path):
    plain = {"prompt": user("Hi"), "chosen": [answer("Hello!")], "rejected": [answer("Go away.")]}
    paths = []
    for name, rows in (("tools.jsonl", TOOLCALL_ROWS), ("plain.jsonl", [plain])):
        paths.append(tmp_path / name)
        paths[-1].write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    loaded = load_preference_data([str(path) for path in paths])
    assert loaded.dataset["tools"] == [TOOLCALL_ROWS[0]["tools"], TOOLCALL_ROWS[1]["tools"], None]
    assert loaded.dataset[2]["chosen"] == plain["chosen"] and loaded.dataset[0]["chosen"] == TOOLCALL_ROWS[0]["chosen"]


def test_implicit_prompt_keeps_a_shared_tool_call_and_result_like_trl_extract_prompt():
    shared = user("Set a timer.") + [call("start_timer", duration=60),
                                     {"role": "tool", "name": "start_timer", "content": "60"}]
    row = {"chosen": shared + [answer("Done: one minute.")], "rejected": shared + [answer("I can't.")]}
    expected = trl.extract_prompt(row)
    assert expected["prompt"] == shared
    stored = canonicalize_records([row], source="mem").dataset[0]
    assert {key: stored[key] for key in ("prompt", "chosen", "rejected")} == expected


# ---------------------------------------------------------------- chat_template_kwargs


# A ChatML template with a template variable of its own: `loud` writes the role names in capitals.
LOUD_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + (message.role | upper if loud else message.role) + '\\n' + message.content }}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>' + ('ASSISTANT' if loud else 'assistant') + '\\n' }}{%- endif -%}"
)


def test_per_row_chat_template_kwargs_reach_the_template_like_trl(base_tokenizer):
    tokenizer = with_template(base_tokenizer, LOUD_CHATML)
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}] + user(f"Question {index}?"),
             "chosen": [answer("Yes.")], "rejected": [answer("No.")], "chat_template_kwargs": {"loud": index % 2 == 1}}
            for index in range(4)]
    tokenized = ours(rows, tokenizer)
    assert ids_of(tokenized) == trl_tokenized(rows, tokenizer)
    for index, row in enumerate(tokenized.dataset):
        system = "SYSTEM" if index % 2 else "system"
        header = tokenizer(f"<|im_start|>{system}\nBe brief.<|im_end|>\n")["input_ids"]
        assert row["prompt_ids"][:len(header)] == header
        assert tokenizer.decode(row["chosen_ids"]) == "Yes.<|im_end|>\n"


def test_chat_template_kwargs_with_different_keys_per_row_stay_apart(base_tokenizer):
    rows = [dict(HARMONY_ROWS[0], chat_template_kwargs={"loud": True}),
            dict(HARMONY_ROWS[1], chat_template_kwargs={"enable_thinking": False})]
    loaded = canonicalize_records(rows, source="mem")
    assert loaded.dataset["chat_template_kwargs"] == [{"loud": True}, {"enable_thinking": False}]


# ---------------------------------------------------------------- reasoning templates


def test_qwen3_prompt_that_is_not_a_prefix_splits_where_trl_does(base_tokenizer):
    tokenizer = with_template(base_tokenizer, model_template("qwen3"))
    rows = [dict(TOOLCALL_ROWS[0], chat_template_kwargs={"enable_thinking": False}),
            dict(TOOLCALL_ROWS[1], chat_template_kwargs={"enable_thinking": True}),
            {"prompt": user("2 + 2?"), "chosen": [answer("4", reasoning_content="Add them.")],
             "rejected": [answer("5", reasoning_content="Guess.")], "chat_template_kwargs": {"enable_thinking": False}}]
    # Independent of both engines: without thinking the generation prompt ends in an empty think block that the
    # full conversation does not have before a tool call, so the prompt alone is not a prefix of it.
    prompt_alone = rendered(tokenizer, rows[0]["prompt"], rows[0], add_generation_prompt=True)
    full = rendered(tokenizer, rows[0]["prompt"] + rows[0]["chosen"], rows[0])
    assert prompt_alone.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and not full.startswith(prompt_alone)
    assert full.startswith(prompt_alone.removesuffix("<think>\n\n</think>\n\n"))

    tokenized = ours(rows, tokenizer)
    assert ids_of(tokenized) == trl_tokenized(rows, tokenizer)
    not_prefix = 0
    for row, ids in zip(rows, tokenized.dataset):
        prompt = tokenizer(rendered(tokenizer, row["prompt"], row, add_generation_prompt=True))["input_ids"]
        fulls = [tokenizer(rendered(tokenizer, row["prompt"] + row[name], row))["input_ids"]
                 for name in ("chosen", "rejected")]
        assert ids["prompt_ids"] + ids["chosen_ids"] == fulls[0] and ids["prompt_ids"] + ids["rejected_ids"] == fulls[1]
        not_prefix += any(full[:len(prompt)] != prompt for full in fulls)
    assert tokenized.stats.prefix_mismatch == not_prefix == 2  # rows 0 and 2: thinking off, a call or reasoning
    assert len(tokenized.dataset[0]["prompt_ids"]) < len(tokenizer(prompt_alone)["input_ids"])


def test_gpt_oss_harmony_rows_tokenize_like_trl(base_tokenizer):
    tokenizer = with_template(base_tokenizer, model_template("gptoss"))
    tokenized = ours(HARMONY_ROWS, tokenizer)
    assert ids_of(tokenized) == trl_tokenized(HARMONY_ROWS, tokenizer)
    first = tokenized.dataset[0]
    assert "Reasoning: low" in tokenizer.decode(first["prompt_ids"])
    assert "Reasoning: high" in tokenizer.decode(tokenized.dataset[1]["prompt_ids"])
    assert tokenizer.decode(first["chosen_ids"]) == (
        "<|channel|>analysis<|message|>Beauty improves clarity.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Beautiful.<|return|>")


def test_unpaired_tool_call_completion_renders_with_the_rows_tools(base_tokenizer):
    tokenizer = with_template(base_tokenizer, model_template("qwen2_5"))
    row = {"prompt": TOOLCALL_ROWS[0]["prompt"], "completion": TOOLCALL_ROWS[0]["chosen"], "label": True,
           "tools": [TIMER]}
    tokenized = ours([row], tokenizer).dataset[0]
    full = tokenizer(rendered(tokenizer, row["prompt"] + row["completion"], row))["input_ids"]
    prompt = tokenizer(rendered(tokenizer, row["prompt"], row, add_generation_prompt=True))["input_ids"]
    assert (tokenized["prompt_ids"], tokenized["completion_ids"]) == (prompt, full[len(prompt):])
    assert full[:len(prompt)] == prompt


# ---------------------------------------------------------------- a whole DPOTrainer


def test_dpo_trainer_train_dataset_has_preftunes_ids(base_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = with_template(base_tokenizer, model_template("qwen3"))
    tokenizer.pad_token = "<|im_end|>"
    rows = [dict(row, chat_template_kwargs={"enable_thinking": False}) for row in TOOLCALL_ROWS]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=16, n_layer=1, n_head=2))
    args = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=None)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=as_hub_dataset(rows), processing_class=tokenizer)
    assert [{key: trainer.train_dataset[i][key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
            for i in range(len(rows))] == ids_of(ours(rows, tokenizer))


# ---------------------------------------------------------------- the training pipeline and the data checks


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_prepare_data_reads_tool_call_jsonl_and_renders_its_tools(base_tokenizer, tmp_path):
    tokenizer = with_template(base_tokenizer, model_template("qwen2_5"))
    path = write_jsonl(tmp_path / "toolcall.jsonl", TOOLCALL_ROWS)
    from preftune import DPOConfig

    config = DPOConfig(overwrite_cache=True, max_length=None, seed=0)
    prepared = prepare_data(config, tokenizer, str(path))
    assert ids_of(prepared.train) == trl_tokenized(TOOLCALL_ROWS, tokenizer)
    assert prepared.report["train"]["rows_failed_checks"] == 0


def test_data_checks_compare_tool_calls_and_reasoning_not_only_the_text():
    same_text = dict(TOOLCALL_ROWS[0], rejected=[call("start_timer", duration=1)] + TOOLCALL_ROWS[0]["chosen"][1:])
    same_answer = dict(HARMONY_ROWS[0], rejected=[answer("Beautiful.", thinking="Other reasoning.")])
    rows = [same_text, TOOLCALL_ROWS[1], same_answer,
            dict(TOOLCALL_ROWS[1], rejected=TOOLCALL_ROWS[1]["chosen"]), TOOLCALL_ROWS[1]]
    problems = find_problems(canonicalize_records(rows, source="mem"))
    assert problems["identical_pair"] == [3]  # rows 0 and 2 differ in the call's arguments / the reasoning only
    assert problems["duplicate"] == [4] and problems["turn_order"] == [] and problems["empty_or_short"] == []


def test_data_check_counts_templated_prompt_tokens_with_the_rows_tools(base_tokenizer, tmp_path):
    tokenizer = with_template(base_tokenizer, model_template("qwen2_5"))
    lengths = [len(tokenizer(rendered(tokenizer, row["prompt"], row, add_generation_prompt=True))["input_ids"])
               for row in TOOLCALL_ROWS]
    assert lengths[0] < lengths[1]  # row 1 has two tools in its system prompt
    # row 0's responses differ in few characters (600 / 10, minutes / seconds): too_similar at the default 0.9
    settings = CheckSettings(tokenizer=tokenizer, max_length=lengths[0], max_similarity=0.99)
    checked = check_data(str(write_jsonl(tmp_path / "toolcall.jsonl", TOOLCALL_ROWS)), settings=settings)
    assert checked.flagged == {1}
    written = write_clean(checked, tmp_path / "clean.jsonl")
    assert written == 1
    assert [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text(encoding="utf-8").splitlines()] == [
        TOOLCALL_ROWS[0]]


# ---------------------------------------------------------------- rows refused with their field


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        ({"prompt": "Set a timer.", "chosen": "Done.", "rejected": "No."}, "tools", "is set on a text row"),
        ({"tools": {"name": "start_timer"}}, "tools", "expected a list of JSON-schema function objects"),
        ({"tools": "[{not json"}, "tools", "not valid JSON"),
        ({"tools": [json.dumps(TIMER)]}, "tools", "tool 0 is"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs",
         "sets add_generation_prompt"),
        ({"chat_template_kwargs": {"tools": [TIMER]}}, "chat_template_kwargs", "the row's 'tools' field"),
        ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs", "is of type list"),
        ({"chosen": [call("start_timer", duration=1), {"role": "tool", "content": "1"}]}, "chosen",
         "ends on a 'tool' message"),
        ({"chosen": [answer("Sure."), {"role": "tool", "content": "1"}, answer("Done.")]}, "chosen",
         "message 1, 'tool', follows an assistant message without tool_calls"),
        ({"chosen": [call("start_timer", duration=1), answer("Done.")]}, "chosen",
         "message 1 has role 'assistant'; expected the 'tool' results"),
        ({"chosen": [{"role": "tool", "content": "1"}, answer("Done.")]}, "chosen", "has role 'tool'; expected"),
        ({"chosen": [call("start_timer", duration=1), {"role": "tool", "content": "1"}, answer("  ")]}, "chosen",
         "message 2 is empty"),
        ({"chosen": [{"role": "assistant", "tool_calls": "start_timer"}]}, "chosen", "expected a list of call"),
        ({"prompt": [{"role": "tool", "content": "1"}]}, "prompt", "expected 'user'"),
    ],
    ids=["tools-on-text", "tools-not-a-list", "tools-bad-json", "tools-as-strings", "reserved-kwarg",
         "tools-in-kwargs", "kwargs-not-an-object", "ends-on-tool", "tool-without-call", "call-without-result",
         "starts-with-tool", "empty-answer", "tool-calls-not-a-list", "prompt-starts-with-tool"],
)
def test_bad_tool_rows_are_data_errors_naming_the_field(change, field, expected):
    row = {**TOOLCALL_ROWS[0], **change}
    with pytest.raises(DataError, match=expected) as caught:
        canonicalize_records([TOOLCALL_ROWS[1], row], source="mem")
    assert (caught.value.row, caught.value.field) == (1, field)


def test_a_prompt_may_end_on_a_tool_result():
    prompt = user("Set a timer.") + [call("start_timer", duration=60),
                                     {"role": "tool", "name": "start_timer", "content": "60"}]
    row = {"prompt": prompt, "chosen": [answer("Done.")], "rejected": [answer("Failed.")], "tools": [TIMER]}
    assert canonicalize_records([row], source="mem").dataset[0]["prompt"] == prompt
