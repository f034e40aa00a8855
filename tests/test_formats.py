"""Dataset readers: every supported format becomes TRL's explicit-prompt preference form, plus a "row" column."""

from __future__ import annotations

import gzip
import json
import logging

import datasets
import pytest
from conftest import shared_asset

from preftune.data.formats import LoadedData, canonicalize_records, load_preference_data
from preftune.errors import ConfigError, DataError

HH_MARKER = "\n\nAssistant:"
CANONICAL_COLUMNS = {"prompt", "chosen", "rejected", "row"}

TEXT_ROWS = [
    {"prompt": "What color is the sky?", "chosen": " Blue.", "rejected": " Green.", "score": 3},
    {"prompt": "Where is the sun?", "chosen": " In the sky.", "rejected": " In the sea.", "score": 1},
]
CHAT_ROWS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky color?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Where is the sun?"},
        ],
        "chosen": [{"role": "assistant", "content": "In the sky."}],
        "rejected": [{"role": "assistant", "content": "In the sea."}],
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def canonical(row):
    return {key: row[key] for key in ("prompt", "chosen", "rejected")}


def rows_of(loaded: LoadedData):
    return [canonical(row) for row in loaded.dataset]


@pytest.fixture
def llamafactory_dir():
    return shared_asset("llamafactory")


# ---------------------------------------------------------------- LLaMA-Factory registry (shared demo files)


def expected_from_sharegpt(raw):
    """The canonical form of a sharegpt ranking row, written out naively."""
    tags = {"system": "system", "human": "user", "gpt": "assistant"}
    prompt = [{"role": tags[turn["from"]], "content": turn["value"]} for turn in raw["conversations"]]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": raw["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": raw["rejected"]["value"]}],
    }


@pytest.mark.parametrize("name", ["dpo_en_demo", "dpo_zh_demo"])
def test_registered_dpo_demo_loads_every_row_as_a_conversation(llamafactory_dir, name):
    raw = json.loads((llamafactory_dir / f"{name}.json").read_text(encoding="utf-8"))
    loaded = load_preference_data(name, dataset_dir=str(llamafactory_dir))
    assert len(loaded.dataset) == 300 and loaded.is_conversational
    assert set(loaded.dataset.column_names) == CANONICAL_COLUMNS
    assert loaded.dataset["row"] == list(range(300))
    assert loaded.skipped_rows == []
    assert rows_of(loaded) == [expected_from_sharegpt(row) for row in raw]
    assert f"{name}.json" in loaded.source


def test_registered_system_prompt_is_the_first_message(llamafactory_dir):
    raw = json.loads((llamafactory_dir / "dpo_en_demo.json").read_text(encoding="utf-8"))
    loaded = load_preference_data("dpo_en_demo", dataset_dir=str(llamafactory_dir))
    with_system = [i for i, row in enumerate(raw) if row["conversations"][0]["from"] == "system"]
    assert len(with_system) == 80  # per shared/assets/llamafactory/PROVENANCE.md
    row = loaded.dataset[with_system[0]]["prompt"]
    assert row[0] == {"role": "system", "content": raw[with_system[0]]["conversations"][0]["value"]}
    assert [m["role"] for m in row] == ["system", "user"]
    assert all(m["role"] != "system" for i in with_system for m in loaded.dataset[i]["prompt"][1:])


def test_registered_multi_turn_history_is_kept_in_order(llamafactory_dir):
    raw = json.loads((llamafactory_dir / "dpo_en_demo.json").read_text(encoding="utf-8"))
    longest = max(range(len(raw)), key=lambda i: len(raw[i]["conversations"]))
    prompt = load_preference_data("dpo_en_demo", dataset_dir=str(llamafactory_dir)).dataset[longest]["prompt"]
    assert len(prompt) == 13
    assert [m["role"] for m in prompt] == ["user", "assistant"] * 6 + ["user"]
    assert [m["content"] for m in prompt] == [turn["value"] for turn in raw[longest]["conversations"]]


def test_sharegpt_file_given_by_path_reads_like_its_registry_entry(llamafactory_dir):
    by_path = load_preference_data(str(llamafactory_dir / "dpo_zh_demo.json"))
    by_name = load_preference_data("dpo_zh_demo", dataset_dir=str(llamafactory_dir))
    assert rows_of(by_path) == rows_of(by_name)


