"""Tests of the compat/trl harness itself (not of preftune): ``pytest compat/trl/test_harness.py``.

They use a small synthetic "TRL test module" and a synthetic junit file, so they need neither TRL's tests nor the
built assets; the chat-template test needs only shared/assets/gpt2-tokenizer (skipped without it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build_assets  # noqa: E402
import dataset_rows  # noqa: E402
import run  # noqa: E402
from port import port  # noqa: E402

SYNTHETIC_TEST_MODULE = '''# header comment
import pytest
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .testing_utils import TrlTestCase


class TestX(TrlTestCase):
    @pytest.mark.parametrize("model_id", ["trl-internal-testing/tiny-A", 'trl-internal-testing/tiny-B'])
    def test_a(self, model_id):
        load("trl-internal-testing/zen", "standard_preference")  # "trl-internal-testing/zen" again
        other = "not-trl-internal-testing/zen"
'''


def _body(ported: Path) -> str:
    """The ported module without the docstring port() puts first."""
    text = ported.read_text()
    assert text.startswith('"""')
    return text[text.index('"""', 3) + 4 :]


@pytest.mark.parametrize("engine", ["trl", "preftune"])
def test_port_changes_only_the_engine_import_and_the_hub_ids(tmp_path, engine):
    src = tmp_path / "test_x.py"
    src.write_text(SYNTHETIC_TEST_MODULE)
    assets = tmp_path / "assets"
    (assets / "trl-internal-testing" / "tiny-A").mkdir(parents=True)
    (assets / "trl-internal-testing" / "zen").mkdir(parents=True)
    dst = tmp_path / "out" / "pkg" / "test_x.py"

    report = port(src, dst, engine, assets)

    expected = SYNTHETIC_TEST_MODULE.replace('"trl-internal-testing/', f'"{assets}/trl-internal-testing/')
    expected = expected.replace("'trl-internal-testing/", f"'{assets}/trl-internal-testing/")
    if engine == "preftune":
        expected = expected.replace("from trl import DPOConfig, DPOTrainer", "from preftune import DPOConfig, DPOTrainer")
    assert _body(dst) == expected
    assert "not-trl-internal-testing/zen" in _body(dst)  # only whole quoted ids are replaced
    assert len(report.substitutions) == 4 + (engine == "preftune")
    assert list(report.missing_assets) == [str(assets / "trl-internal-testing" / "tiny-B")]
    assert {p.name for p in dst.parent.iterdir()} >= {"testing_utils.py", "conftest.py", "__init__.py", "pytest.ini"}
    assert json.loads((dst.parent / "missing_assets.json").read_text()) == report.missing_assets


def test_port_states_the_line_offset_it_introduces(tmp_path):
    src = tmp_path / "test_x.py"
    src.write_text(SYNTHETIC_TEST_MODULE)
    dst = tmp_path / "pkg" / "test_x.py"
    port(src, dst, "preftune", tmp_path / "assets")
    text = dst.read_text()
    stated = int(text.split("TRL's file is ")[1].split(" lines further down")[0])
    original_line = SYNTHETIC_TEST_MODULE.splitlines().index("# header comment")
    assert text.splitlines()[original_line + stated] == "# header comment"


def test_port_refuses_a_module_without_the_engine_import(tmp_path):
    src = tmp_path / "test_x.py"
    src.write_text(SYNTHETIC_TEST_MODULE.replace("from trl import DPOConfig, DPOTrainer\n", ""))
    with pytest.raises(SystemExit, match="expected exactly one line"):
        port(src, tmp_path / "pkg" / "test_x.py", "preftune", tmp_path)


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="trl_tests.test_dpo_trainer.TestDPOTrainer" name="test_train[{assets}/trl-internal-testing/tiny-A]" time="2.5"/>
<testcase classname="trl_tests.test_dpo_trainer.TestDPOTrainer" name="test_tags" time="1.0">
  <failure message="TypeError: argument of type 'NoneType' is not iterable&#10;more">trace</failure></testcase>
<testcase classname="trl_tests.test_dpo_trainer.TestDPOTrainer" name="test_raises" time="1.0">
  <failure message="AssertionError: Regex pattern did not match.&#10;  Expected regex: 'x'&#10;  Actual message: 'y'">t</failure></testcase>
<testcase classname="trl_tests.test_dpo_trainer.TestDPOTrainer" name="test_gpu" time="0">
  <skipped type="pytest.skip" message="test requires bitsandbytes">s</skipped></testcase>
</testsuite></testsuites>
"""


def test_junit_results_are_read_with_hub_ids_and_first_error_lines(tmp_path):
    assets = tmp_path / "assets"
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT.format(assets=assets))
    outcomes = run.read_junit(junit, assets)
    assert {t: o.status for t, o in outcomes.items()} == {
        "TestDPOTrainer::test_train[trl-internal-testing/tiny-A]": "passed",
        "TestDPOTrainer::test_tags": "failed",
        "TestDPOTrainer::test_raises": "failed",
        "TestDPOTrainer::test_gpu": "skipped",
    }
    assert outcomes["TestDPOTrainer::test_tags"].first_line == "TypeError: argument of type 'NoneType' is not iterable"
    assert outcomes["TestDPOTrainer::test_raises"].first_line == (
        "AssertionError: Regex pattern did not match. Actual message: 'y'"
    )


def test_compare_counts_trl_passes_and_lists_the_ones_preftune_misses():
    passed, failed = run.Outcome("passed"), run.Outcome("failed", "KeyError: 'train_loss'")
    results = {
        "trl": {"a": passed, "b": passed, "c": run.Outcome("skipped", "no GPU"), "d": failed},
        "preftune": {"a": passed, "b": failed, "c": run.Outcome("skipped", "no GPU"), "d": passed},
    }
    comparison = run.compare(results)
    assert (comparison.trl_passed, comparison.both_passed) == (2, 1)
    assert comparison.trl_passed_preftune_not == ["b"]
    assert comparison.preftune_failures_by_error == {"KeyError: 'train_loss'": ["b"]}


@pytest.mark.skipif(not (build_assets.default_gpt2_tokenizer() / "vocab.json").is_file(), reason="no GPT-2 tokenizer")
@pytest.mark.parametrize("family", sorted(build_assets.TOKENIZERS))
def test_chat_templates_render_the_prompt_as_a_token_prefix(family):
    """What preference training relies on: prompt + generation prompt is a token prefix of prompt + completion
    (also for tool calls, tool results and reasoning), and the completion adds tokens."""
    tokenizer = build_assets.build_tokenizer(build_assets.TOKENIZERS[family], build_assets.default_gpt2_tokenizer())
    zen = dataset_rows.zen_configs()["conversational_preference"]
    tool = dataset_rows.toolcall_configs()["preference"]
    harmony = dataset_rows.harmony_configs()["preference"]
    cases = [(row, {}) for row in zen[:3]] + [(row, {"tools": row["tools"]}) for row in tool]
    cases += [(row, row["chat_template_kwargs"]) for row in harmony[:3]]
    for row, kwargs in cases:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
        for completion in (row["chosen"], row["rejected"]):
            full = tokenizer.apply_chat_template(row["prompt"] + completion, **kwargs)["input_ids"]
            assert full[: len(prompt)] == prompt and len(full) > len(prompt), (family, row["prompt"])
