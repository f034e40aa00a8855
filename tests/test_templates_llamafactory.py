"""Every named template against LLaMA-Factory 0.9.5 itself: the same rows, the same tokenizers, the same token ids.

LLaMA-Factory runs in a virtual environment of its own, `.venv-oracles/llamafactory-0.9.5` (gitignored), which the
`llamafactory_python` fixture creates on first use from PyPI (a few minutes: the local CPU torch wheel first, then
`llamafactory==0.9.5` without its dependencies, then the few it needs to import its data package, pinned within its
own requirements; then Pillow, for rows with images, which an environment built before it was added gets without a
rebuild: `oracle_plan`). torchaudio, which LLaMA-Factory imports at module level for audio inputs only, has no
release for torch 2.13: the environment gets an empty stand-in module. Under CI (CI=true) a failure to build it fails
the tests; elsewhere (no network) they are skipped with the reason.

`tests/llamafactory_oracle.py` runs there, once per test session: for every template, tokenizer and row it returns
the ids of LLaMA-Factory's pairwise (DPO) processor - prompt, chosen and rejected - and its Jinja export. The
multimodal templates' plugins need a real processor even for text rows; for those the oracle calls
`Template.encode_oneturn` (what the processor calls) and appends EOS as the processor does.

Truncation (`cutoff_len`, preftune's `max_length`): the same oracle runs LLaMA-Factory's `infer_seqlen` on a grid of
lengths, its pairwise processor with several cutoffs on a few templates (reasoning ones included) and rows with long
responses and several turns, and its feedback (KTO) processor on unpaired rows, KL completions included; then the
LLaMA-Factory demo sets with the cutoff of its shipped qwen3 DPO/KTO examples (2048) and a short one (256).

Tokenizers (offline): GPT-2's byte-level BPE and the stories260K SentencePiece (Llama) tokenizer, each with every
special token the templates write (role markers, stop words) added as a special token, as a model family's own
tokenizer has them. A tokenizer without them would get new tokens from LLaMA-Factory (resize_vocab), which preftune
does not do (see preftune.data.templates).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from conftest import REPO_ROOT, shared_asset
from transformers import AutoTokenizer

from preftune.data.collate import mismatched_examples
from preftune.data.kto import with_kl_completions
from preftune.data.pipeline import prepare_data
from preftune.data.template_format import Token
from preftune.data.templates import TEMPLATES, encode_conversation, get_template
from preftune.data.tokenize import (TokenizeSettings, llamafactory_kept_lengths, tokenize_dataset, tokenize_pair,
                                    tokenize_unpaired)

ORACLE_DIR = REPO_ROOT / ".venv-oracles"
VENV = ORACLE_DIR / "llamafactory-0.9.5"
# torch first (the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build), then LLaMA-Factory without
# its 30 dependencies (gradio, torchaudio, ...), then what importing llamafactory.data needs, within its own pins.
INSTALL_STEPS = (
    ("torch==2.13.0",),
    ("--no-deps", "llamafactory==0.9.5"),
    ("transformers==5.6.0", "peft==0.18.1", "datasets==4.0.0", "accelerate==1.11.0"),
)
# Packages added to a built environment without rebuilding it (each adds a package that nothing installed above
# depends on): Pillow, for LLaMA-Factory's multimodal plugins on rows with images (tests/test_vision_templates_
# llamafactory.py); LLaMA-Factory 0.9.5 takes any version, this is the one preftune's own environment has.
ADDED_STEPS = (
    ("pillow==12.3.0",),
)
STAMP = VENV / "preftune-oracle-ready.json"

ROWS = [
    {"system": None, "prompt": [{"role": "user", "content": "Tell me a story."}],
     "chosen": "Once upon a time there was a fox.", "rejected": "No."},
    {"system": "Be brief.", "prompt": [{"role": "user", "content": "Tell me a story."}],
     "chosen": "A fox ran.", "rejected": "I will not."},
    {"system": None, "prompt": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello! how can I help?"},
                                {"role": "user", "content": "What is 2+2?"}],
     "chosen": "4", "rejected": "5"},
    {"system": "你是一个乐于助人的助手。", "prompt": [{"role": "user", "content": "请用一句话介绍长城。"}],
     "chosen": "长城是中国古代的伟大防御工程。", "rejected": "不知道。"},
    {"system": "", "prompt": [{"role": "user", "content": "  Spaces around,\nand a new line.  "}],
     "chosen": " leading space", "rejected": "trailing space "},
    {"system": None, "prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant",
                                                                  "content": "<think>\nhmm\n</think>\n\nA1"},
                                {"role": "user", "content": "Q2"}],
     "chosen": "<think>\nlet me think\n</think>\n\nA2", "rejected": "A2 without a thought"},
]
# Long responses (so that a cutoff cuts responses too), a long thought, several turns, Chinese.
LONG_ROWS = [
    {"system": None, "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                {"role": "user", "content": "Tell me a long story about a fox."}],
     "chosen": "Once upon a time, in a forest far away, there lived a clever red fox who loved to watch the stars. "
               "Every night she climbed the tallest hill and counted them, one by one, until the sun came up.",
     "rejected": "Foxes are small omnivorous mammals. That is all I will say about them today, sorry."},
    {"system": "你是一个乐于助人的助手。",
     "prompt": [{"role": "user", "content": "长城有多长？"}, {"role": "assistant", "content": "大约两万一千公里。"},
                {"role": "user", "content": "请详细介绍一下它的历史，越详细越好。"}],
     "chosen": "长城的修建始于春秋战国时期，秦始皇统一中国后将各段城墙连接起来。此后汉、北魏、北齐、隋、明等朝代都曾大规模修筑，"
               "现存的大部分城墙是明代修建的。",
     "rejected": "I do not know much about its history."},
    {"system": None, "prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                {"role": "user", "content": "Is 91 a prime number? Explain."}],
     "chosen": "<think>\n91 = 7 * 13, so it has divisors other than 1 and itself; it is therefore not prime, although "
               "it looks like one at first sight.\n</think>\n\nNo: 91 = 7 × 13.",
     "rejected": "Yes, 91 is a prime number because it is odd and does not end in 5."},
]
TRUNCATION_ROWS = ROWS + LONG_ROWS
TRUNCATION_TEMPLATES = ("qwen3", "qwen3_nothink", "deepseekr1", "llama3", "llama2", "gemma")
# 2 and 3 cut some responses to nothing (LLaMA-Factory keeps such a row, preftune drops it); the others cut prompts
# only, responses only, or both, depending on the row.
CUTOFFS = (2, 3, 8, 16, 24, 40, 64, 80)
FEEDBACK_TEMPLATES, FEEDBACK_CUTOFFS = ("qwen3", "qwen3_nothink", "llama3"), (8, 16, 24, 40, 64, 80)
# LLaMA-Factory's shipped examples/train_lora/qwen3_lora_{dpo,kto}.yaml: template and cutoff_len; and a short cutoff.
DEMO_CUTOFF_TEMPLATE, DEMO_CUTOFFS = "qwen3_nothink", (2048, 256)
SEQLEN_GRID = [(source, target, cutoff) for source in range(41) for target in range(41) for cutoff in range(1, 42)]
SEQLEN_GRID += [(1500, 700, 2048), (700, 1500, 2048), (3000, 3000, 2048), (1024, 1024, 2048), (5, 10**6, 2048),
                (10**6, 5, 2048), (333, 667, 1000), (667, 333, 1000), (12345, 6789, 4096),
                (2047 * 1024 + 1, 1024, 2048)]
# The LLaMA-Factory demo sets read through preftune's whole data path (dataset_info.json, pipeline) with these names.
DEMO_SETS, DEMO_TEMPLATES, DEMO_ROWS = ("dpo_en_demo", "dpo_zh_demo"), ("qwen3_nothink", "qwen3", "llama3"), 10
PROBES = ["Tell me a story.", " leading space", "长城是中国古代的伟大防御工程。", "<|im_start|>user\nhi<|im_end|>\n"]


def _create_venv() -> float:
    """Build the oracle environment from INSTALL_STEPS; returns the seconds it took."""
    started = time.monotonic()
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, text=True)
    python = str(VENV / "bin" / "python")
    for step in INSTALL_STEPS:
        _pip_install(python, step)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    stub = Path(site) / "torchaudio"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text('"""Stand-in: LLaMA-Factory imports torchaudio for audio inputs only."""\n')
    return time.monotonic() - started


def _pip_install(python: str, step: tuple[str, ...]) -> None:
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *step], check=True,
                   capture_output=True, text=True)


def oracle_plan(stamp: dict | None) -> tuple[bool, list[tuple[str, ...]]]:
    """(rebuild?, the ADDED_STEPS to install) for an environment whose stamp is `stamp` (None: none written).

    The stamp records INSTALL_STEPS as "steps" and the ADDED_STEPS installed as "added_steps": other INSTALL_STEPS
    (or no stamp) rebuild the environment, then install every added step; otherwise only the added steps it lacks
    are installed. A stamp without "added_steps" (written before they existed) keeps its environment."""
    if stamp is None or stamp.get("steps") != [list(step) for step in INSTALL_STEPS]:
        return True, list(ADDED_STEPS)
    installed = stamp.get("added_steps", [])
    return False, [step for step in ADDED_STEPS if list(step) not in installed]


@pytest.fixture(scope="session")
def llamafactory_python() -> str:
    """The oracle environment's python, created (or completed with ADDED_STEPS) on first use (see the module
    docstring and `oracle_plan`)."""
    ORACLE_DIR.mkdir(exist_ok=True)
    with open(ORACLE_DIR / "llamafactory.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = json.loads(STAMP.read_text()) if STAMP.exists() else None
        rebuild, added = oracle_plan(stamp)
        if rebuild or added:
            try:
                if rebuild:
                    stamp = {"steps": [list(step) for step in INSTALL_STEPS],
                             "created_in_s": round(_create_venv(), 1)}
                for step in added:
                    _pip_install(str(VENV / "bin" / "python"), step)
            except (subprocess.CalledProcessError, OSError) as error:
                detail = getattr(error, "stderr", "") or str(error)
                message = f"could not build the LLaMA-Factory oracle environment {VENV}: {detail.strip()[-800:]}"
                if os.environ.get("CI", "").lower() == "true":
                    pytest.fail(message)
                pytest.skip(message)
            installed = [] if rebuild else stamp.get("added_steps", [])
            STAMP.write_text(json.dumps({**stamp, "added_steps": installed + [list(step) for step in added]}))
    return str(VENV / "bin" / "python")


def _template_tokens() -> list[str]:
    """Every special token the templates write: Token slots, stop words, and <|...|>-style markers in their text."""
    tokens = set()
    marker = re.compile(r"<\|[^|<>\s]+\|>|<｜[^｜]+｜>|<(?:start|end)_of_turn>|\[/?INST\]|\[gMASK\]|<sop>")
    for template in TEMPLATES.values():
        tokens.update(template.stop_words)
        for slot in (*template.prefix, *template.system, *template.user, *template.assistant):
            if isinstance(slot, Token):
                tokens.add(slot.text)
            elif isinstance(slot, str):
                tokens.update(marker.findall(slot))
    return sorted(tokens)


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """{key: (saved directory, tokenizer)}: GPT-2 BPE and stories260K SentencePiece with the templates' tokens."""
    folder = tmp_path_factory.mktemp("template-tokenizers")
    built = {}
    for key, asset in (("gpt2", "gpt2-tokenizer"), ("llama", "stories260K-hf")):
        tokenizer = AutoTokenizer.from_pretrained(shared_asset(asset))
        tokenizer.add_special_tokens({"additional_special_tokens": _template_tokens()})
        tokenizer.save_pretrained(folder / key)
        built[key] = (str(folder / key), AutoTokenizer.from_pretrained(folder / key))
    return built