def test_kto_dataset_name_loads_as_unpaired_data(llamafactory_dir):
    loaded = load_preference_data("kto_en_demo", dataset_dir=str(llamafactory_dir))
    assert loaded.kind == "unpaired" and loaded.is_conversational and len(loaded.dataset) == 300
    assert set(loaded.dataset.column_names) == {"prompt", "completion", "label", "row"}


def test_registry_entry_with_both_ranking_and_kto_tag_is_refused(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(TEXT_ROWS), encoding="utf-8")
    registry = {"both": {"file_name": "rows.json", "ranking": True, "columns": {"kto_tag": "label"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    with pytest.raises(DataError, match="sets both") as caught:
        load_preference_data("both", dataset_dir=str(tmp_path))
    assert "dataset 'both'" in str(caught.value) and "dataset_info.json" in str(caught.value)


def test_sft_dataset_name_is_refused_as_not_a_ranking_dataset(llamafactory_dir):
    with pytest.raises(DataError, match="not a preference \\(ranking\\) dataset") as caught:
        load_preference_data("alpaca_en_demo", dataset_dir=str(llamafactory_dir))
    assert "alpaca_en_demo" in str(caught.value)


def test_unknown_dataset_name_says_where_it_looked(llamafactory_dir):
    with pytest.raises(DataError) as caught:
        load_preference_data("no_such_dataset", dataset_dir=str(llamafactory_dir))
    message = str(caught.value)
    assert "no_such_dataset" in message
    assert "neither a local file" in message and "registered" in message and "hub" in message
    assert str(llamafactory_dir / "dataset_info.json") in message


def test_custom_registry_alpaca_ranking_builds_system_history_and_joined_input(tmp_path):
    rows = [{
        "instruction": "Translate",
        "input": "bonjour",
        "sys": "You translate.",
        "hist": [["Hi", "Hello!"]],
        "better": "hello",
        "worse": "goodbye",
    }]
    (tmp_path / "pairs.json").write_text(json.dumps(rows), encoding="utf-8")
    registry = {"my_pairs": {"file_name": "pairs.json", "ranking": True, "columns": {
        "prompt": "instruction", "query": "input", "system": "sys", "history": "hist",
        "chosen": "better", "rejected": "worse"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    loaded = load_preference_data("my_pairs", dataset_dir=str(tmp_path))
    assert rows_of(loaded) == [{
        "prompt": [
            {"role": "system", "content": "You translate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Translate\nbonjour"},
        ],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "goodbye"}],
    }]


def test_custom_registry_sharegpt_with_role_content_tags_and_system_column(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Q"}], "system": "S",
             "chosen": {"role": "assistant", "content": "good"}, "rejected": {"role": "assistant", "content": "bad"}}]
    (tmp_path / "pairs.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    registry = {"chat_pairs": {"file_name": "pairs.jsonl", "ranking": True, "formatting": "sharegpt",
                               "columns": {"messages": "messages", "system": "system", "chosen": "chosen",
                                           "rejected": "rejected"},
                               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                        "assistant_tag": "assistant"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    loaded = load_preference_data("chat_pairs", dataset_dir=str(tmp_path))
    assert rows_of(loaded)[0]["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]


def test_sharegpt_row_ending_on_assistant_turn_names_the_messages_column(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
             "chosen": {"from": "gpt", "value": "x"}, "rejected": {"from": "gpt", "value": "y"}}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match="user turn") as caught:
        load_preference_data(str(path))
    assert (caught.value.row, caught.value.field) == (0, "conversations")
    assert str(path) in str(caught.value)


# ---------------------------------------------------------------- Anthropic HH (implicit prompt, text form)


def hh_rows():
    path = shared_asset("hh-rlhf-test/helpful-base-test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return path, [json.loads(line) for line in handle]


def test_hh_prompt_is_the_dialogue_up_to_the_last_shared_assistant_marker():
    path, raw = hh_rows()
    loaded = load_preference_data(str(path), on_bad_row="skip")
    assert not loaded.is_conversational
    # Four rows have an empty rejected reply (the dialogue ends on "Assistant: "): skipped as bad rows.
    empty_reply = [i for i, row in enumerate(raw) if not row["rejected"].rsplit(HH_MARKER, 1)[1].strip()]
    assert [row for row, _ in loaded.skipped_rows] == empty_reply == [120, 740, 1214, 2063]
    assert len(loaded.dataset) == 2354 - 4
    for example in loaded.dataset:
        source = raw[example["row"]]
        assert example["prompt"].startswith("\n\nHuman:") and example["prompt"].endswith(HH_MARKER)
        assert example["prompt"] + example["chosen"] == source["chosen"]
        assert example["prompt"] + example["rejected"] == source["rejected"]
        assert "\n\nHuman:" not in example["chosen"] and "\n\nHuman:" not in example["rejected"]


def test_hh_first_row_matches_a_hand_split():
    path, _ = hh_rows()
    first = load_preference_data(str(path), max_samples=1).dataset[0]
    assert first["prompt"] == ("\n\nHuman: Do you know why turkeys became the official food of thanksgiving?"
                               "\n\nAssistant:")
    assert first["chosen"].startswith(" To be honest, I don’t know anything about that.")
    assert first["rejected"].startswith(" I know that the American Indians were the first")
    assert HH_MARKER not in first["chosen"] and HH_MARKER not in first["rejected"]


def test_hh_reply_that_itself_contains_the_marker_stays_in_the_response():
    # Row 1166: the chosen reply is "Umm. Just a second...\n\nAssistant: A solar panel ..." - one model turn.
    path, raw = hh_rows()
    loaded = load_preference_data(str(path), on_bad_row="skip")
    example = next(row for row in loaded.dataset if row["row"] == 1166)
    assert example["prompt"] == "\n\nHuman: How much do solar panels cost?\n\nAssistant:"
    assert example["chosen"] == raw[1166]["chosen"][len(example["prompt"]):]
    assert example["chosen"].startswith(" Umm. Just a second...\n\nAssistant: A solar panel")


def test_hh_empty_reply_is_an_error_by_default():
    path, _ = hh_rows()
    with pytest.raises(DataError) as caught:
        load_preference_data(str(path))
    assert (caught.value.row, caught.value.field) == (120, "rejected")
    assert str(path) in str(caught.value) and "row 120" in str(caught.value)


# ---------------------------------------------------------------- TRL formats from files of every kind


def test_standard_explicit_reads_the_same_from_every_file_type(tmp_path):
    expected = [canonical(row) for row in TEXT_ROWS]
    write_jsonl(tmp_path / "d.jsonl", TEXT_ROWS)
    (tmp_path / "d.json").write_text(json.dumps(TEXT_ROWS), encoding="utf-8")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in TEXT_ROWS)
    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as handle:
        json.dump(TEXT_ROWS, handle)
    table = datasets.Dataset.from_list(TEXT_ROWS)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.DatasetDict({"train": table, "test": table.select([1])}).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.json", "d.jsonl.gz", "d.json.gz", "d.parquet", "d.csv", "saved"):
        loaded = load_preference_data(str(tmp_path / name))
        assert rows_of(loaded) == expected, name
        assert set(loaded.dataset.column_names) == CANONICAL_COLUMNS, name
        assert loaded.dataset["row"] == [0, 1] and not loaded.is_conversational, name
    test_split = load_preference_data(str(tmp_path / "saved"), split="test")
    assert rows_of(test_split) == expected[1:]


def test_saved_dataset_dict_without_the_split_lists_the_available_ones(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT_ROWS)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="split 'validation' not found; available splits: train"):
        load_preference_data(str(tmp_path / "saved"), split="validation")


def test_standard_implicit_prompt_splits_at_a_word_boundary_like_trl():
    from trl.data_utils import extract_prompt

    at_boundary = {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: red"}
    loaded = canonicalize_records([at_boundary], source="mem")
    assert rows_of(loaded) == [extract_prompt(at_boundary)]
    # TRL would cut inside the shared letter ("A: f" / "our"); we back off to the space before the word.
    mid_word = {"chosen": "Q: 2+2? A: four", "rejected": "Q: 2+2? A: five"}
    assert rows_of(canonicalize_records([mid_word], source="mem")) == [
        {"prompt": "Q: 2+2? A:", "chosen": " four", "rejected": " five"}]


def test_conversational_explicit_keeps_messages_and_drops_extra_keys(tmp_path):
    rows = [dict(row, prompt=[dict(m, name="x") for m in row["prompt"]]) for row in CHAT_ROWS]
    loaded = load_preference_data(str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert loaded.is_conversational
    assert rows_of(loaded) == [canonical(row) for row in CHAT_ROWS]


def test_conversational_implicit_prompt_matches_trl_extract_prompt():
    from trl.data_utils import extract_prompt

    implicit = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
                for row in CHAT_ROWS]
    loaded = canonicalize_records(implicit, source="mem")
    assert rows_of(loaded) == [extract_prompt(row) for row in implicit] == [canonical(r) for r in CHAT_ROWS]


def test_list_of_dicts_and_in_memory_dataset_are_sources():
    assert rows_of(load_preference_data(TEXT_ROWS)) == [canonical(row) for row in TEXT_ROWS]
    assert rows_of(load_preference_data(datasets.Dataset.from_list(CHAT_ROWS))) == [canonical(r) for r in CHAT_ROWS]


def test_comma_separated_sources_concatenate_in_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", TEXT_ROWS)
    write_jsonl(tmp_path / "b.jsonl", TEXT_ROWS[:1])
    loaded = load_preference_data("a.jsonl, b.jsonl", dataset_dir=str(tmp_path))
    assert rows_of(loaded) == [canonical(row) for row in TEXT_ROWS + TEXT_ROWS[:1]]
    assert loaded.dataset["row"] == [0, 1, 0]
    assert "a.jsonl" in loaded.source and "b.jsonl" in loaded.source
    assert len(load_preference_data("a.jsonl,b.jsonl", dataset_dir=str(tmp_path), max_samples=3).dataset) == 3


def test_mixing_text_and_conversational_sources_is_an_error(tmp_path):
    write_jsonl(tmp_path / "text.jsonl", TEXT_ROWS)
    write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    with pytest.raises(DataError, match="cannot mix text-form data") as caught:
        load_preference_data("text.jsonl,chat.jsonl", dataset_dir=str(tmp_path))
    assert "text.jsonl" in str(caught.value) and "chat.jsonl" in str(caught.value)


def test_mixing_forms_within_one_file_names_the_first_odd_row(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", TEXT_ROWS + CHAT_ROWS)
    with pytest.raises(DataError, match="conversational form") as caught:
        load_preference_data(str(path))
    assert caught.value.row == 2


def test_relative_paths_resolve_against_dataset_dir_then_cwd(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "pairs.jsonl", TEXT_ROWS)
    write_jsonl(tmp_path / "pairs.jsonl", TEXT_ROWS[:1])
    monkeypatch.chdir(tmp_path)
    assert len(load_preference_data("pairs.jsonl", dataset_dir=str(tmp_path / "data")).dataset) == 2
    assert len(load_preference_data("pairs.jsonl").dataset) == 1
    assert len(load_preference_data("pairs.jsonl", dataset_dir=str(tmp_path / "elsewhere")).dataset) == 1


def test_max_samples_keeps_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", TEXT_ROWS * 3)
    loaded = load_preference_data(str(path), max_samples=4)
    assert loaded.dataset["row"] == [0, 1, 2, 3]


# ---------------------------------------------------------------- bad input


def test_missing_file_names_the_path_and_the_places_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as caught:
        load_preference_data("missing.jsonl", dataset_dir=str(tmp_path / "data"))
    message = str(caught.value)
    assert "missing.jsonl" in message and "not found" in message
    assert str(tmp_path / "data" / "missing.jsonl") in message and str(tmp_path / "missing.jsonl") in message


def test_malformed_jsonl_line_names_file_and_row(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(TEXT_ROWS[0]) + "\n{not json\n" + json.dumps(TEXT_ROWS[1]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_preference_data(str(path))
    assert caught.value.file == str(path) and caught.value.row == 1
    assert "line 2" in str(caught.value) and str(path) in str(caught.value)
    skipped = load_preference_data(str(path), on_bad_row="skip")
    assert skipped.dataset["row"] == [0, 2] and [row for row, _ in skipped.skipped_rows] == [1]


def test_json_object_instead_of_a_list_is_a_clear_error(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"train": TEXT_ROWS}), encoding="utf-8")
    with pytest.raises(DataError, match="top level is a JSON object with keys train; expected a JSON list"):
        load_preference_data(str(path))


@pytest.mark.parametrize(
    ("bad_row", "field", "expected"),
    [
        ({"prompt": "Q", "rejected": "no"}, "chosen", "missing"),
        ({"prompt": "Q", "chosen": 42, "rejected": "no"}, "chosen", "expected a string"),
        ({"prompt": "Q", "chosen": "yes", "rejected": "  \n"}, "rejected", "empty"),
        ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": ["x"]}],
          "rejected": "no"}, "chosen", "content is a message list; expected a string"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chosen": "x",
          "rejected": "y"}, "prompt", "expected 'assistant'"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "x",
          "rejected": "y"}, "prompt", "does not end on a user turn"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "chosen": "x",
          "rejected": "y"}, "prompt", "expected 'assistant'"),
    ],
    ids=["missing-chosen", "non-string-completion", "empty-response", "non-string-content", "two-user-turns",
         "prompt-ends-on-assistant", "late-system-turn"],
)
def test_bad_row_is_a_data_error_naming_file_row_and_field(tmp_path, bad_row, field, expected):
    path = write_jsonl(tmp_path / "rows.jsonl", [TEXT_ROWS[0] if isinstance(bad_row["prompt"], str) else CHAT_ROWS[0],
                                                 bad_row])
    with pytest.raises(DataError, match=expected) as caught:
        load_preference_data(str(path))
    assert (caught.value.file, caught.value.row, caught.value.field) == (str(path), 1, field)
    assert f"file {path}, row 1, field '{field}'" in str(caught.value)


