"""Every named template against LLaMA-Factory 0.9.5 itself: the same rows, the same tokenizers, the same token ids.

LLaMA-Factory runs in a virtual environment of its own, `.venv-oracles/llamafactory-0.9.5` (gitignored), which the
`llamafactory_python` fixture creates on first use from PyPI (a few minutes: the local CPU torch wheel first, then
`llamafactory==0.9.5` without its dependencies, then the few it needs to import its data package, pinned within its
own requirements). torchaudio, which LLaMA-Factory imports at module level for audio inputs only, has no release for
torch 2.13: the environment gets an empty stand-in module. Under CI (CI=true) a failure to build it fails the tests;
elsewhere (no network) they are skipped with the reason.

`tests/llamafactory_oracle.py` runs there, once per test session: for every template, tokenizer and row it returns
the ids of LLaMA-Factory's pairwise (DPO) processor - prompt, chosen and rejected - and its Jinja export. The
multimodal templates' plugins need a real processor even for text rows; for those the oracle calls
`Template.encode_oneturn` (what the processor calls) and appends EOS as the processor does.

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

import pytest
from conftest import REPO_ROOT, shared_asset
from transformers import AutoTokenizer

from preftune.data.pipeline import prepare_data
from preftune.data.template_format import Token
from preftune.data.templates import TEMPLATES, encode_conversation, get_template

ORACLE_DIR = REPO_ROOT / ".venv-oracles"
VENV = ORACLE_DIR / "llamafactory-0.9.5"
# torch first (the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build), then LLaMA-Factory without
# its 30 dependencies (gradio, torchaudio, ...), then what importing llamafactory.data needs, within its own pins.
INSTALL_STEPS = (
    ("torch==2.13.0",),
    ("--no-deps", "llamafactory==0.9.5"),
    ("transformers==5.6.0", "peft==0.18.1", "datasets==4.0.0", "accelerate==1.11.0"),
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
# The LLaMA-Factory demo sets read through preftune's whole data path (dataset_info.json, pipeline) with these names.
DEMO_SETS, DEMO_TEMPLATES, DEMO_ROWS = ("dpo_en_demo", "dpo_zh_demo"), ("qwen3_nothink", "qwen3", "llama3"), 10
PROBES = ["Tell me a story.", " leading space", "长城是中国古代的伟大防御工程。", "<|im_start|>user\nhi<|im_end|>\n"]


def _create_venv() -> float:
    """Build the oracle environment; returns the seconds it took."""
    started = time.monotonic()
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, text=True)
    python = str(VENV / "bin" / "python")
    for step in INSTALL_STEPS:
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *step], check=True,
                       capture_output=True, text=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    stub = Path(site) / "torchaudio"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text('"""Stand-in: LLaMA-Factory imports torchaudio for audio inputs only."""\n')
    return time.monotonic() - started


@pytest.fixture(scope="session")
def llamafactory_python() -> str:
    """The oracle environment's python, created on first use (see the module docstring)."""
    ORACLE_DIR.mkdir(exist_ok=True)
    wanted = {"steps": [list(step) for step in INSTALL_STEPS]}
    with open(ORACLE_DIR / "llamafactory.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ready = STAMP.exists() and json.loads(STAMP.read_text()).get("steps") == wanted["steps"]
        if not ready:
            try:
                seconds = _create_venv()
            except (subprocess.CalledProcessError, OSError) as error:
                detail = getattr(error, "stderr", "") or str(error)
                message = f"could not build the LLaMA-Factory oracle environment {VENV}: {detail.strip()[-800:]}"
                if os.environ.get("CI", "").lower() == "true":
                    pytest.fail(message)
                pytest.skip(message)
            STAMP.write_text(json.dumps({**wanted, "created_in_s": round(seconds, 1)}))
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


def _demo_rows(name: str) -> list[dict]:
    """The first DEMO_ROWS rows of a LLaMA-Factory sharegpt demo set, in the oracle's form (LLaMA-Factory's roles)."""
    roles = {"human": "user", "gpt": "assistant"}
    records = json.loads((shared_asset("llamafactory") / f"{name}.json").read_text(encoding="utf-8"))[:DEMO_ROWS]
    rows = []
    for record in records:
        turns, system = record["conversations"], None
        if turns[0]["from"] == "system":  # LLaMA-Factory's sharegpt reader: a leading system turn is the system
            turns, system = turns[1:], turns[0]["value"]
        rows.append({"system": system, "prompt": [{"role": roles[turn["from"]], "content": turn["value"]}
                                                  for turn in turns],
                     "chosen": record["chosen"]["value"], "rejected": record["rejected"]["value"]})
    return rows


def _cases() -> list[dict]:
    """Every template on ROWS with both tokenizers (and both thinking modes for reasoning templates); then the demo
    sets with DEMO_TEMPLATES on GPT-2. Each case's key: (template, tokenizer, enable_thinking, rows name)."""
    cases = []
    for name, template in TEMPLATES.items():
        for key in ("gpt2", "llama"):
            for thinking in (True, False) if template.reasoning else (True,):
                cases.append({"template": name, "tokenizer": key, "enable_thinking": thinking, "rows": ROWS,
                              "rows_name": "rows"})
    for demo in DEMO_SETS:
        for name in DEMO_TEMPLATES:
            cases.append({"template": name, "tokenizer": "gpt2", "enable_thinking": True, "rows": _demo_rows(demo),
                          "rows_name": demo})
    return cases


@pytest.fixture(scope="session")
def llamafactory_ids(llamafactory_python, tokenizers, tmp_path_factory) -> dict:
    """LLaMA-Factory's output for every case of `_cases()` (see tests/llamafactory_oracle.py)."""
    cases = _cases()
    request = {"tokenizers": {key: path for key, (path, _) in tokenizers.items()}, "probes": PROBES, "cases": cases}
    output = tmp_path_factory.mktemp("llamafactory-oracle") / "ids.json"
    environment = {**os.environ, "LLAMAFACTORY_VERBOSITY": "WARN", "HF_HUB_OFFLINE": "1",
                   "DISABLE_VERSION_CHECK": "1", "PYTHONPATH": ""}
    subprocess.run([llamafactory_python, str(Path(__file__).with_name("llamafactory_oracle.py")), str(output)],
                   input=json.dumps(request), text=True, check=True, capture_output=True, env=environment,
                   timeout=600)
    result = json.loads(output.read_text())
    by_case = {(case["template"], case["tokenizer"], case["enable_thinking"], case["rows_name"]): answer
               for case, answer in zip(cases, result["cases"])}
    return {"probes": result["probes"], "cases": by_case}


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
            answer = llamafactory_ids["cases"][(name, key, thinking, "rows")]
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
    exported = llamafactory_ids["cases"][(name, "llama", True, "rows")]["jinja"]
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
                             truncation_mode="keep_start", template=name)
    prepared = prepare_data(config, tokenizers["gpt2"][1], demo)
    expected = llamafactory_ids["cases"][(name, "gpt2", True, demo)]["rows"]
    rows = prepared.train.dataset.to_list()
    assert [row["row"] for row in rows] == list(range(DEMO_ROWS))
    for row, theirs in zip(rows, expected):
        assert "error" not in theirs, theirs.get("error")
        assert {key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} == {
            key: theirs[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}, f"{demo} row {row['row']}"