def _demo_rows(name: str, count: int | None = DEMO_ROWS) -> list[dict]:
    """The first `count` rows (None: all) of a LLaMA-Factory sharegpt demo set, in the oracle's form (LLaMA-Factory's
    roles)."""
    roles = {"human": "user", "gpt": "assistant"}
    records = json.loads((shared_asset("llamafactory") / f"{name}.json").read_text(encoding="utf-8"))[:count]
    rows = []
    for record in records:
        turns, system = record["conversations"], None
        if turns[0]["from"] == "system":  # LLaMA-Factory's sharegpt reader: a leading system turn is the system
            turns, system = turns[1:], turns[0]["value"]
        rows.append({"system": system, "prompt": [{"role": roles[turn["from"]], "content": turn["value"]}
                                                  for turn in turns],
                     "chosen": record["chosen"]["value"], "rejected": record["rejected"]["value"]})
    return rows


def _kto_demo_rows() -> list[dict]:
    """Every row of LLaMA-Factory's kto_en_demo in the oracle's unpaired form: the last message is the completion."""
    records = json.loads((shared_asset("llamafactory") / "kto_en_demo.json").read_text(encoding="utf-8"))
    rows = []
    for record in records:
        messages, system = record["messages"], None
        if messages[0]["role"] == "system":
            messages, system = messages[1:], messages[0]["content"]
        rows.append({"system": system, "prompt": messages[:-1], "completion": messages[-1]["content"],
                     "label": record["label"]})
    return rows


