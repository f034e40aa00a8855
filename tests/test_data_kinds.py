"""Two further kinds of preference data: several rejected responses per prompt, and unpaired (KTO) rows.

Reading (every accepted shape, bad rows), tokenizing (the shared prompt, truncation, the cache) and the pipeline
(kind and M from train, eval must match, report counts). Expected values are written out by hand or come from
tokenizing the same row as a classic pair.
"""

from __future__ import annotations

import json
import logging
import os
import re
from types import SimpleNamespace

import datasets
import pytest
from conftest import shared_asset
from transformers import AutoTokenizer

from preftune.data import tokenize as tokenize_module
from preftune.data.formats import canonicalize_records, load_preference_data
from preftune.data.pipeline import prepare_data
from preftune.data.templates import get_template
from preftune.data.tokenize import (
    OUTPUT_COLUMNS,
    UNPAIRED_OUTPUT_COLUMNS,
    TokenizeSettings,
    tokenization_fingerprint,
    tokenize_dataset,
    tokenize_pair,
    tokenize_unpaired,
)
from preftune.errors import ConfigError, DataError

GPT2_EOS = "<|endoftext|>"


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_registry(directory, entries):
    (directory / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2 byte-level BPE: adds no special tokens, BOS = EOS = <|endoftext|>."""
    return AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"))


@pytest.fixture
def llamafactory_dir():
    return shared_asset("llamafactory")


def ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


# ---------------------------------------------------------------- reading several rejected responses

TEXT_MULTI = [
    {"prompt": "Sky color?", "chosen": " Blue.", "rejected": [" Green.", " Red."]},
    {"prompt": "Sun place?", "chosen": " Sky.", "rejected": [" Sea.", " Cave."], "extra": 1},
]


def test_trl_text_rows_with_rejected_lists_keep_the_list_and_count_it(tmp_path):
    loaded = load_preference_data(str(write_jsonl(tmp_path / "multi.jsonl", TEXT_MULTI)))
    assert (loaded.kind, loaded.num_negatives, loaded.is_conversational) == ("paired", 2, False)
    assert loaded.dataset.column_names == ["prompt", "chosen", "rejected", "row"]
    assert loaded.dataset["rejected"] == [[" Green.", " Red."], [" Sea.", " Cave."]]
    assert loaded.dataset["row"] == [0, 1]


def test_trl_conversational_rows_with_lists_of_message_lists():
    rows = [
        {"prompt": user("Sky?"), "chosen": assistant("Blue."),
         "rejected": [assistant("Green."), assistant("Red."), assistant("Grey.")]},
        # beside a conversational prompt, bare strings and message objects are one assistant turn each
        {"prompt": user("Sun?"), "chosen": "Sky.", "rejected": ["Sea.", {"role": "assistant", "content": "Cave."},
                                                                 assistant("Moon.")]},
    ]
    loaded = canonicalize_records(rows, source="mem")
    assert (loaded.kind, loaded.num_negatives, loaded.is_conversational) == ("paired", 3, True)
    assert loaded.dataset[0]["rejected"] == [assistant("Green."), assistant("Red."), assistant("Grey.")]
    assert loaded.dataset[1]["chosen"] == assistant("Sky.")
    assert loaded.dataset[1]["rejected"] == [assistant("Sea."), assistant("Cave."), assistant("Moon.")]


def test_implicit_prompt_is_shared_by_chosen_and_every_rejected_response():
    text = canonicalize_records([{"chosen": "Q: sky? A: blue", "rejected": ["Q: sky? A: red", "Q: sky? A: grey"]}],
                                source="mem")
    assert text.dataset[0] == {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": [" red", " grey"], "row": 0}
    dialogue = user("Hi") + assistant("Hello") + user("Sky?")
    chat = canonicalize_records([{"chosen": dialogue + assistant("Blue."),
                                  "rejected": [dialogue + assistant("Red."), dialogue + assistant("Grey.")]}],
                                source="mem")
    assert chat.dataset[0]["prompt"] == dialogue
    assert chat.dataset[0]["rejected"] == [assistant("Red."), assistant("Grey.")]
    hh = "\n\nHuman: Sky?\n\nAssistant:"
    split = canonicalize_records([{"chosen": hh + " Blue.", "rejected": [hh + " Red.", hh + " Blue, mostly."]}],
                                 source="mem")
    assert split.dataset[0] == {"prompt": hh, "chosen": " Blue.", "rejected": [" Red.", " Blue, mostly."], "row": 0}


def test_single_rejected_responses_keep_the_classic_form_even_as_lists_of_one():
    rows = [{"prompt": "Q", "chosen": "a", "rejected": ["b"]}, {"prompt": "Q", "chosen": "a", "rejected": "c"},
            {"prompt": user("Q"), "chosen": "a", "rejected": [[{"role": "assistant", "content": "d"}]]}]
    text = canonicalize_records(rows[:2], source="mem")
    assert text.num_negatives == 1 and text.dataset["rejected"] == ["b", "c"]
    chat = canonicalize_records(rows[2:], source="mem")
    assert chat.num_negatives == 1 and chat.dataset[0]["rejected"] == assistant("d")


def test_llamafactory_alpaca_and_sharegpt_ranking_rows_with_rejected_lists(tmp_path):
    alpaca = [{"instruction": "Translate", "input": "bonjour", "chosen": "hello", "rejected": ["bye", "night"]}]
    sharegpt = [{"conversations": [{"from": "human", "value": "Sky?"}], "chosen": {"from": "gpt", "value": "Blue"},
                 "rejected": [{"from": "gpt", "value": "Red"}, {"from": "gpt", "value": "Grey"}]}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca), encoding="utf-8")
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt), encoding="utf-8")
    write_registry(tmp_path, {
        "a": {"file_name": "alpaca.json", "ranking": True},
        "s": {"file_name": "sharegpt.json", "ranking": True, "formatting": "sharegpt"},
    })
    by_name = load_preference_data("a", dataset_dir=str(tmp_path))
    assert by_name.num_negatives == 2
    assert by_name.dataset[0] == {"prompt": user("Translate\nbonjour"), "chosen": assistant("hello"),
                                  "rejected": [assistant("bye"), assistant("night")], "row": 0}
    chat = load_preference_data("s", dataset_dir=str(tmp_path))
    assert chat.num_negatives == 2
    assert chat.dataset[0]["rejected"] == [assistant("Red"), assistant("Grey")]
    # the same files without the registry are recognised by their columns
    assert load_preference_data(str(tmp_path / "alpaca.json")).dataset[:] == by_name.dataset[:]
    assert load_preference_data(str(tmp_path / "sharegpt.json")).dataset[:] == chat.dataset[:]


# ---------------------------------------------------------------- reading unpaired rows


def test_trl_unpaired_text_rows_with_every_label_spelling(tmp_path):
    rows = [
        {"prompt": "Sky?", "completion": " Blue.", "label": True},
        {"prompt": "Sky?", "completion": " Green.", "label": "FALSE"},
        {"prompt": "Sun?", "completion": " Up.", "label": 1},
        {"prompt": "Sun?", "completion": " Down.", "label": 0},
        {"prompt": "Sea?", "completion": " Wet.", "label": " true "},
    ]
    loaded = load_preference_data(str(write_jsonl(tmp_path / "kto.jsonl", rows)))
    assert (loaded.kind, loaded.num_negatives, loaded.is_conversational) == ("unpaired", 1, False)
    assert loaded.dataset.column_names == ["prompt", "completion", "label", "row"]
    assert loaded.dataset["label"] == [True, False, True, False, True]
    assert loaded.dataset["completion"] == [" Blue.", " Green.", " Up.", " Down.", " Wet."]


def test_trl_unpaired_conversational_rows_explicit_and_whole_conversation():
    rows = [
        {"prompt": user("Sky?"), "completion": assistant("Blue."), "label": True},
        {"prompt": user("Sky?"), "completion": "Green.", "label": False},
        # the completion holds the whole conversation (argilla/kto-mix style); the string prompt repeats it
        {"prompt": "Sun?", "completion": user("Sun?") + assistant("Up."), "label": True},
    ]
    loaded = canonicalize_records(rows, source="mem")
    assert (loaded.kind, loaded.is_conversational) == ("unpaired", True)
    assert loaded.dataset["prompt"] == [user("Sky?"), user("Sky?"), user("Sun?")]
    assert loaded.dataset["completion"] == [assistant("Blue."), assistant("Green."), assistant("Up.")]


def test_kto_en_demo_loads_300_unpaired_conversations(llamafactory_dir):
    raw = json.loads((llamafactory_dir / "kto_en_demo.json").read_text(encoding="utf-8"))
    loaded = load_preference_data("kto_en_demo", dataset_dir=str(llamafactory_dir))
    assert len(loaded.dataset) == 300 and loaded.skipped_rows == []
    assert (loaded.kind, loaded.is_conversational, loaded.num_negatives) == ("unpaired", True, 1)
    labels = loaded.dataset["label"]
    assert sum(labels) == sum(row["label"] for row in raw) == 150 and labels.count(False) == 150
    for example in loaded.dataset:
        messages = raw[example["row"]]["messages"]
        assert example["prompt"] == messages[:-1] and example["completion"] == messages[-1:]
        assert example["prompt"][-1]["role"] == "user" and example["completion"][0]["role"] == "assistant"
    assert load_preference_data(str(llamafactory_dir / "kto_en_demo.json")).dataset[:] == loaded.dataset[:]


def test_kto_en_demo_from_the_repo_root_with_a_relative_dataset_dir(monkeypatch):
    shared_asset("llamafactory/kto_en_demo.json")
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert len(load_preference_data("kto_en_demo", dataset_dir="../shared/assets/llamafactory").dataset) == 300


def test_llamafactory_alpaca_kto_rows_use_the_response_column(tmp_path):
    rows = [{"instruction": "Say hi", "answer": "hi", "ok": "true"}, {"instruction": "Say hi", "answer": "no",
                                                                     "ok": "false"}]
    (tmp_path / "kto.json").write_text(json.dumps(rows), encoding="utf-8")
    write_registry(tmp_path, {"k": {"file_name": "kto.json", "columns": {"prompt": "instruction",
                                                                         "response": "answer", "kto_tag": "ok"}}})
    loaded = load_preference_data("k", dataset_dir=str(tmp_path))
    assert loaded.kind == "unpaired"
    assert loaded.dataset[:] == {"prompt": [user("Say hi")] * 2, "completion": [assistant("hi"), assistant("no")],
                                 "label": [True, False], "row": [0, 1]}


# ---------------------------------------------------------------- bad rows


def assert_names(error: DataError, path, row: int, field: str):
    assert (error.file, error.row, error.field) == (str(path), row, field)
    assert f"file {path}, row {row}, field '{field}'" in str(error)


def test_a_row_with_another_number_of_rejected_responses_is_a_bad_row(tmp_path, caplog):
    rows = TEXT_MULTI + [{"prompt": "Q", "chosen": "a", "rejected": ["b", "c", "d"]}, TEXT_MULTI[0],
                         {"prompt": "Q", "chosen": "a", "rejected": "b"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_preference_data(str(path))
    assert_names(caught.value, path, 2, "rejected")
    assert "3 rejected responses" in str(caught.value) and "earlier rows have 2" in str(caught.value)
    skipped = load_preference_data(str(path), on_bad_row="skip")
    assert skipped.dataset["row"] == [0, 1, 3] and skipped.num_negatives == 2
    assert [row for row, _ in skipped.skipped_rows] == [2, 4]
    assert "1 rejected responses but earlier rows have 2" in skipped.skipped_rows[1][1]
    with caplog.at_level(logging.WARNING, logger="preftune.data.formats"):
        warned = load_preference_data(str(path), on_bad_row="warn")
    assert [row for row, _ in warned.skipped_rows] == [2, 4]
    assert len([r for r in caplog.records if "skipping bad row" in r.getMessage()]) == 2


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ({"prompt": "Q", "chosen": "a", "rejected": []}, "empty list"),
        ({"prompt": "Q", "chosen": "a", "rejected": ["b", "  "]}, "response 1 is empty"),
        ({"prompt": "Q", "chosen": "a", "rejected": ["b", 7]}, "response 1 is of type int"),
        ({"prompt": user("Q"), "chosen": "a", "rejected": [assistant("b"), user("c")]},
         "response 1 has role 'user'; expected 'assistant'"),
        ({"prompt": user("Q"), "chosen": "a", "rejected": assistant("b") + assistant("c")},
         "a list of message lists"),
    ],
    ids=["empty-list", "empty-response", "non-string-response", "user-response", "two-messages"],
)
def test_bad_rejected_lists_name_the_field_and_the_response(tmp_path, bad_row, expected):
    path = write_jsonl(tmp_path / "rows.jsonl", [bad_row])
    with pytest.raises(DataError, match=expected) as caught:
        load_preference_data(str(path))
    assert_names(caught.value, path, 0, "rejected")


@pytest.mark.parametrize("label", ["yes", 2, 0.5, None, [True]], ids=["word", "two", "float", "missing", "list"])
def test_a_label_that_is_not_a_boolean_is_a_bad_row(tmp_path, label):
    good = {"prompt": "Q", "completion": "a", "label": True}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, {"prompt": "Q", "completion": "b", "label": label}, good])
    with pytest.raises(DataError, match="boolean label") as caught:
        load_preference_data(str(path))
    assert_names(caught.value, path, 1, "label")
    skipped = load_preference_data(str(path), on_bad_row="skip")
    assert skipped.dataset["row"] == [0, 2] and [row for row, _ in skipped.skipped_rows] == [1]


def test_bad_kto_tag_rows_name_the_registry_columns(tmp_path):
    rows = [{"messages": user("Q") + assistant("A"), "good": "maybe"},
            {"messages": user("Q") + assistant("A") + user("again"), "good": True},
            {"messages": user("Q") + assistant("A"), "good": 1}]
    (tmp_path / "kto.json").write_text(json.dumps(rows), encoding="utf-8")
    write_registry(tmp_path, {"k": {"file_name": "kto.json", "formatting": "sharegpt",
                                    "columns": {"messages": "messages", "kto_tag": "good"},
                                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                             "assistant_tag": "assistant"}}})
    with pytest.raises(DataError, match="boolean label") as caught:
        load_preference_data("k", dataset_dir=str(tmp_path))
    assert (caught.value.row, caught.value.field) == (0, "good") and "dataset 'k'" in str(caught.value)
    skipped = load_preference_data("k", dataset_dir=str(tmp_path), on_bad_row="skip")
    assert skipped.dataset["row"] == [2] and skipped.dataset["label"] == [True]
    (_, label_reason), (_, turn_reason) = skipped.skipped_rows
    assert "field 'good'" in label_reason
    assert "field 'messages'" in turn_reason and "last turn to be the assistant completion" in turn_reason


@pytest.mark.parametrize(
    ("rows", "field", "expected"),
    [
        ([TEXT_MULTI[0], {"prompt": "Q", "completion": "a", "label": True}], "label",
         "row is unpaired (completion + label) but earlier rows are paired"),
        ([{"prompt": "Q", "completion": "a", "label": True}, TEXT_MULTI[0]], "chosen",
         "row is paired (chosen + rejected) but earlier rows are unpaired"),
    ],
    ids=["unpaired-after-paired", "paired-after-unpaired"],
)
def test_mixing_paired_and_unpaired_rows_names_the_first_odd_row(tmp_path, rows, field, expected):
    path = write_jsonl(tmp_path / "mixed.jsonl", rows + rows[1:])
    with pytest.raises(DataError, match=re.escape(expected)) as caught:
        load_preference_data(str(path))
    assert_names(caught.value, path, 1, field)
    skipped = load_preference_data(str(path), on_bad_row="warn")
    assert skipped.dataset["row"] == [0] and [row for row, _ in skipped.skipped_rows] == [1, 2]


def test_mixing_kinds_or_counts_across_sources_is_an_error(tmp_path):
    write_jsonl(tmp_path / "two.jsonl", TEXT_MULTI)
    write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q", "completion": "a", "label": True}])
    with pytest.raises(DataError, match="2 rejected responses per prompt .*two.jsonl.* and data with 1 .*one.jsonl"):
        load_preference_data("two.jsonl,one.jsonl", dataset_dir=str(tmp_path))
    with pytest.raises(DataError, match="cannot mix paired data .*one.jsonl.* with unpaired data .*kto.jsonl"):
        load_preference_data("one.jsonl,kto.jsonl", dataset_dir=str(tmp_path))


# ---------------------------------------------------------------- tokenizing several rejected responses

# GPT-2, one token per word; with EOS: prompt 4, chosen 4, rejected 2 and 5 tokens.
PROMPT, CHOSEN, REJECTED = "one two three four", " five six seven", [" eight", " nine ten eleven twelve"]


def multi(row=0):
    return {"prompt": PROMPT, "chosen": CHOSEN, "rejected": list(REJECTED), "row": row}


def test_each_rejected_response_tokenizes_like_its_own_pair_under_a_shared_prompt(gpt2):
    settings = TokenizeSettings(max_length=None)
    out = tokenize_pair(multi(), gpt2, settings)
    assert len(out["rejected_ids"]) == 2
    for response, rejected_ids in zip(REJECTED, out["rejected_ids"]):
        alone = tokenize_pair({"prompt": PROMPT, "chosen": CHOSEN, "rejected": response, "row": 0}, gpt2, settings)
        assert (out["prompt_ids"], out["chosen_ids"], rejected_ids) == (
            alone["prompt_ids"], alone["chosen_ids"], alone["rejected_ids"])
    assert out["rejected_ids"][1] == ids(gpt2, " nine ten eleven twelve" + GPT2_EOS)
    assert not (out["truncated"] or out["no_room"] or out["prefix_mismatch"])


def test_conversational_rejected_responses_tokenize_like_their_own_pairs(gpt2):
    settings = TokenizeSettings(chat_template=get_template("chatml"))
    rejected = [assistant("Green."), assistant("No idea at all.")]
    out = tokenize_pair({"prompt": user("Sky?"), "chosen": assistant("Blue."), "rejected": rejected, "row": 0},
                        gpt2, settings)
    for response, rejected_ids in zip(rejected, out["rejected_ids"]):
        alone = tokenize_pair({"prompt": user("Sky?"), "chosen": assistant("Blue."), "rejected": response},
                              gpt2, settings)
        assert (out["prompt_ids"], out["chosen_ids"], rejected_ids) == (
            alone["prompt_ids"], alone["chosen_ids"], alone["rejected_ids"])
    assert gpt2.decode(out["rejected_ids"][1]) == "No idea at all.<|im_end|>\n"


def test_keep_start_cuts_every_completion_to_the_room_after_the_prompt(gpt2):
    out = tokenize_pair(multi(), gpt2, TokenizeSettings(max_length=6, truncation_mode="keep_start"))
    assert out["prompt_ids"] == ids(gpt2, PROMPT)
    assert out["chosen_ids"] == ids(gpt2, " five six")
    assert out["rejected_ids"] == [ids(gpt2, " eight" + GPT2_EOS), ids(gpt2, " nine ten")]
    assert out["truncated"] and not out["no_room"]


def test_keep_end_cuts_the_prompt_by_what_the_longest_completion_needs(gpt2):
    out = tokenize_pair(multi(), gpt2, TokenizeSettings(max_length=7, truncation_mode="keep_end"))
    # cut = 4 + max(4, 2, 5) - 7 = 2 prompt tokens
    assert out["prompt_ids"] == ids(gpt2, " three four")
    assert out["chosen_ids"] == ids(gpt2, CHOSEN + GPT2_EOS)
    assert out["rejected_ids"] == [ids(gpt2, " eight" + GPT2_EOS), ids(gpt2, " nine ten eleven twelve" + GPT2_EOS)]
    assert out["truncated"]
    # the longest rejected response alone fills max_length: no room for a prompt token
    dropped = tokenize_pair(multi(), gpt2, TokenizeSettings(max_length=5, truncation_mode="keep_end"))
    assert dropped["no_room"] and dropped["prompt_ids"] == [] and dropped["rejected_ids"] == [[], []]


def test_tokenize_dataset_with_several_rejected_responses(gpt2):
    dataset = datasets.Dataset.from_list([multi(row=10), {"prompt": "a b c d e f g", "chosen": " x",
                                                          "rejected": [" y", " z"], "row": 11}, multi(row=12)])
    result = tokenize_dataset(dataset, gpt2, TokenizeSettings(max_length=7, truncation_mode="keep_start"))
    assert (result.kind, result.num_negatives) == ("paired", 2)
    assert result.dataset.column_names == OUTPUT_COLUMNS
    assert result.dataset["row"][:] == [10, 12] and result.stats.dropped_no_room == [11]
    assert result.dataset[0]["rejected_ids"] == [ids(gpt2, " eight" + GPT2_EOS), ids(gpt2, " nine ten eleven")]
    assert result.stats.truncated == 2
    classic = tokenize_dataset(datasets.Dataset.from_list([{"prompt": "Q", "chosen": " a", "rejected": [" b"]}]),
                               gpt2, TokenizeSettings())
    assert classic.num_negatives == 1 and classic.dataset[0]["rejected_ids"] == ids(gpt2, " b" + GPT2_EOS)


def test_tokenize_dataset_refuses_a_row_with_another_number_of_rejected_responses(gpt2):
    dataset = datasets.Dataset.from_list([multi(row=0), dict(multi(row=1), rejected=[" a", " b", " c"])])
    with pytest.raises(DataError, match="3 rejected responses but the first row has 2") as caught:
        tokenize_dataset(dataset, gpt2, TokenizeSettings())
    assert (caught.value.row, caught.value.field) == (1, "rejected")


# ---------------------------------------------------------------- tokenizing unpaired rows


def test_unpaired_completion_tokenizes_like_the_chosen_side_of_a_pair(gpt2):
    settings = TokenizeSettings(max_length=None)
    out = tokenize_unpaired({"prompt": PROMPT, "completion": CHOSEN, "label": False, "row": 3}, gpt2, settings)
    pair = tokenize_pair({"prompt": PROMPT, "chosen": CHOSEN, "rejected": " x", "row": 3}, gpt2, settings)
    assert (out["prompt_ids"], out["completion_ids"]) == (pair["prompt_ids"], pair["chosen_ids"])
    assert out["label"] is False and not out["no_room"]
    chat = TokenizeSettings(chat_template=get_template("chatml"))
    conv = tokenize_unpaired({"prompt": user("Sky?"), "completion": assistant("Blue."), "label": True}, gpt2, chat)
    conv_pair = tokenize_pair({"prompt": user("Sky?"), "chosen": assistant("Blue."), "rejected": assistant("x")},
                              gpt2, chat)
    assert (conv["prompt_ids"], conv["completion_ids"]) == (conv_pair["prompt_ids"], conv_pair["chosen_ids"])
    with pytest.raises(DataError) as caught:
        tokenize_unpaired({"prompt": "Q", "completion": "a", "label": "true", "row": 4}, gpt2, settings)
    assert (caught.value.row, caught.value.field) == (4, "label")


def test_unpaired_truncation_follows_the_pair_rules(gpt2):
    example = {"prompt": PROMPT, "completion": REJECTED[1], "label": True, "row": 0}
    start = tokenize_unpaired(example, gpt2, TokenizeSettings(max_length=6, truncation_mode="keep_start"))
    assert start["completion_ids"] == ids(gpt2, " nine ten") and start["truncated"]
    end = tokenize_unpaired(example, gpt2, TokenizeSettings(max_length=7, truncation_mode="keep_end"))
    assert end["prompt_ids"] == ids(gpt2, " three four") and end["truncated"]
    assert tokenize_unpaired(example, gpt2, TokenizeSettings(max_length=5, truncation_mode="keep_end"))["no_room"]


def test_tokenize_dataset_with_unpaired_rows(gpt2):
    rows = [{"prompt": PROMPT, "completion": CHOSEN, "label": True, "row": 7},
            {"prompt": "a b c d e f g", "completion": " x", "label": False, "row": 8},
            {"prompt": "Hi", "completion": " there", "label": False, "row": 9}]
    result = tokenize_dataset(datasets.Dataset.from_list(rows), gpt2, TokenizeSettings(max_length=6))
    assert (result.kind, result.num_negatives) == ("unpaired", 1)
    assert result.dataset.column_names == UNPAIRED_OUTPUT_COLUMNS
    assert result.dataset["row"][:] == [7, 9] and result.dataset["label"][:] == [True, False]
    assert result.dataset[1]["completion_ids"] == ids(gpt2, " there" + GPT2_EOS)
    assert (result.stats.rows_in, result.stats.rows_out, result.stats.dropped_no_room) == (3, 2, [8])
    assert result.stats.truncated == 1


# ---------------------------------------------------------------- cache


def cache_file(result) -> str:
    files = result.dataset.cache_files
    assert len(files) == 1
    return files[0]["filename"]


def test_cache_hits_for_each_kind_and_misses_across_kinds_and_versions(gpt2, tmp_path, monkeypatch):
    settings = TokenizeSettings(max_length=6)
    make = {
        "pair": lambda: datasets.Dataset.from_list([{"prompt": PROMPT, "chosen": CHOSEN, "rejected": " eight"}]),
        "multi": lambda: datasets.Dataset.from_list([multi()]),
        "unpaired": lambda: datasets.Dataset.from_list([{"prompt": PROMPT, "completion": CHOSEN, "label": True}]),
    }
    paths = {}
    for name, build in make.items():
        first = tokenize_dataset(build(), gpt2, settings, cache_dir=str(tmp_path))
        paths[name] = cache_file(first)
        written_at = os.stat(paths[name]).st_mtime_ns
        again = tokenize_dataset(build(), gpt2, settings, cache_dir=str(tmp_path))
        assert cache_file(again) == paths[name] and os.stat(paths[name]).st_mtime_ns == written_at, name
        assert again.dataset[:] == first.dataset[:] and (again.kind, again.num_negatives) == (
            first.kind, first.num_negatives), name
    assert len(set(paths.values())) == 3
    assert tokenize_dataset(make["multi"](), gpt2, settings, cache_dir=str(tmp_path)).dataset[0]["rejected_ids"] == [
        ids(gpt2, " eight" + GPT2_EOS), ids(gpt2, " nine ten")]

    before = tokenization_fingerprint(make["multi"](), gpt2, settings)
    monkeypatch.setattr(tokenize_module, "TOKENIZE_VERSION", tokenize_module.TOKENIZE_VERSION + 1)
    assert tokenization_fingerprint(make["multi"](), gpt2, settings) != before
    newer = tokenize_dataset(make["multi"](), gpt2, settings, cache_dir=str(tmp_path))
    assert cache_file(newer) not in paths.values()


# ---------------------------------------------------------------- pipeline


def config(**overrides):
    values = dict(dataset_dir=None, max_samples=None, on_bad_row="error", val_size=0, seed=0, overwrite_cache=True,
                  max_length=64, truncation_mode="keep_start", template="chatml", per_device_train_batch_size=8,
                  per_device_eval_batch_size=8, enable_thinking=True)
    return SimpleNamespace(**{**values, **overrides})


def test_prepare_data_carries_the_number_of_rejected_responses(gpt2):
    prepared = prepare_data(config(), gpt2, [multi(row=i) for i in range(4)], TEXT_MULTI)
    assert (prepared.kind, prepared.num_negatives) == ("paired", 2)
    assert prepared.eval.num_negatives == 2
    for split, rows in (("train", 4), ("eval", 2)):
        report = prepared.report[split]
        assert (report["kind"], report["num_negatives"], report["pairs_used"]) == ("paired", 2, rows)
        assert "desirable" not in report and report["rows_read"] == rows


def test_prepare_data_reports_desirable_and_undesirable_counts(gpt2, llamafactory_dir):
    prepared = prepare_data(config(dataset_dir=str(llamafactory_dir), max_length=None, val_size=0.1), gpt2,
                            "kto_en_demo")
    assert (prepared.kind, prepared.num_negatives) == ("unpaired", 1)
    assert prepared.train.kind == prepared.eval.kind == "unpaired"
    train, evaluation = prepared.report["train"], prepared.report["eval"]
    assert (train["pairs_used"], evaluation["pairs_used"]) == (270, 30)
    assert train["desirable"] + evaluation["desirable"] == 150
    assert train["undesirable"] + evaluation["undesirable"] == 150
    assert train["desirable"] == sum(prepared.train.dataset["label"])
    assert train["kind"] == "unpaired" and train["num_negatives"] == 1
    completions = prepared.train.dataset["completion_ids"]  # KL completions: rotated by one in groups of 8 rows
    assert prepared.train.dataset["kl_completion_ids"][:9] == [completions[7], *completions[:7], completions[15]]


@pytest.mark.parametrize(
    ("eval_rows", "expected"),
    [
        ([{"prompt": "Q", "chosen": "a", "rejected": "b"}], "paired with 1 rejected response per prompt"),
        ([{"prompt": "Q", "completion": "a", "label": True}], "unpaired"),
    ],
    ids=["other-count", "other-kind"],
)
def test_eval_data_of_another_kind_or_count_is_a_config_error(gpt2, eval_rows, expected):
    with pytest.raises(ConfigError) as caught:
        prepare_data(config(), gpt2, TEXT_MULTI, eval_rows)
    assert caught.value.key == "eval_dataset"
    message = str(caught.value)
    assert f"eval data (in-memory list) is {expected}" in message
    assert "train data (in-memory list) is paired with 2 rejected responses per prompt" in message
