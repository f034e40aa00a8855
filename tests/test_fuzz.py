"""Fuzzing the input boundaries: data readers and the config loader never crash on malformed input.

Contract under test: for any bytes in a data file (every reader, directly or through a LLaMA-Factory registry) the
outcome is a LoadedData or one preftune error (DataError / ConfigError) whose message names the file, and the row
and field where it is about a row; under on_bad_row="skip" bad rows are dropped and counted, never raised. For any
YAML text, mapping or override strings the config loader returns a DPOConfig or one ConfigError naming the file or
the key. The default run tries a few examples per property; `-m slow` runs over 10,000 cases in all.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from preftune.config import DPOConfig, _ALL_KEYS, load_config, parse_overrides
from preftune.data.formats import LoadedData, load_preference_data
from preftune.errors import ConfigError, DataError

DEFAULT_EXAMPLES = 25
FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)

# ------------------------------------------------------------------------------------------------------ strategies

EDGE_TEXTS = [
    "", " ", "\n", "\x00", "a\x00b", "\ufeff", "\ufeffprompt", "\u202eevil\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd",
    "\ud800", "x\udfffy", "\u2028", "a\u2029b", "\x85", "\x1c", "\r\n", "Human: hi\n\nAssistant: yo",
    "\n\nHuman: hi\n\nAssistant:", "true", "1", "null", "🤖" * 3, "e\u0301", "\uffff", "\U0010ffff", "x" * 70_000,
]
ROW_KEYS = [
    "prompt", "chosen", "rejected", "completion", "label", "instruction", "input", "output", "conversations",
    "messages", "system", "history", "role", "content", "from", "value", "row",
]
texts = st.one_of(st.sampled_from(EDGE_TEXTS), st.text(st.characters(blacklist_categories=()), max_size=20))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(ROW_KEYS) | texts, children,
                                                                       max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["user", "assistant", "system", "tool"]) | json_values
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": texts | json_values}), max_size=4)
sharegpt_tags = st.sampled_from(["human", "gpt", "system", "observation"]) | json_values
sharegpt_turns = st.lists(st.fixed_dictionaries({"from": sharegpt_tags, "value": texts | json_values}), max_size=4)


# Stands for a 3,000-deep nested list, spliced in when the JSON is written (hypothesis cannot print such a value).
DEEP = "<deeply nested value>"
DEEP_JSON = "[" * 3000 + '"x"' + "]" * 3000


plausible_rows = st.one_of(
    st.fixed_dictionaries({"prompt": texts, "chosen": texts, "rejected": texts | st.lists(texts, max_size=3)}),
    st.fixed_dictionaries({"prompt": messages, "chosen": messages | texts, "rejected": messages | json_values}),
    st.fixed_dictionaries({"chosen": texts | messages, "rejected": texts | messages | st.lists(messages, max_size=2)}),
    st.fixed_dictionaries({"prompt": texts | messages, "completion": texts | messages, "label": json_values}),
    st.fixed_dictionaries({"instruction": texts, "input": texts | json_values, "chosen": texts,
                           "rejected": texts | json_values},
                          optional={"system": texts | json_values, "history": json_values}),
    st.fixed_dictionaries({"instruction": texts, "output": texts | json_values, "label": json_values}),
    st.fixed_dictionaries({"conversations": sharegpt_turns | json_values, "chosen": st.fixed_dictionaries(
        {"from": st.sampled_from(["gpt", "human"]), "value": texts}) | json_values, "rejected": json_values}),
    st.fixed_dictionaries({"messages": messages | json_values, "label": json_values}),
)
rows = st.one_of(plausible_rows, st.dictionaries(st.sampled_from(ROW_KEYS) | texts, json_values, max_size=6),
                 json_values, st.just({"prompt": DEEP, "chosen": "a", "rejected": "b"}), st.just(DEEP))
row_lists = st.lists(rows, max_size=6)


# ------------------------------------------------------------------------------------------------------ file writers


def _json_bytes(value: Any, ensure_ascii: bool) -> bytes:
    # surrogatepass: a lone surrogate becomes bytes that are not valid UTF-8, one of the cases under test
    text = json.dumps(value, ensure_ascii=ensure_ascii).replace(json.dumps(DEEP), DEEP_JSON)
    return text.encode("utf-8", "surrogatepass")


def _jsonl_bytes(records: list, ensure_ascii: bool) -> bytes:
    return b"".join(_json_bytes(record, ensure_ascii) + b"\n" for record in records)


def _csv_bytes(records: list) -> bytes:
    dicts = [record if isinstance(record, dict) else {"prompt": record} for record in records]
    header = list(dict.fromkeys(str(key) for record in dicts for key in record)) or ["prompt"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for record in dicts:
        cells = {str(key): value for key, value in record.items()}
        writer.writerow([value if isinstance(value, str) else json.dumps(value) for value in
                         (cells.get(name, "") for name in header)])
    return buffer.getvalue().encode("utf-8", "surrogatepass")


def _parquet_bytes(records: list) -> bytes | None:
    """Parquet of the records, or None when Arrow cannot store them (mixed types, lone surrogates, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist([record if isinstance(record, dict) else {"value": record}
                                      for record in records])
        sink = io.BytesIO()
        pq.write_table(table, sink)
    except Exception:  # noqa: BLE001 - only the files Arrow can write are read back
        return None
    return sink.getvalue()


SUFFIXES = [".json", ".jsonl", ".jsonl.gz", ".csv", ".parquet"]


def _encoded(records: list, suffix: str, ensure_ascii: bool) -> bytes | None:
    if suffix == ".json":
        return _json_bytes(records, ensure_ascii)
    if suffix == ".jsonl":
        return _jsonl_bytes(records, ensure_ascii)
    if suffix == ".jsonl.gz":
        return gzip.compress(_jsonl_bytes(records, ensure_ascii))
    if suffix == ".csv":
        return _csv_bytes(records)
    return _parquet_bytes(records)


def _mangled(data: bytes, how: str, position: int) -> bytes:
    """Byte-level damage: a BOM in front, truncation, an invalid UTF-8 byte, a NUL."""
    cut = position % (len(data) + 1)
    return {"none": data, "bom": b"\xef\xbb\xbf" + data, "truncate": data[:cut],
            "invalid_utf8": data[:cut] + b"\xff\xfe" + data[cut:], "nul": data[:cut] + b"\x00" + data[cut:]}[how]


mangling = st.tuples(st.sampled_from(["none", "none", "bom", "truncate", "invalid_utf8", "nul"]),
                     st.integers(min_value=0, max_value=10**6))


# ------------------------------------------------------------------------------------------------------ the contract


def _check_outcome(load: Callable[[], LoadedData], where: str, on_bad_row: str) -> LoadedData | None:
    """Run a load; it returns LoadedData, or raises one preftune error naming `where` (and row/field if any)."""
    try:
        loaded = load()
    except (DataError, ConfigError) as error:
        message = str(error)
        assert where in message, f"error does not name the file: {message}"
        assert "cannot read row (" not in message, f"a converter crashed (caught by the safety net): {message}"
        if isinstance(error, DataError) and error.row is not None:
            assert f"row {error.row}" in message
            assert on_bad_row == "error", f"on_bad_row={on_bad_row} raised for a row: {message}"
            row_level = any(text in message for text in ("not valid JSON", "too deeply", "row is of type"))
            assert error.field or row_level, f"a row error names no field: {message}"
            assert error.field is None or f"field '{error.field}'" in message
        return None
    assert isinstance(loaded, LoadedData)
    assert len(loaded.dataset) >= 1
    for row, reason in loaded.skipped_rows:
        assert where in reason and f"row {row}" in reason and "cannot read row (" not in reason
    for record in loaded.dataset:  # every row is canonical
        if loaded.kind == "paired":
            assert set(record) == {"prompt", "chosen", "rejected", "row"}
        else:
            assert set(record) == {"prompt", "completion", "label", "row"} and isinstance(record["label"], bool)
    return loaded


def _fuzz_records_in_file(records: list, suffix: str, ensure_ascii: bool, on_bad_row: str) -> None:
    data = _encoded(records, suffix, ensure_ascii)
    if data is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        loaded = _check_outcome(lambda: load_preference_data(str(path), on_bad_row=on_bad_row), str(path), on_bad_row)
    if loaded is not None and on_bad_row == "skip" and suffix != ".csv":
        # every record is one row (JSON Lines: one line each), either loaded or counted as skipped; not checked for
        # CSV, whose reader drops a line of empty cells
        assert len(loaded.dataset) + len(loaded.skipped_rows) == len(records)


def _fuzz_bytes_in_file(data: bytes, suffix: str, on_bad_row: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        _check_outcome(lambda: load_preference_data(str(path), on_bad_row=on_bad_row), str(path), on_bad_row)


registry_columns = st.dictionaries(
    st.sampled_from(["prompt", "query", "response", "history", "system", "messages", "chosen", "rejected",
                     "kto_tag"]),
    st.sampled_from(ROW_KEYS + ["label", "kto_tag", "missing"]) | json_values, max_size=5)
registry_tags = st.dictionaries(
    st.sampled_from(["role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "observation_tag"]),
    st.sampled_from(["from", "value", "role", "content", "human", "gpt", "user", "assistant"]) | json_values,
    max_size=4)
registry_entries = st.one_of(
    st.fixed_dictionaries(
        {"file_name": st.sampled_from(["data.json", "data.jsonl", "data.csv", "missing.json", "."]) | json_values},
        optional={"ranking": st.just(True) | json_values, "formatting": st.sampled_from(["alpaca", "sharegpt"]) |
                  json_values, "columns": registry_columns | json_values, "tags": registry_tags | json_values,
                  "num_samples": json_values}),
    json_values,
)


def _fuzz_registry(entry: Any, records: list, suffix: str, mangle: tuple[str, int], on_bad_row: str) -> None:
    data = _encoded(records, suffix, ensure_ascii=False)
    if data is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / f"data{suffix}").write_bytes(data)
        registry = _json_bytes({"fuzzed": entry}, ensure_ascii=False)
        (Path(folder) / "dataset_info.json").write_bytes(_mangled(registry, *mangle))
        _check_outcome(lambda: load_preference_data("fuzzed", dataset_dir=folder, on_bad_row=on_bad_row), folder,
                       on_bad_row)


config_keys = st.sampled_from(_ALL_KEYS) | st.sampled_from(["not_a_key", "Beta", "learning-rate", ""]) | texts
config_values = json_values | st.sampled_from(["sigmoid", "kto", "lora", "auto", "none", "steps", "1e-5", "-1"])
config_mappings = st.dictionaries(config_keys, config_values, max_size=6)


def _check_config(load: Callable[[], DPOConfig], file: str | None, overrides: list[str] = ()) -> None:
    """A DPOConfig, or a ConfigError naming the file, the key, or the malformed override item."""
    try:
        config = load()
    except ConfigError as error:
        message = str(error)
        named = ((file is not None and file in message) or (error.key is not None and f"key '{error.key}'" in message)
                 or any(repr(item) in message for item in overrides))
        assert named, f"config error names neither file, key nor override: {message}"
        return
    assert isinstance(config, DPOConfig)


def _fuzz_config_mapping(mapping: dict, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        try:
            path.write_text(yaml.safe_dump(mapping, allow_unicode=False), encoding="utf-8")
        except yaml.YAMLError:
            return
        _check_config(lambda: load_config(path, overrides), str(path), overrides)


def _fuzz_config_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(data)
        _check_config(lambda: load_config(path), str(path))


def _fuzz_overrides(items: list[str]) -> None:
    try:
        parsed = parse_overrides(items)
    except ConfigError as error:
        assert f"key '{error.key}'" in str(error) if error.key else any(repr(item) in str(error) for item in items)
        return
    assert isinstance(parsed, dict)
    _check_config(lambda: DPOConfig.from_mapping(parsed, cli_keys=tuple(parsed)), None)


yaml_texts = st.one_of(
    texts,
    st.lists(st.tuples(config_keys, st.sampled_from(["0.1", "true", "[a, b]", "{x: 1}", "&a 1", "*a", "!!binary AA==",
                                                     "!!python/object:os.system x", ".inf", "~", "'", "[" * 2000]) |
                       texts), max_size=6).map(lambda pairs: "\n".join(f"{key}: {value}" for key, value in pairs)),
)
override_items = st.lists(st.one_of(
    texts,
    st.tuples(config_keys, texts | st.sampled_from(["[" * 2000, "{a: 1", "!!float x", "0.2", "&a [*a]"])).map(
        lambda pair: f"{pair[0]}={pair[1]}"),
), max_size=4)

# ------------------------------------------------------------------------------------------------------ properties
# Each property is defined once here; the default tests run it briefly, the slow test at length. Every example is
# a crash the fuzzing found, kept as a regression case.

on_bad_row_values = st.sampled_from(["error", "skip"])
SHAREGPT_LIST_ROLE = {"conversations": [{"from": ["human"], "value": "x"}], "chosen": {"from": "gpt", "value": "y"},
                      "rejected": {"from": "gpt", "value": "z"}}
ALPACA_ROW = {"instruction": "a", "chosen": "b", "rejected": "c"}

# name: (property, its strategies, the crashes found as regression examples)
PROPERTIES: dict[str, tuple[Callable, tuple, list[tuple]]] = {
    "records_in_file": (_fuzz_records_in_file, (row_lists, st.sampled_from(SUFFIXES), st.booleans(),
                                                on_bad_row_values), [
        ([{"prompt": DEEP, "chosen": "a", "rejected": "b"}], ".jsonl", True, "error"),  # RecursionError in json.loads
        ([DEEP], ".json", True, "error"),  # the same for a whole .json document
        ([ALPACA_ROW, {"prompt": "a\u2028b", "chosen": "c", "rejected": "d"}], ".jsonl", False, "skip"),  # U+2028 split
        ([{"prompt": "p", "chosen": "\ud800", "rejected": "r"}], ".json", True, "error"),  # Arrow UnicodeEncodeError
        ([SHAREGPT_LIST_ROLE], ".jsonl", True, "error"),  # unhashable role tag: TypeError
    ]),
    "bytes_in_file": (_fuzz_bytes_in_file, (
        st.binary(max_size=200) | row_lists.map(lambda r: _jsonl_bytes(r, False)).flatmap(
            lambda data: mangling.map(lambda how: _mangled(data, *how))),
        st.sampled_from(SUFFIXES), on_bad_row_values), []),
    "registry": (_fuzz_registry, (registry_entries, row_lists, st.sampled_from([".json", ".jsonl", ".csv"]), mangling,
                                  on_bad_row_values), [
        ({"file_name": {}, "ranking": True}, [ALPACA_ROW], ".json", ("none", 0), "error"),  # Path / dict: TypeError
        ({"file_name": "data.json", "ranking": True, "columns": {"prompt": ["x"]}}, [ALPACA_ROW], ".json",
         ("none", 0), "error"),  # a list as column name: unhashable, TypeError
        ({"file_name": "data.json", "ranking": True, "formatting": "sharegpt", "tags": {"role_tag": {"a": 1}}},
         [SHAREGPT_LIST_ROLE], ".json", ("none", 0), "error"),  # a dict as tag: TypeError
    ]),
    "config_mapping": (_fuzz_config_mapping, (config_mappings, override_items), []),
    "config_yaml_text": (_fuzz_config_bytes, (yaml_texts.map(lambda text: text.encode("utf-8", "surrogatepass")),), []),
    "config_bytes": (_fuzz_config_bytes, (st.binary(max_size=200),), []),
    "overrides": (_fuzz_overrides, (override_items,), [
        (["beta=" + "[" * 2000],), (["beta=!!float x"],), (["seed=!!int 0.5"],),  # RecursionError, ValueError
    ]),
}


def _run_fuzz(name: str, max_examples: int) -> None:
    """Run property `name` (its regression examples first) on `max_examples` generated cases."""
    body, strategies, found = PROPERTIES[name]
    test = given(*strategies)(body)
    for args in found:
        test = example(*args)(test)
    settings(max_examples=max_examples, **FUZZ_SETTINGS)(test)()


# Cases per property in the slow run (11,000 in all), more where a case is cheap.
SLOW_EXAMPLES = {"records_in_file": 2000, "bytes_in_file": 2000, "registry": 1500, "config_mapping": 1000,
                 "config_yaml_text": 1500, "config_bytes": 2000, "overrides": 1000}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".jsonl.gz", ".csv"])
def test_a_leading_byte_order_mark_is_ignored(suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(_mangled(_encoded([ALPACA_ROW], suffix.removesuffix(".gz"), True), "bom", 0))
        if suffix.endswith(".gz"):
            path.write_bytes(gzip.compress(path.read_bytes()))
        loaded = load_preference_data(str(path))
    assert loaded.dataset[0]["prompt"] == [{"role": "user", "content": "a"}]


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_fuzzed_input_gives_a_result_or_one_preftune_error(name):
    _run_fuzz(name, DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_fuzzed_input_over_ten_thousand_cases():
    assert sum(SLOW_EXAMPLES.values()) >= 10_000
    for name in PROPERTIES:
        _run_fuzz(name, SLOW_EXAMPLES[name])