def _unpaired(rows: list[dict]) -> list[dict]:
    """Each pair as two unpaired rows: chosen desirable, rejected undesirable."""
    return [{"system": row["system"], "prompt": row["prompt"], "completion": row[field], "label": field == "chosen"}
            for row in rows for field in ("chosen", "rejected")]


def _thinking_modes(name: str) -> tuple[bool, ...]:
    return (True, False) if TEMPLATES[name].reasoning else (True,)


def _case(template, tokenizer, thinking, rows_name, rows, cutoff=None, kind="pairwise") -> dict:
    return {"template": template, "tokenizer": tokenizer, "enable_thinking": thinking, "rows_name": rows_name,
            "rows": rows, "cutoff_len": cutoff, "kind": kind}


def _case_key(case: dict) -> tuple:
    return tuple(case[field] for field in ("template", "tokenizer", "enable_thinking", "rows_name", "cutoff_len",
                                           "kind"))


def _cases() -> list[dict]:
    """Every template on ROWS with both tokenizers (and both thinking modes for reasoning templates); the demo sets
    with DEMO_TEMPLATES on GPT-2; then the truncation cases: TRUNCATION_TEMPLATES on TRUNCATION_ROWS with and
    without each of CUTOFFS (pairwise), FEEDBACK_TEMPLATES on those rows unpaired (feedback), and the whole demo sets
    with DEMO_CUTOFF_TEMPLATE and DEMO_CUTOFFS. Each case's key: `_case_key`."""
    cases = []
    for name in TEMPLATES:
        for key in ("gpt2", "llama"):
            for thinking in _thinking_modes(name):
                cases.append(_case(name, key, thinking, "rows", ROWS))
    for demo in DEMO_SETS:
        for name in DEMO_TEMPLATES:
            cases.append(_case(name, "gpt2", True, demo, _demo_rows(demo)))
    for name in TRUNCATION_TEMPLATES:
        for key in ("gpt2", "llama"):
            for thinking in _thinking_modes(name):
                for cutoff in (None, *CUTOFFS):
                    cases.append(_case(name, key, thinking, "truncation", TRUNCATION_ROWS, cutoff))
    for name in FEEDBACK_TEMPLATES:
        for key in ("gpt2", "llama"):
            for thinking in _thinking_modes(name):
                for cutoff in (None, *FEEDBACK_CUTOFFS):
                    cases.append(_case(name, key, thinking, "unpaired", _unpaired(TRUNCATION_ROWS), cutoff,
                                       "feedback"))
    for cutoff in (None, *DEMO_CUTOFFS):
        cases.append(_case(DEMO_CUTOFF_TEMPLATE, "gpt2", True, "dpo_en_demo all", _demo_rows("dpo_en_demo", None),
                           cutoff))
        cases.append(_case(DEMO_CUTOFF_TEMPLATE, "gpt2", True, "kto_en_demo", _kto_demo_rows(), cutoff, "feedback"))
    return cases