def test_skip_and_warn_drop_bad_rows_and_count_them(tmp_path, caplog):
    rows = [TEXT_ROWS[0], {"prompt": "Q"}, TEXT_ROWS[1], {"prompt": "Q", "chosen": "", "rejected": "x"}, TEXT_ROWS[0]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="preftune.data.formats"):
        skipped = load_preference_data(str(path), on_bad_row="skip")
    assert skipped.dataset["row"] == [0, 2, 4]
    assert [row for row, _ in skipped.skipped_rows] == [1, 3]
    assert "field 'chosen'" in skipped.skipped_rows[0][1] and str(path) in skipped.skipped_rows[0][1]
    assert not [r for r in caplog.records if "skipping bad row" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="preftune.data.formats"):
        warned = load_preference_data(str(path), on_bad_row="warn")
    assert [row for row, _ in warned.skipped_rows] == [1, 3]
    assert len([r for r in caplog.records if "skipping bad row" in r.getMessage()]) == 2


def test_no_usable_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Q"}, {"chosen": "x"}])
    with pytest.raises(DataError, match="no usable rows \\(all 2 rows were skipped") as caught:
        load_preference_data(str(path), on_bad_row="skip")
    assert str(path) in str(caught.value)


def test_implicit_texts_without_a_shared_prompt_cannot_be_split():
    with pytest.raises(DataError, match="no prompt can be extracted") as caught:
        canonicalize_records([{"chosen": "yes", "rejected": "no"}], source="mem")
    assert (caught.value.file, caught.value.row, caught.value.field) == ("mem", 0, "prompt")


def test_unknown_on_bad_row_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="on_bad_row"):
        load_preference_data(TEXT_ROWS, on_bad_row="ignore")


def test_csv_cells_stay_text_even_when_they_look_like_numbers(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text('prompt,chosen,rejected\n"2+2=",4,"five\nor six"\n', encoding="utf-8")
    assert rows_of(load_preference_data(str(path))) == [{"prompt": "2+2=", "chosen": "4", "rejected": "five\nor six"}]


def test_a_file_name_too_long_for_the_os_is_a_data_error_not_an_os_error(tmp_path):
    """Found by the fuzz test: Python 3.11's Path.exists() raises ENAMETOOLONG instead of answering False."""
    long_name = "x" * 5000 + ".jsonl"
    (tmp_path / "dataset_info.json").write_text(json.dumps({"fuzzed": {"file_name": long_name, "ranking": True}}))
    with pytest.raises(DataError, match="dataset 'fuzzed': file not found"):
        load_preference_data("fuzzed", dataset_dir=str(tmp_path))
    with pytest.raises(DataError):
        load_preference_data(str(tmp_path / long_name))
