"""The offline vision quickstart: a tiny vision-language model learns with DPO to name the colour of a square.

Everything is built in code, nothing is downloaded: a word-level tokenizer with Qwen2-VL's special tokens, a
Qwen2-VL-shaped model with a small vision tower (random init), its processor (a PIL image processor: no
torchvision), and synthetic images drawn with PIL. Each image is a grey canvas holding one coloured square at a
random place and size; the prompt asks "what colour is the square ?", the chosen answer names the square's colour,
the rejected one another colour (each training image gives a pair for every wrong colour). The answers differ only in the colour word and every colour is as often chosen
as rejected, so only a model that looks at the image can prefer the chosen answer. The held-out pairs are new
images (squares of sizes never drawn for training).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from preftune.config import DPOConfig

logger = logging.getLogger(__name__)

COLOURS = {"red": (215, 35, 35), "green": (35, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 30)}
BACKGROUND = (128, 128, 128)
IMAGE_SIZE = 56  # 4x4 patches of 14 pixels, merged 2x2: 4 image tokens per image
QUESTIONS = ("what colour is the square ?", "which colour does the square have ?", "name the colour of the square .")
ANSWERS = ("the square is {colour} .", "it is {colour} .")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
CHAT_TEMPLATE = (  # Qwen2-VL's turn markers; image parts become <|vision_start|><|image_pad|><|vision_end|>
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
VISION_QUICKSTART_SIZES = {"n_train_images": 256, "n_eval": 96}  # 3 train pairs per image, 1 per held-out image
VISION_QUICKSTART_TRAINING = {
    "beta": 0.5,
    "loss_type": ["sigmoid"],
    "learning_rate": 5e-3,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 5,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "max_steps": 120,
    "max_length": 64,
    "eval_strategy": "steps",
    "eval_steps": 40,
    "logging_steps": 10,
    "seed": 0,
    "freeze_vision_tower": False,
    "freeze_multi_modal_projector": False,
}
"""DPO settings of the vision quickstart (`DPOConfig` field names). The vision tower and projector train too: at
random init they do not tell the colours apart well enough for the language model alone."""
TARGET_EVAL_ACCURACY = 0.9


# ------------------------------------------------------------------------------------------------------ assets


def build_processor(save_dir: Path | None = None) -> Any:
    """A Qwen2-VL processor: a word-level tokenizer over the task's words and Qwen2-VL's special tokens, and a PIL
    image processor (14-pixel patches, 2x2 merge) that keeps 56x56 images at their size."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from preftune.models import image_only_processor

    words = ["user", "assistant", *COLOURS]
    for text in QUESTIONS + ANSWERS:
        words += text.replace("{colour}", " ").split()
    vocabulary = list(SPECIAL_TOKENS) + list(dict.fromkeys(word for word in words if word not in SPECIAL_TOKENS))
    backend = Tokenizer(WordLevel(vocab={token: index for index, token in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>", clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[2:])})
    image_processor = Qwen2VLImageProcessorPil(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    processor = image_only_processor(Qwen2VLProcessor, image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    if save_dir is not None:
        processor.save_pretrained(save_dir)
    return processor


def build_model(processor: Any, seed: int = 0, save_dir: Path | None = None) -> Any:
    """A tiny Qwen2-VL (about 0.2M parameters): a 2-layer vision tower (width 32) and a 2-layer language model
    (width 64). The same seed gives the same weights; the global RNG is left alone."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = processor.tokenizer
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=processor.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    if save_dir is not None:
        model.save_pretrained(save_dir)
    return model


def draw_image(colour: str, size: int, rng: random.Random) -> Any:
    """A grey canvas with a ``size``-pixel square of ``colour`` at a random place."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    x, y = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
    ImageDraw.Draw(image).rectangle([x, y, x + size - 1, y + size - 1], fill=COLOURS[colour])
    return image


TRAIN_SQUARE_SIZES = (30, 32, 34, 38, 40, 42)
HELD_OUT_SQUARE_SIZES = (33, 36, 41)


def build_rows(count: int, sizes: tuple[int, ...], image_dir: Path, rng: random.Random,
               every_wrong_colour: bool = False) -> list[dict]:
    """Pairs in TRL's vision format over ``count`` new images (squares of ``sizes``), the images saved as PNG under
    ``image_dir`` (paths relative to its parent). One pair per image with a random wrong colour as the rejected
    answer, or with ``every_wrong_colour`` one pair per wrong colour (``len(COLOURS) - 1`` pairs per image)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        colour = rng.choice(list(COLOURS))
        others = [other for other in COLOURS if other != colour]
        wrong_colours = others if every_wrong_colour else [rng.choice(others)]
        name = f"{index:05d}.png"
        draw_image(colour, rng.choice(sizes), rng).save(image_dir / name)
        answer, question = rng.choice(ANSWERS), rng.choice(QUESTIONS)
        rows += [{
            "images": [f"{image_dir.name}/{name}"],
            "prompt": [{"role": "user", "content": "<image>" + question}],
            "chosen": [{"role": "assistant", "content": answer.format(colour=colour)}],
            "rejected": [{"role": "assistant", "content": answer.format(colour=wrong)}],
        } for wrong in wrong_colours]
    return rows


def build_vision_workspace(workdir: Path, seed: int = 0) -> dict[str, Path]:
    """The model folder (weights + processor) and the train/eval JSONL files (images next to them) under
    ``workdir``; returns ``{"model_dir", "train_file", "eval_file"}``."""
    workdir = Path(workdir)
    model_dir, data_dir = workdir / "model", workdir / "data"
    processor = build_processor(save_dir=model_dir)
    build_model(processor, seed=seed, save_dir=model_dir)
    rng = random.Random(seed)
    files = {}
    for split, count, sizes in (("train", VISION_QUICKSTART_SIZES["n_train_images"], TRAIN_SQUARE_SIZES),
                                ("eval", VISION_QUICKSTART_SIZES["n_eval"], HELD_OUT_SQUARE_SIZES)):
        rows = build_rows(count, sizes, data_dir / f"images_{split}", rng, every_wrong_colour=split == "train")
        files[split] = data_dir / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"model_dir": model_dir, "train_file": files["train"], "eval_file": files["eval"]}


# ------------------------------------------------------------------------------------------------------- run


def vision_quickstart_config(workspace: dict[str, Path], output_dir: Path) -> DPOConfig:
    """The DPOConfig of the vision quickstart over a built workspace."""
    return DPOConfig(model_name_or_path=str(workspace["model_dir"]), dataset=str(workspace["train_file"]),
                     eval_dataset=str(workspace["eval_file"]), output_dir=str(output_dir), save_strategy="no",
                     overwrite_cache=True, report_to=[], **VISION_QUICKSTART_TRAINING)


def run_vision_quickstart(output_dir: str | Path = "output/quickstart-vision") -> dict[str, Any]:
    """Build the workspace under ``output_dir/workspace``, train into ``output_dir/run``, print what happened;
    returns the run's summary."""
    from preftune.trainer import DPOTrainer

    output_dir = Path(output_dir)
    start = time.perf_counter()
    workspace = build_vision_workspace(output_dir / "workspace")
    config = vision_quickstart_config(workspace, output_dir / "run")
    result = DPOTrainer(args=config).train()
    elapsed = time.perf_counter() - start
    summary = result.metrics
    accuracy = summary["eval"]["rewards/accuracies"]
    verdict = "reached" if accuracy >= TARGET_EVAL_ACCURACY else "did NOT reach"
    print("\n".join([
        "",
        "preftune quickstart --vision: DPO on images (name the colour of the square)",
        f"  model     {workspace['model_dir']} (tiny Qwen2-VL built from scratch, random init)",
        f"  data      {summary['data']['train']['pairs_used']} train / {summary['data']['eval']['pairs_used']} held-out "
        f"pairs in {Path(workspace['train_file']).parent} (images drawn with PIL)",
        f"  training  {result.global_step} steps, beta {config.beta}, {summary['runtime_seconds']:.1f} s training, "
        f"{elapsed:.1f} s in all",
        f"  held-out  eval_loss {summary['eval']['loss']:.4f}, eval_rewards/accuracies {accuracy:.3f}",
        f"  outputs   {config.output_dir}",
        f"  held-out accuracy {verdict} the target {TARGET_EVAL_ACCURACY}",
    ]))
    return summary