@pytest.fixture(scope="session")
def llamafactory_ids(llamafactory_python, tokenizers, tmp_path_factory) -> dict:
    """LLaMA-Factory's output for every case of `_cases()` (see tests/llamafactory_oracle.py)."""
    cases = _cases()
    request = {"tokenizers": {key: path for key, (path, _) in tokenizers.items()}, "probes": PROBES,
               "seqlen": SEQLEN_GRID, "cases": cases}
    output = tmp_path_factory.mktemp("llamafactory-oracle") / "ids.json"
    environment = {**os.environ, "LLAMAFACTORY_VERBOSITY": "WARN", "HF_HUB_OFFLINE": "1",
                   "DISABLE_VERSION_CHECK": "1", "PYTHONPATH": ""}
    subprocess.run([llamafactory_python, str(Path(__file__).with_name("llamafactory_oracle.py")), str(output)],
                   input=json.dumps(request), text=True, check=True, capture_output=True, env=environment,
                   timeout=600)
    result = json.loads(output.read_text())
    by_case = {_case_key(case): answer for case, answer in zip(cases, result["cases"])}
    return {"probes": result["probes"], "seqlen": result["seqlen"], "cases": by_case}


def _answer(llamafactory_ids, template, tokenizer, thinking, rows_name, cutoff=None, kind="pairwise") -> dict:
    return llamafactory_ids["cases"][(template, tokenizer, thinking, rows_name, cutoff, kind)]


