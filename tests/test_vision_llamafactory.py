"""LLaMA-Factory's vision-language DPO: rows with ``<image>`` under a named multimodal template (``qwen3_vl_nothink``)
get the model's image tokens as LLaMA-Factory's Qwen3-VL plugin writes them, and LLaMA-Factory's shipped
``examples/train_lora/qwen3vl_lora_dpo.yaml`` runs as given on a local ``rlhf_v``-format set (images on disk) with
only the model path, the dataset, the output folder and ``max_steps`` changed. Tiny random Qwen3-VL built from a
config; its processor from the shared GPT-2 tokenizer: nothing is downloaded."""

from __future__ import annotations

import json
import math

import pytest
from test_vision import coloured, gpt2_tokenizer_with, tiny_qwen3_vl

from preftune.data.formats import load_preference_data
from preftune.data.tokenize import TokenizeSettings, tokenize_dataset
from preftune.errors import ConfigError
from preftune.models import image_only_processor

# LLaMA-Factory's examples/train_lora/qwen3vl_lora_dpo.yaml, as given (a key: value file is data, not code).
QWEN3VL_LORA_DPO = """\
### model
model_name_or_path: Qwen/Qwen3-VL-4B-Instruct
image_max_pixels: 262144
video_max_pixels: 16384
trust_remote_code: true

### method
stage: dpo
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]

### dataset
dataset: rlhf_v
template: qwen3_vl_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-vl-4b/lora/dpo
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""
# LLaMA-Factory's data/dataset_info.json entry for rlhf_v, with the local file in place of its hf_hub_url.
RLHF_V_ENTRY = {"file_name": "rlhf_v.json", "ranking": True, "formatting": "sharegpt",
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                            "images": "images"}}
# (colour, image size, question, chosen, rejected): sizes differ, so rows take different numbers of image tokens.
RLHF_V_ROWS = [
    ("red", (64, 64), "<image>What colour is the square?", "It is red.", "It is blue, I think."),
    ("green", (96, 64), "<image>图片里是什么颜色？", "绿色。", "我不知道。"),
    ("blue", (64, 32), "Name the colour of <image> in one word.", "Blue.", "Red."),
    ("yellow", (32, 96), "<image>\nDescribe the image.", "A yellow square.", "A cat."),
]


@pytest.fixture(scope="module")
def processor():
    """Qwen3-VL's processor (16-pixel patches, 2x2 merge) over the shared GPT-2 tokenizer with Qwen's specials."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    tokenizer = gpt2_tokenizer_with("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                                    "<|im_start|>", "<|im_end|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=96 * 96, patch_size=16)
    return image_only_processor(Qwen3VLProcessor, image_processor, tokenizer)


def write_rlhf_v(folder) -> list[dict]:
    """An rlhf_v-format set under ``folder`` (images in folder/images, dataset_info.json); returns its rows."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for index, (colour, size, question, chosen, rejected) in enumerate(RLHF_V_ROWS):
        coloured(colour, size).save(folder / "images" / f"{index:04d}.png")
        rows.append({"conversations": [{"from": "human", "value": question}],
                     "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected},
                     "images": [f"images/{index:04d}.png"]})
    (folder / "rlhf_v.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"rlhf_v": RLHF_V_ENTRY}), encoding="utf-8")
    return rows


def expected_ids(processor, question: str, answer: str, size: tuple[int, int]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) written out by hand from LLaMA-Factory's qwen3_vl_nothink template (ChatML turns,
    EOS replaced by <|im_end|>) and its Qwen3-VL plugin (<image> -> <|vision_start|> + one <|image_pad|> per 2x2
    block of 16-pixel patches + <|vision_end|>), each template piece tokenized on its own."""
    tokenizer = processor.tokenizer
    blocks = (size[0] // 32) * (size[1] // 32)  # the sizes are multiples of 32 within the pixel limits
    image = "<|vision_start|>" + "<|image_pad|>" * blocks + "<|vision_end|>"
    user = "<|im_start|>user\n" + question.replace("<image>", image) + "<|im_end|>\n<|im_start|>assistant\n"

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    return encode(user), encode(answer) + encode("<|im_end|>") + encode("\n")


def test_images_under_a_named_template_expand_into_the_models_image_tokens(tmp_path, processor):
    write_rlhf_v(tmp_path)
    loaded = load_preference_data("rlhf_v", dataset_dir=str(tmp_path))
    settings = TokenizeSettings(max_length=2048, template="qwen3_vl_nothink")
    tokenized = tokenize_dataset(loaded.dataset, processor, settings).dataset
    assert len(tokenized) == len(RLHF_V_ROWS)
    for row, (_, size, question, chosen, rejected) in zip(tokenized, RLHF_V_ROWS):
        prompt_ids, chosen_ids = expected_ids(processor, question, chosen, size)
        _, rejected_ids = expected_ids(processor, question, rejected, size)
        assert row["prompt_ids"] == prompt_ids
        assert (row["chosen_ids"], row["rejected_ids"]) == (chosen_ids, rejected_ids)
        # as many image tokens as the image processor gives the collator pixel patches for
        assert row["prompt_ids"].count(processor.image_token_id) == (size[0] // 32) * (size[1] // 32)


def test_a_text_only_template_or_one_whose_plugin_is_not_written_yet_refuses_images(tmp_path, processor):
    write_rlhf_v(tmp_path)
    loaded = load_preference_data("rlhf_v", dataset_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="template 'qwen3_nothink' is text-only"):
        tokenize_dataset(loaded.dataset, processor, TokenizeSettings(max_length=None, template="qwen3_nothink"))
    with pytest.raises(ConfigError, match=r"not supported yet: rows with images under template 'llava'"):
        tokenize_dataset(loaded.dataset, processor, TokenizeSettings(max_length=None, template="llava"))


@pytest.mark.slow
def test_llamafactory_qwen3vl_lora_dpo_yaml_runs_as_shipped(tmp_path, processor):
    """Only model_name_or_path, dataset_dir, output_dir and max_steps changed: LoRA on the language model,
    image_max_pixels, video_max_pixels (no effect without videos), bf16 and the rest as LLaMA-Factory ships them."""
    from preftune.cli import main

    model_dir = tmp_path / "tiny-qwen3-vl"
    tiny_qwen3_vl(processor, seed=0).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    write_rlhf_v(tmp_path / "data")
    config = tmp_path / "qwen3vl_lora_dpo.yaml"
    config.write_text(QWEN3VL_LORA_DPO, encoding="utf-8")
    output = tmp_path / "saves"
    code = main(["train", str(config), f"model_name_or_path={model_dir}", f"dataset_dir={tmp_path / 'data'}",
                 f"output_dir={output}", "max_steps=2"])
    assert code == 0
    summary = json.loads((output / "summary.json").read_text(encoding="utf-8"))
    assert summary["data"]["train"]["pairs_used"] == len(RLHF_V_ROWS)
    history = json.loads((output / "log_history.json").read_text(encoding="utf-8"))
    losses = [record["loss"] for record in history if "loss" in record]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert (output / "adapter_model.safetensors").exists()
