"""TRL 1.16's shipped training script `trl/scripts/dpo.py`, run with only its two imports changed to preftune's.

The script is read from the installed TRL at test time (it is TRL's code, not preftune's) and written to a scratch
folder with `DPOTrainer` and `DPOConfig` imported from preftune instead of TRL; everything else (TRL's parser,
`ModelConfig`, `get_peft_config`, the flags) stays TRL's. It trains the real stories260K model on a local dataset
folder and saves a model that reloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_training import STORY_PAIRS

trl = pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[1]
# The two import lines of TRL 1.16's dpo.py, and what a user writes instead.
IMPORTS = {
    "    from trl import DPOTrainer, get_dataset, get_peft_config, get_quantization_config\n":
        "    from preftune import DPOTrainer\n    from trl import get_dataset, get_peft_config, get_quantization_config\n",
    "    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments, TrlParser\n":
        "    from preftune import DPOConfig\n    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser\n",
}


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    text = (Path(trl.__file__).parent / "scripts" / "dpo.py").read_text()
    for line, replacement in IMPORTS.items():
        assert text.count(line) == 1, f"TRL's dpo.py no longer has the line {line.strip()!r}"
        text = text.replace(line, replacement)
    path = tmp_path_factory.mktemp("script") / "dpo_with_preftune.py"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dataset")
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS))
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS[:4]))
    return folder


def _run(script: Path, *flags: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(script), *flags], env=environment, capture_output=True, text=True,
                          timeout=600)


def _flags(model: Path, data: Path, output: Path) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(output),
            "--learning_rate", "1e-3", "--per_device_train_batch_size", "2", "--max_steps", "2",
            "--gradient_accumulation_steps", "2", "--no_remove_unused_columns", "--report_to", "none",
            "--logging_steps", "1", "--max_length", "64"]


@pytest.mark.slow
def test_dpo_script_full_training_with_eval_saves_a_model_that_reloads(script, dataset_dir, stories_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "full"
    run = _run(script, *_flags(stories_model_dir, dataset_dir, output), "--eval_strategy", "steps", "--eval_steps", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Training completed" in run.stdout
    history = json.loads((output / "log_history.json").read_text())
    assert [r["step"] for r in history if "eval_loss" in r] == [1, 2]
    assert "train_loss" in history[-1]
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    original = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    changed = [name for name, p in reloaded.named_parameters() if not p.equal(original.get_parameter(name))]
    assert changed  # the saved weights are the trained ones


@pytest.mark.slow
def test_dpo_script_with_use_peft_saves_an_adapter_that_reloads(script, dataset_dir, stories_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = tmp_path / "lora"
    run = _run(script, *_flags(stories_model_dir, dataset_dir, output), "--use_peft", "--lora_r", "4",
               "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj")
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stories_model_dir), output)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: LoRA's B starts at zero


def test_dpo_script_bad_flag_value_ends_with_a_message_naming_the_key(script, dataset_dir, stories_model_dir, tmp_path):
    run = _run(script, *_flags(stories_model_dir, dataset_dir, tmp_path / "bad"), "--beta", "-1")
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]  # the script does not catch errors: the last line is the error's
    assert "ConfigError" in last and "'beta'" in last and "> 0" in last, last