def _preftune_messages(row: dict) -> list[dict]:
    system = [] if row["system"] is None else [{"role": "system", "content": row["system"]}]
    return system + row["prompt"]


def test_the_oracle_tokenizes_plain_text_like_preftune(llamafactory_ids, tokenizers):
    # Both environments must agree on plain text, so that any difference below is the template's.
    for key, (_, tokenizer) in tokenizers.items():
        assert llamafactory_ids["probes"][key] == [tokenizer.encode(text, add_special_tokens=False)
                                                   for text in PROBES], key


def test_every_llamafactory_0_9_5_template_is_known():
    assert len(TEMPLATES) == 121
    for name in ("qwen", "qwen2_vl", "qwen3", "qwen3_nothink", "llama2", "llama3", "llama4", "mistral", "gemma",
                 "gemma3", "glm4", "chatglm3", "deepseek", "deepseek3", "deepseekr1", "phi", "phi4", "yi", "intern2",
                 "cohere", "olmo", "empty", "default", "alpaca", "vicuna", "chatml"):
        assert name in TEMPLATES, name


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_token_ids_equal_llamafactory(name, llamafactory_ids, tokenizers):
    template = TEMPLATES[name]
    compared = 0
    for key, (_, tokenizer) in tokenizers.items():
        for thinking in (True, False) if template.reasoning else (True,):
            answer = _answer(llamafactory_ids, name, key, thinking, "rows")
            for index, (row, expected) in enumerate(zip(ROWS, answer["rows"])):
                where = f"{name} / {key} / enable_thinking={thinking} / row {index}"
                assert "error" not in expected, f"{where}: LLaMA-Factory failed: {expected.get('error')}"
                prompt = _preftune_messages(row)
                prompt_ids, chosen_ids = encode_conversation(
                    name, tokenizer, prompt, [{"role": "assistant", "content": row["chosen"]}],
                    enable_thinking=thinking)
                rejected_prompt_ids, rejected_ids = encode_conversation(
                    name, tokenizer, prompt, [{"role": "assistant", "content": row["rejected"]}],
                    enable_thinking=thinking)
                assert prompt_ids == expected["prompt_ids"], f"{where}: prompt"
                assert rejected_prompt_ids == expected["prompt_ids"], f"{where}: rejected's prompt"
                assert chosen_ids == expected["chosen_ids"], f"{where}: chosen"
                assert rejected_ids == expected["rejected_ids"], f"{where}: rejected"
                compared += 1
    assert compared >= 2 * len(ROWS)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_renders_what_llamafactorys_jinja_export_renders(name, llamafactory_ids, tokenizers):
    _, tokenizer = tokenizers["llama"]
    exported = _answer(llamafactory_ids, name, "llama", True, "rows")["jinja"]
    if exported is None:  # LLaMA-Factory has no Jinja export for templates that write tokens by id
        assert any(isinstance(slot, Token) for slot in (*TEMPLATES[name].prefix, *TEMPLATES[name].system,
                                                        *TEMPLATES[name].user, *TEMPLATES[name].assistant))
        return
    ours = get_template(name)
    for row in ROWS:
        for messages in (_preftune_messages(row), _preftune_messages(row) + [{"role": "assistant",
                                                                                "content": row["chosen"]}]):
            theirs = tokenizer.apply_chat_template(messages, chat_template=exported, tokenize=False)
            assert tokenizer.apply_chat_template(messages, chat_template=ours, tokenize=False) == theirs


