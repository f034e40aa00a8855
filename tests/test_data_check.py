"""`preftune data check`: the rules on crafted rows, the report (table and JSON), --fix, exit codes, the cheap checks
at training start (on_bad_row error/skip/warn) and the real LLaMA-Factory demo files."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import datasets
import pytest
from conftest import shared_asset
from transformers import AutoTokenizer

from preftune.cli import main
from preftune.data.formats import load_preference_data
from preftune.data.pipeline import prepare_data
from preftune.data.validate import CHEAP_RULES, RULES, CheckSettings, check_data, find_problems, write_clean
from preftune.errors import DataError


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def text_row(prompt="What color is the sky?", chosen=" Blue, on a clear day.", rejected=" Green, always and forever."):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def chat_row(prompt=None, chosen="Blue, on a clear day.", rejected="Green, always and forever."):
    return {"prompt": prompt or [user("What color is the sky?")], "chosen": [assistant(chosen)],
            "rejected": [assistant(rejected)]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def rules_of(checked):
    return {rule.name: rule for rule in checked.report.rules}


def counts(checked):
    return {rule.name: rule.count for rule in checked.report.rules if rule.count}


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"))


# ---------------------------------------------------------------- rules on crafted rows


def test_text_rows_each_rule(tmp_path):
    rows = [
        text_row(),                                                       # 0 fine
        text_row(prompt="Say hi", chosen=" Hello!", rejected=" Hello!"),  # 1 identical
        text_row(prompt="Fruit?", chosen=" An apple, of course.", rejected=" An apple, of course!"),  # 2 similar
        text_row(),                                                       # 3 duplicate of 0
        text_row(prompt="2+2?", chosen=" 4", rejected=" five"),           # 4 short only with min_chars=2
        {"prompt": "x", "chosen": 42, "rejected": " no"},                 # 5 wrong type: refused by the reader
        text_row(prompt="Hi", chosen="   ", rejected=" Bye"),             # 6 empty: refused by the reader
    ]
    checked = check_data(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert counts(checked) == {"identical_pair": 1, "too_similar": 1, "duplicate": 1, "unreadable_row": 1,
                               "empty_or_short": 1}
    found = rules_of(checked)
    assert found["identical_pair"].examples == [1] and found["too_similar"].examples == [2]
    assert found["duplicate"].examples == [3] and found["unreadable_row"].examples == [5]
    assert "row 5" in found["unreadable_row"].details[0] and "chosen" in found["unreadable_row"].details[0]
    assert found["empty_or_short"].examples == [6]
    assert (checked.report.rows_read, checked.report.rows_ok) == (7, 2)

    strict = check_data(str(tmp_path / "d.jsonl"), settings=CheckSettings(min_chars=2, max_similarity=0.99))
    assert rules_of(strict)["empty_or_short"].examples == [4, 6]
    assert rules_of(strict)["too_similar"].count == 0


def test_similarity_threshold_uses_the_normalized_indel_ratio():
    # "abcd" vs "abce": 2 edits (1 deletion + 1 insertion) over 8 characters -> 0.75
    rows = [text_row(prompt="p", chosen="abcd", rejected="abce")]
    loaded = load_preference_data(rows)
    assert find_problems(loaded, CheckSettings(max_similarity=0.74))["too_similar"] == [0]
    assert find_problems(loaded, CheckSettings(max_similarity=0.75))["too_similar"] == []


def test_conversational_rows_turn_order_and_identical(tmp_path):
    rows = [
        chat_row(),
        chat_row(prompt=[user("Hi"), user("Hello?")]),                     # 1 two user turns: refused
        chat_row(prompt=[user("Hi"), assistant("Hello"), assistant("?")]),  # 2 ends on assistant: refused
        chat_row(prompt=[user("Same?")], chosen="Yes.", rejected="Yes."),   # 3 identical
        chat_row(prompt=[{"role": "system", "content": "Be brief."}, user("Sky?")]),  # 4 fine
    ]
    checked = check_data(str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert checked.loaded.is_conversational
    assert counts(checked) == {"turn_order": 2, "identical_pair": 1}
    assert rules_of(checked)["turn_order"].examples == [1, 2]
    assert all("row" in detail for detail in rules_of(checked)["turn_order"].details)


def test_turn_order_rule_on_rows_that_bypass_the_readers():
    loaded = load_preference_data([chat_row(), chat_row(prompt=[user("Other")])])
    loaded.dataset = datasets.Dataset.from_list([
        {**chat_row(), "row": 0},
        {**chat_row(prompt=[assistant("I speak first"), user("ok")]), "row": 1},
    ])
    assert find_problems(loaded)["turn_order"] == [1]


def test_several_negatives():
    rows = [
        {"prompt": "Q1", "chosen": " right answer", "rejected": [" wrong one", " right answer"]},  # identical
        {"prompt": "Q2", "chosen": " the answer is 12", "rejected": [" it is 7", " the answer is 13"]},  # similar
        {"prompt": "Q3", "chosen": " yes indeed", "rejected": [" no", " maybe later"]},
        {"prompt": "Q3", "chosen": " yes indeed", "rejected": [" no", " maybe later"]},  # duplicate
        {"prompt": "Q4", "chosen": " yes indeed", "rejected": [" maybe later", " no"]},  # other order: not a duplicate
    ]
    checked = check_data(rows)
    assert checked.loaded.num_negatives == 2
    assert counts(checked) == {"identical_pair": 1, "too_similar": 1, "duplicate": 1}
    assert [rules_of(checked)[name].examples for name in ("identical_pair", "too_similar", "duplicate")] == [
        [0], [1], [3]]


def test_unpaired_rows():
    rows = [
        {"prompt": "Q1", "completion": " good answer", "label": True},
        {"prompt": "Q1", "completion": " good answer", "label": True},   # duplicate
        {"prompt": "Q1", "completion": " good answer", "label": False},  # same text, other label: not a duplicate
        {"prompt": "Q2", "completion": " ok", "label": False},           # short with min_chars=3
        {"prompt": "Q3", "completion": " fine", "label": "perhaps"},     # bad label: refused
    ]
    checked = check_data(rows, settings=CheckSettings(min_chars=3))
    assert checked.loaded.kind == "unpaired"
    assert counts(checked) == {"duplicate": 1, "empty_or_short": 1, "unreadable_row": 1}
    assert rules_of(checked)["empty_or_short"].examples == [3]
    assert not rules_of(checked)["identical_pair"].count and not rules_of(checked)["too_similar"].count


def test_non_utf8_rows_are_reported_and_the_rest_read(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(text_row()).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n\n'
                     + json.dumps(text_row(prompt="Other")).encode() + b"\n{broken\n")
    with pytest.raises(DataError, match="UnicodeDecodeError"):
        load_preference_data(str(path), on_bad_row="skip")
    checked = check_data(str(path))
    assert counts(checked) == {"non_utf8": 1, "unreadable_row": 1}
    assert rules_of(checked)["non_utf8"].examples == [1]
    assert rules_of(checked)["unreadable_row"].examples == [4]  # line 3 is blank: not a row
    assert len(checked.loaded.dataset) == 2 and checked.report.rows_read == 4


def test_prompt_too_long_counts_templated_tokens(gpt2):
    rows = [text_row(prompt="one two three four five six seven eight nine ten"), text_row(prompt="short")]
    settings = CheckSettings(tokenizer=gpt2, max_length=5)
    assert find_problems(load_preference_data(rows), settings)["prompt_too_long"] == [0]
    chat = [chat_row(prompt=[user("hi")])]
    from preftune.data.templates import get_template

    # the chatml template adds role markers: 2 words become more than 5 tokens
    templated = CheckSettings(tokenizer=gpt2, max_length=5, chat_template=get_template("chatml"))
    assert find_problems(load_preference_data(chat), templated)["prompt_too_long"] == [0]
    assert find_problems(load_preference_data(chat), CheckSettings(tokenizer=gpt2, max_length=50,
                                                                   chat_template=get_template("chatml")))[
        "prompt_too_long"] == []
    unchecked = rules_of(check_data(rows))["prompt_too_long"]
    assert not unchecked.checked and unchecked.note


# ---------------------------------------------------------------- CLI: report, JSON, --fix, exit codes


def bad_rows_file(tmp_path):
    rows = [text_row(), text_row(prompt="Say hi", chosen=" Hello!", rejected=" Hello!"), text_row(),
            {"prompt": "x", "rejected": " no"}, text_row(prompt="Another", chosen=" Yes.", rejected=" No.")]
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_cli_json_report_shape(tmp_path, capsys):
    assert main(["data", "check", str(bad_rows_file(tmp_path)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["train"]
    train = report["train"]
    assert {"source", "kind", "num_negatives", "form", "rows_read", "rows_ok", "rows_with_problems",
            "rules"} <= set(train)
    assert (train["kind"], train["form"], train["rows_read"], train["rows_ok"]) == ("paired", "text", 5, 2)
    assert [rule["rule"] for rule in train["rules"]] == list(RULES)
    by_name = {rule["rule"]: rule for rule in train["rules"]}
    assert by_name["identical_pair"] == {"rule": "identical_pair", "count": 1, "examples": [1],
                                         "explanation": RULES["identical_pair"], "checked": True}
    assert by_name["duplicate"]["examples"] == [2]
    assert by_name["unreadable_row"]["count"] == 1 and "chosen" in by_name["unreadable_row"]["details"][0]
    assert by_name["prompt_too_long"]["checked"] is False


def test_cli_table_and_options(tmp_path, capsys):
    path = str(bad_rows_file(tmp_path))
    assert main(["data", "check", path, "--min-chars", "5", "--max-similarity", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "5 rows read" in out and "identical_pair" in out and "not checked" in out
    short_line = next(line for line in out.splitlines() if line.strip().startswith("empty_or_short"))
    assert short_line.split()[1] == "1"  # " Yes." has 4 characters
    assert main(["data", "check", path, "--max-length", "3", "--tokenizer", str(shared_asset("gpt2-tokenizer")),
                 "--json"]) == 0
    long_rule = next(r for r in json.loads(capsys.readouterr().out)["train"]["rules"] if r["rule"] == "prompt_too_long")
    assert long_rule["checked"] and long_rule["examples"] == [0, 2]  # "What color is the sky?": 6 tokens; "Another": 1


def test_cli_fix_writes_a_clean_set_that_reads_back(tmp_path, capsys):
    out_path = tmp_path / "clean.jsonl"
    assert main(["data", "check", str(bad_rows_file(tmp_path)), "--fix", str(out_path)]) == 0
    assert f"wrote 2 of 5 train rows to {out_path}" in capsys.readouterr().out
    reread = load_preference_data(str(out_path))
    assert [row["prompt"] for row in reread.dataset] == ["What color is the sky?", "Another"]
    assert all(rule.count == 0 for rule in check_data(str(out_path)).report.rules)


@pytest.mark.parametrize("rows", [
    [chat_row(), chat_row(), chat_row(prompt=[user("Other")])],
    [{"prompt": [user("Q")], "chosen": [assistant("A")], "rejected": [[assistant("B")], [assistant("C")]]}] * 2
    + [{"prompt": [user("R")], "chosen": [assistant("A")], "rejected": [[assistant("B")], [assistant("C")]]}],
    [{"prompt": "Q", "completion": " A", "label": True}] * 2 + [{"prompt": "Q", "completion": " B", "label": False}],
], ids=["conversational", "several-negatives", "unpaired"])
def test_fix_keeps_the_form_kind_and_negatives(tmp_path, rows):
    checked = check_data(rows)
    assert write_clean(checked, tmp_path / "clean.jsonl") == 2
    reread = load_preference_data(str(tmp_path / "clean.jsonl"))
    assert (reread.kind, reread.num_negatives, reread.is_conversational) == (
        checked.loaded.kind, checked.loaded.num_negatives, checked.loaded.is_conversational)
    assert len(reread.dataset) == 2 and rules_of(check_data(str(tmp_path / "clean.jsonl")))["duplicate"].count == 0


@pytest.mark.parametrize("make", [
    lambda tmp: str(tmp / "missing.jsonl"),
    lambda tmp: (tmp / "obj.json").write_text('{"a": 1}') and str(tmp / "obj.json"),
    lambda tmp: (tmp / "cfg.yaml").write_text("learning_rate: fast\ndataset: x.jsonl\n") and str(tmp / "cfg.yaml"),
], ids=["missing", "not-a-list", "bad-config"])
def test_cli_unreadable_input_exits_2_with_one_line(tmp_path, capsys, make):
    assert main(["data", "check", make(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preftune: error:")


def test_cli_checks_a_config_dataset_and_eval_dataset(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", [text_row(), text_row()])
    write_jsonl(tmp_path / "eval.jsonl", [text_row(prompt="E", chosen=" same", rejected=" same"), text_row()])
    config = tmp_path / "cfg.yaml"
    config.write_text(f"dataset: train.jsonl\neval_dataset: eval.jsonl\ndataset_dir: {tmp_path}\nmax_length: 4\n"
                      f"model_name_or_path: {tmp_path / 'no-model'}\n")
    fixed = tmp_path / "fixed.jsonl"
    assert main(["data", "check", str(config), "--json", "--fix", str(fixed)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert {split: report[split]["rows_with_problems"] for split in report} == {"train": 1, "eval": 1}
    long_rule = next(r for r in report["train"]["rules"] if r["rule"] == "prompt_too_long")
    assert not long_rule["checked"] and "did not load" in long_rule["note"]
    assert len(load_preference_data(str(fixed)).dataset) == 1
    assert len(load_preference_data(str(tmp_path / "fixed.eval.jsonl")).dataset) == 1
    assert "wrote 1 of 2 eval rows" in captured.err


# ---------------------------------------------------------------- training start: the cheap checks


def config(**overrides):
    values = dict(dataset_dir=None, max_samples=None, on_bad_row="error", val_size=0, seed=0, overwrite_cache=True,
                  max_length=64, truncation_mode="keep_start", template=None, enable_thinking=True)
    return SimpleNamespace(**{**values, **overrides})


TRAIN_ROWS = [text_row(), text_row(prompt="Say hi", chosen=" Hello!", rejected=" Hello!"), text_row(),
              text_row(prompt="Another", chosen=" Yes.", rejected=" No.")]


def test_training_start_error_names_file_row_and_check(tmp_path, gpt2):
    path = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    with pytest.raises(DataError) as caught:
        prepare_data(config(), gpt2, str(path))
    assert caught.value.file == str(path) and caught.value.row == 1
    assert "identical_pair" in str(caught.value) and "on_bad_row" in str(caught.value)


def test_training_start_skip_drops_and_counts(gpt2):
    prepared = prepare_data(config(on_bad_row="skip"), gpt2, TRAIN_ROWS)
    report = prepared.report["train"]
    assert report["pairs_used"] == 2 and report["rows_read"] == 4
    assert report["rows_failed_checks"] == 2
    assert report["failed_checks"] == {"identical_pair": 1, "duplicate": 1}
    assert report["failed_check_rows"] == [{"row": 1, "rule": "identical_pair"}, {"row": 2, "rule": "duplicate"}]
    assert sorted(prepared.train.dataset["row"]) == [0, 3]


def test_training_start_warn_keeps_and_logs(gpt2, caplog):
    with caplog.at_level(logging.WARNING, logger="preftune.data.pipeline"):
        prepared = prepare_data(config(on_bad_row="warn"), gpt2, TRAIN_ROWS)
    assert prepared.report["train"]["pairs_used"] == 4 and prepared.report["train"]["rows_failed_checks"] == 2
    assert any("2 rows fail the data checks" in record.getMessage() for record in caplog.records)


def test_training_start_checks_the_eval_data_too(gpt2):
    with pytest.raises(DataError, match="identical_pair") as caught:
        prepare_data(config(), gpt2, TRAIN_ROWS[3:], [text_row(), text_row(chosen=" A", rejected=" A")])
    assert caught.value.row == 1


def test_training_start_error_keeps_exact_duplicates_with_a_warning(gpt2, caplog):
    with caplog.at_level(logging.WARNING, logger="preftune.data.pipeline"):
        prepared = prepare_data(config(), gpt2, [text_row(), text_row(), TRAIN_ROWS[3]])
    assert prepared.report["train"]["pairs_used"] == 3
    assert prepared.report["train"]["failed_check_rows"] == [{"row": 1, "rule": "duplicate"}]
    assert any("duplicate: 1" in record.getMessage() for record in caplog.records)


def test_training_on_the_llamafactory_demo_with_duplicates_still_starts(gpt2):
    prepared = prepare_data(config(dataset_dir=str(shared_asset("llamafactory")), template="chatml", max_length=512),
                            gpt2, "dpo_en_demo")
    assert prepared.report["train"]["failed_checks"] == {"duplicate": 5}


def test_training_start_skip_with_every_row_failing_says_so(gpt2):
    with pytest.raises(DataError, match="all 2 rows fail the data checks"):
        prepare_data(config(on_bad_row="skip"), gpt2, [text_row(chosen=" same", rejected=" same")] * 2)


def test_cheap_checks_are_fast():
    rows = [{"prompt": f"question {i}", "chosen": f" answer {i}", "rejected": f" wrong {i}", "row": i}
            for i in range(100_000)]
    loaded = load_preference_data(rows[:2])
    loaded.dataset = datasets.Dataset.from_list(rows)
    start = time.perf_counter()
    found = find_problems(loaded, rules=CHEAP_RULES)
    assert time.perf_counter() - start < 3.0
    assert found == {"identical_pair": [], "empty_or_short": [], "duplicate": []}


# ---------------------------------------------------------------- the real LLaMA-Factory demo files


def test_llamafactory_demo_files(capsys):
    directory = str(shared_asset("llamafactory"))
    assert main(["data", "check", "dpo_en_demo,dpo_zh_demo", "--dataset-dir", directory, "--json"]) == 0
    paired = json.loads(capsys.readouterr().out)["train"]
    by_name = {rule["rule"]: rule for rule in paired["rules"]}
    assert paired["rows_read"] == 600 and paired["form"] == "conversational"
    assert by_name["duplicate"]["count"] >= 5 and by_name["turn_order"]["count"] == 0
    en = check_data("dpo_en_demo", dataset_dir=directory)
    assert rules_of(en)["duplicate"].examples == [157, 186, 230, 248, 275]

    kto = check_data("kto_en_demo", dataset_dir=directory)
    assert kto.loaded.kind == "unpaired" and kto.report.rows_read == len(kto.loaded.dataset) + sum(
        rule.count for rule in kto.report.rules if rule.name in ("non_utf8", "unreadable_row", "turn_order"))