@pytest.mark.parametrize("name", DEMO_TEMPLATES)
@pytest.mark.parametrize("demo", DEMO_SETS)
def test_a_llamafactory_config_on_its_demo_data_trains_on_llamafactorys_tokens(demo, name, llamafactory_ids,
                                                                               tokenizers):
    # dataset_info.json + `template:` as a LLaMA-Factory YAML has them, through preftune's reader and pipeline
    config = SimpleNamespace(dataset_dir=str(shared_asset("llamafactory")), max_samples=DEMO_ROWS, on_bad_row="warn",
                             val_size=0, seed=0, overwrite_cache=True, max_length=10**6,
                             truncation_mode="keep_start", template=name, enable_thinking=True)
    prepared = prepare_data(config, tokenizers["gpt2"][1], demo)
    expected = _answer(llamafactory_ids, name, "gpt2", True, demo)["rows"]
    rows = prepared.train.dataset.to_list()
    assert [row["row"] for row in rows] == list(range(DEMO_ROWS))
    for row, theirs in zip(rows, expected):
        assert "error" not in theirs, theirs.get("error")
        assert {key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} == {
            key: theirs[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}, f"{demo} row {row['row']}"


# ---------------------------------------------------------------- truncation (cutoff_len / max_length)


def test_kept_lengths_are_llamafactorys_infer_seqlen(llamafactory_ids):
    ours = [list(llamafactory_kept_lengths(*triple)) for triple in SEQLEN_GRID]
    differing = [(triple, mine, theirs) for triple, mine, theirs in zip(SEQLEN_GRID, ours, llamafactory_ids["seqlen"])
                 if mine != theirs]
    assert not differing, differing[:5]


def _pair_example(row: dict, index: int) -> dict:
    return {"prompt": _preftune_messages(row), "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}], "row": index}


def _cut_kind(uncut: dict, cut: dict, responses: tuple[str, ...]) -> str:
    """Which part LLaMA-Factory cut: "neither", "prompt", "response", "both" or "no response left"."""
    if not any(cut[field] for field in responses):
        return "no response left"
    prompt_cut = len(cut["prompt_ids"]) < len(uncut["prompt_ids"])
    response_cut = any(len(cut[field]) < len(uncut[field]) for field in responses)
    return {(False, False): "neither", (True, False): "prompt", (False, True): "response"}.get(
        (prompt_cut, response_cut), "both")


@pytest.mark.parametrize("name", TRUNCATION_TEMPLATES)
def test_pairs_are_cut_as_llamafactorys_pairwise_processor_cuts_them(name, llamafactory_ids, tokenizers):
    kinds, multi_turn_kinds = set(), set()
    for key, (_, tokenizer) in tokenizers.items():
        for thinking in _thinking_modes(name):
            uncut = _answer(llamafactory_ids, name, key, thinking, "truncation")["rows"]
            for cutoff in CUTOFFS:
                expected = _answer(llamafactory_ids, name, key, thinking, "truncation", cutoff)["rows"]
                settings = TokenizeSettings(template=name, max_length=cutoff, enable_thinking=thinking)
                for index, (row, theirs) in enumerate(zip(TRUNCATION_ROWS, expected)):
                    where = f"{name} / {key} / enable_thinking={thinking} / cutoff_len={cutoff} / row {index}"
                    assert theirs.get("via") == "processor", f"{where}: {theirs}"
                    ours = tokenize_pair(_pair_example(row, index), tokenizer, settings)
                    kind = _cut_kind(uncut[index], theirs, ("chosen_ids", "rejected_ids"))
                    kinds.add(kind)
                    if len(row["prompt"]) > 1:
                        multi_turn_kinds.add(kind)
                    if kind == "no response left":  # LLaMA-Factory keeps a row with nothing to learn; preftune drops it
                        assert ours["no_room"], where
                        continue
                    assert not ours["no_room"], where
                    assert {field: ours[field] for field in ("prompt_ids", "chosen_ids", "rejected_ids")} == {
                        field: theirs[field] for field in ("prompt_ids", "chosen_ids", "rejected_ids")}, where
                    assert ours["truncated"] == (kind != "neither"), where
    # every branch of LLaMA-Factory's rule ran for this template, the cuts on rows with several turns too
    assert kinds == {"neither", "prompt", "response", "both", "no response left"}, kinds
    assert {"prompt", "response", "both"} <= multi_turn_kinds, multi_turn_kinds


@pytest.mark.parametrize("name", FEEDBACK_TEMPLATES)
def test_unpaired_rows_are_cut_as_llamafactorys_feedback_processor_cuts_them(name, llamafactory_ids, tokenizers):
    rows = _unpaired(TRUNCATION_ROWS)
    kinds = set()
    for key, (_, tokenizer) in tokenizers.items():
        for thinking in _thinking_modes(name):
            uncut = _answer(llamafactory_ids, name, key, thinking, "unpaired", None, "feedback")["rows"]
            for cutoff in FEEDBACK_CUTOFFS:
                expected = _answer(llamafactory_ids, name, key, thinking, "unpaired", cutoff, "feedback")["rows"]
                settings = TokenizeSettings(template=name, max_length=cutoff, enable_thinking=thinking)
                for index, (row, theirs) in enumerate(zip(rows, expected)):
                    where = f"{name} / {key} / enable_thinking={thinking} / cutoff_len={cutoff} / row {index}"
                    assert "error" not in theirs, f"{where}: {theirs['error']}"
                    example = {"prompt": _preftune_messages(row), "label": row["label"], "row": index,
                               "completion": [{"role": "assistant", "content": row["completion"]}]}
                    ours = tokenize_unpaired(example, tokenizer, settings)
                    kind = _cut_kind(uncut[index], theirs, ("completion_ids",))
                    kinds.add(kind)
                    if kind == "no response left":
                        assert ours["no_room"], where
                        continue
                    assert not ours["no_room"], where
                    assert (ours["prompt_ids"], ours["completion_ids"], ours["label"]) == (
                        theirs["prompt_ids"], theirs["completion_ids"], theirs["label"]), where
                    assert ours["truncated"] == (kind != "neither"), where
    assert {"neither", "prompt", "response", "both"} <= kinds, kinds


def _kl_inputs_cut(uncut: list[dict], cut: list[dict], index: int) -> bool:
    """Whether LLaMA-Factory cut anything preftune's KL sequence of row `index` is made of: that row's prompt, the
    completion of the row before it (its KL partner) or the KL sequence itself."""
    partner = (index - 1) % len(cut)
    return (len(cut[index]["prompt_ids"]) < len(uncut[index]["prompt_ids"])
            or len(cut[partner]["completion_ids"]) < len(uncut[partner]["completion_ids"])
            or len(cut[index]["kl_prompt_ids"]) < len(uncut[index]["kl_prompt_ids"])
            or len(cut[index]["kl_completion_ids"]) < len(uncut[index]["kl_completion_ids"]))


def _kl_differences(with_kl: list[dict], uncut: list[dict], expected: list[dict], cutoff: int) -> list[int]:
    """Rows whose KL sequence (prompt + mismatched completion, `mismatched_examples`) differs from LLaMA-Factory's;
    `with_kl` are tokenized rows with their KL completions in one rotation group over all rows (LLaMA-Factory's one
    batch: row i takes row i - 1's completion). Asserts that each of them had something cut (`_kl_inputs_cut`)."""
    differing = []
    for index, (ours, theirs) in enumerate(zip(mismatched_examples(with_kl, cutoff), expected)):
        if ours["prompt_ids"] + ours["completion_ids"] != theirs["kl_prompt_ids"] + theirs["kl_completion_ids"]:
            assert _kl_inputs_cut(uncut, expected, index), f"row {index}: differs where nothing was cut"
            differing.append(index)
    return differing


@pytest.mark.parametrize("name", FEEDBACK_TEMPLATES)
def test_kl_sequences_equal_llamafactorys_unless_it_cuts_them(name, llamafactory_ids, tokenizers):
    # module docstring of preftune.data.tokenize: the KL sequence keeps the row's prompt; LLaMA-Factory cuts it anew
    rows = _unpaired(TRUNCATION_ROWS)
    examples = [{"prompt": _preftune_messages(row), "label": row["label"], "row": index,
                 "completion": [{"role": "assistant", "content": row["completion"]}]} for index, row in enumerate(rows)]
    compared = differing = 0
    for key, (_, tokenizer) in tokenizers.items():
        for thinking in _thinking_modes(name):
            uncut = _answer(llamafactory_ids, name, key, thinking, "unpaired", None, "feedback")["rows"]
            for cutoff in (None, *FEEDBACK_CUTOFFS):
                expected = _answer(llamafactory_ids, name, key, thinking, "unpaired", cutoff, "feedback")["rows"]
                settings = TokenizeSettings(template=name, max_length=cutoff, enable_thinking=thinking)
                tokenized = tokenize_dataset(datasets.Dataset.from_list(examples), tokenizer, settings).dataset
                if len(tokenized) < len(rows):  # rows dropped (no response left): the pairings would differ
                    continue
                with_kl = with_kl_completions(tokenized, group_size=len(tokenized)).to_list()
                found = _kl_differences(with_kl, uncut, expected, cutoff)
                if cutoff is None:
                    assert not found
                compared, differing = compared + len(rows), differing + len(found)
    assert 0 < differing < compared


def _demo_config(**overrides) -> SimpleNamespace:
    values = dict(dataset_dir=str(shared_asset("llamafactory")), max_samples=None, on_bad_row="warn", val_size=0,
                  seed=0, overwrite_cache=True, truncation_mode="keep_start", template=DEMO_CUTOFF_TEMPLATE,
                  enable_thinking=True)
    return SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize("cutoff", DEMO_CUTOFFS)
def test_a_llamafactory_dpo_config_with_cutoff_len_keeps_and_cuts_every_pair_as_llamafactory(cutoff, llamafactory_ids,
                                                                                            tokenizers):
    # examples/train_lora/qwen3_lora_dpo.yaml (dpo_en_demo, qwen3_nothink, cutoff_len 2048) on a GPT-2 tokenizer
    prepared = prepare_data(_demo_config(max_length=cutoff), tokenizers["gpt2"][1], "dpo_en_demo")
    uncut = _answer(llamafactory_ids, DEMO_CUTOFF_TEMPLATE, "gpt2", True, "dpo_en_demo all")["rows"]
    expected = _answer(llamafactory_ids, DEMO_CUTOFF_TEMPLATE, "gpt2", True, "dpo_en_demo all", cutoff)["rows"]
    rows = prepared.train.dataset.to_list()
    assert [row["row"] for row in rows] == list(range(len(expected))) == list(range(300))
    fields = ("prompt_ids", "chosen_ids", "rejected_ids")
    for row, theirs in zip(rows, expected):
        assert {field: row[field] for field in fields} == {field: theirs[field] for field in fields}, row["row"]
    cut_by_llamafactory = sum(_cut_kind(before, after, fields[1:]) != "neither"
                              for before, after in zip(uncut, expected))
    assert cut_by_llamafactory > 0
    assert prepared.train.stats.truncated == cut_by_llamafactory
    assert prepared.train.stats.dropped_no_room == []


@pytest.mark.parametrize("cutoff", DEMO_CUTOFFS)
def test_a_llamafactory_kto_config_with_cutoff_len_cuts_every_row_as_llamafactory(cutoff, llamafactory_ids,
                                                                                  tokenizers):
    # examples/train_lora/qwen3_lora_kto.yaml (kto_en_demo, qwen3_nothink, cutoff_len 2048) on a GPT-2 tokenizer; one
    # KL rotation group over all rows, as LLaMA-Factory's one preprocessing batch
    config = _demo_config(max_length=cutoff, per_device_train_batch_size=300, per_device_eval_batch_size=300)
    prepared = prepare_data(config, tokenizers["gpt2"][1], "kto_en_demo")
    uncut = _answer(llamafactory_ids, DEMO_CUTOFF_TEMPLATE, "gpt2", True, "kto_en_demo", None, "feedback")["rows"]
    expected = _answer(llamafactory_ids, DEMO_CUTOFF_TEMPLATE, "gpt2", True, "kto_en_demo", cutoff, "feedback")["rows"]
    rows = prepared.train.dataset.to_list()
    assert [row["row"] for row in rows] == list(range(len(expected))) == list(range(300))
    for row, theirs in zip(rows, expected):
        assert "error" not in theirs, theirs["error"]
        assert (row["prompt_ids"], row["completion_ids"], row["label"]) == (
            theirs["prompt_ids"], theirs["completion_ids"], theirs["label"]), row["row"]
    cut_by_llamafactory = sum(_cut_kind(before, after, ("completion_ids",)) != "neither"
                              for before, after in zip(uncut, expected))
    assert cut_by_llamafactory > 0 and prepared.train.stats.truncated == cut_by_llamafactory
    assert prepared.train.stats.dropped_no_room == []
    # the KL sequences (the pipeline's own pairing): equal wherever nothing of them is cut (module docstring of
    # preftune.data.tokenize)
    _kl_differences(rows, uncut, expected, cutoff)
