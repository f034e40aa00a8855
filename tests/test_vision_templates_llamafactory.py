"""Rows with images under LLaMA-Factory's Qwen-VL templates against LLaMA-Factory 0.9.5 itself: the same sharegpt
rows, images on disk and saved processor, the same token ids, labels, image tokens per image and pixel values.

LLaMA-Factory runs in the oracle environment of tests/test_templates_llamafactory.py (`llamafactory_python`, which has
Pillow for this); tests/llamafactory_vision_oracle.py encodes each row as its DPO data path does: the template's
multimodal plugin expands every ``<image>`` (``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch +
``<|vision_end|>``, after resizing the image to ``image_max_pixels``/``image_min_pixels``), then
`PairwiseDatasetProcessor`; and the pixel values as its collator asks the plugin for them. preftune reads the same
rows through its LLaMA-Factory reader (dataset_info.json, ``dataset_dir``), loads the processor from the same
folder with the same pixel limits (what a LLaMA-Factory YAML's keys do), tokenizes with ``template:`` and collates.

Processors (offline, `PROCESSORS`): the shared GPT-2 tokenizer with the model family's special tokens (Qwen-VL's;
dots.ocr's, whose template writes images with tokens of its own) and a Qwen2-VL (14-pixel patches) or Qwen3-VL
(16-pixel patches) image processor with the pixel limits of the released models' preprocessor configs, so that
LLaMA-Factory's limits and the image processor's own both matter. Images: random pixels of several sizes (tiny,
thin, a strip, larger than the limits) and modes (RGB, palette, greyscale), so that resizing shows in the pixel
values. Labels: preftune's are read off its plain batch's scoring plan (the token each position predicts).

Truncation (``cutoff_len``): one template with several cutoffs; a pair is cut as LLaMA-Factory cuts it, except one
whose cut would fall inside an image's tokens, which preftune drops (LLaMA-Factory keeps it, and its model then gets
fewer image tokens than image features).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_asset
from PIL import Image
from test_templates_llamafactory import ADDED_STEPS, INSTALL_STEPS, llamafactory_python, oracle_plan  # noqa: F401

from preftune.data.collate import collate_pairs
from preftune.data.formats import load_preference_data
from preftune.data.images import ImageInputs
from preftune.data.templates import TEMPLATES
from preftune.data.tokenize import TokenizeSettings, tokenize_dataset
from preftune.models import image_only_processor, load_processor

IGNORE = -100
QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")
DOTS_SPECIALS = ("<|img|>", "<|endofimg|>", "<|imgpad|>", "<|vidpad|>", "<|system|>", "<|endofsystem|>", "<|user|>",
                 "<|endofuser|>", "<|assistant|>", "<|endofassistant|>")
QWEN2_VL_IMAGES = dict(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
# key: (processor class, image processor settings as in the released model's preprocessor_config.json, the
# tokenizer's special tokens, the image token and the texts around an image's tokens)
PROCESSORS = {
    "qwen2_vl": ("Qwen2VLProcessor", QWEN2_VL_IMAGES, QWEN_SPECIALS,
                 ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")),
    "qwen3_vl": ("Qwen3VLProcessor", dict(patch_size=16, min_pixels=65536, max_pixels=16777216), QWEN_SPECIALS,
                 ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")),
    "dots_ocr": ("Qwen2VLProcessor", QWEN2_VL_IMAGES, DOTS_SPECIALS, ("<|img|>", "<|imgpad|>", "<|endofimg|>")),
}
PLUGIN_PROCESSOR = {"Qwen2VL": "qwen2_vl", "Qwen3VL": "qwen3_vl"}
VISION_TEMPLATES = sorted(name for name, template in TEMPLATES.items() if template.multimodal in PLUGIN_PROCESSOR)
# (image_max_pixels, image_min_pixels): LLaMA-Factory's defaults, and limits that resize most of IMAGES
PIXEL_LIMITS = ((768 * 768, 32 * 32), (128 * 128, 48 * 48))
# name: (width, height, PIL mode); LLaMA-Factory resizes an image in its own mode, then converts it to RGB
IMAGES = {"square": (64, 48, "RGB"), "tiny": (20, 20, "RGB"), "thin": (30, 60, "RGB"), "strip": (300, 10, "RGB"),
          "large": (900, 700, "RGB"), "palette": (1000, 30, "P"), "grey": (40, 20, "L")}
ROWS = [
    {"system": None, "prompt": [{"role": "user", "content": "<image>What colour is the square?"}],
     "chosen": "It is red.", "rejected": "It is blue, I think.", "images": ["square"]},
    {"system": None, "prompt": [{"role": "user", "content": "Compare <image> with <image>: which is larger?"}],
     "chosen": "The second one.", "rejected": "They are the same.", "images": ["tiny", "large"]},
    {"system": None, "prompt": [{"role": "user", "content": "<image>What is this?"},
                                {"role": "assistant", "content": "A thin rectangle."},
                                {"role": "user", "content": "And its colour?"}],
     "chosen": "Blue.", "rejected": "Green.", "images": ["thin"]},
    {"system": None, "prompt": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello! How can I help?"},
                                {"role": "user", "content": "Describe <image> briefly."}],
     "chosen": "A long yellow strip.", "rejected": "A cat.", "images": ["strip"]},
    {"system": None, "prompt": [{"role": "user", "content": "<image>\n图片里是什么颜色？"}],
     "chosen": "绿色。", "rejected": "我不知道。", "images": ["tiny"]},
    {"system": "You are a careful visual assistant.",
     "prompt": [{"role": "user", "content": "<image>Name the colour in one word."}],
     "chosen": "Red.", "rejected": "It could be many colours.", "images": ["square"]},
    {"system": "你是一个视觉助手。", "prompt": [{"role": "user", "content": "请描述<image>和<image>。"}],
     "chosen": "一个细长的矩形和一条黄色的带子。", "rejected": "两只猫。", "images": ["thin", "strip"]},
    {"system": None, "prompt": [{"role": "user", "content": "<image>What is in the first picture?"},
                                {"role": "assistant", "content": "Noise."},
                                {"role": "user", "content": "And in <image>?"}],
     "chosen": "More noise.", "rejected": "A dog.", "images": ["square", "large"]},
    {"system": None, "prompt": [{"role": "user", "content": "<image> <image> Which one is grey?"}],
     "chosen": "The second.", "rejected": "The first.", "images": ["palette", "grey"]},
]
# Truncation (cutoff_len / max_length) of rows with images: one template, the small pixel limits, these cutoffs (some
# keep the prompt whole, some cut into an image's tokens).
TRUNCATION_TEMPLATE, TRUNCATION_CUTOFFS = "qwen2_vl", (8, 24, 40, 64, 100)


def _thinking_modes(name: str) -> tuple[bool, ...]:
    return (True, False) if TEMPLATES[name].reasoning else (True,)


def _cases() -> list[dict]:
    """Every Qwen-VL template (both thinking modes of reasoning ones) with each of PIXEL_LIMITS; pixel values are
    compared on the first template of each processor (they do not depend on the template)."""
    cases, with_pixels = [], set()
    for name in VISION_TEMPLATES:
        for thinking in _thinking_modes(name):
            for max_pixels, min_pixels in PIXEL_LIMITS:
                pixels = (_processor_key(name), max_pixels) not in with_pixels
                cases.append(_case(name, thinking, max_pixels, min_pixels, None, pixels))
                with_pixels.add((_processor_key(name), max_pixels))
    for cutoff in TRUNCATION_CUTOFFS:
        cases.append(_case(TRUNCATION_TEMPLATE, True, *PIXEL_LIMITS[-1], cutoff, False))
    return cases


def _processor_key(name: str) -> str:
    return name if name in PROCESSORS else PLUGIN_PROCESSOR[TEMPLATES[name].multimodal]


def _case(name, thinking, max_pixels, min_pixels, cutoff, pixels) -> dict:
    return {"template": name, "processor": _processor_key(name), "enable_thinking": thinking,
            "image_max_pixels": max_pixels, "image_min_pixels": min_pixels, "cutoff_len": cutoff, "pixels": pixels}


def _write_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = {}
    for name, (width, height, mode) in IMAGES.items():
        paths[name] = folder / f"{name}.png"
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        image = image.convert(mode) if mode != "P" else image.quantize(colors=16)
        image.save(paths[name])
    return paths


def _write_processors(folder: Path) -> dict[str, Path]:
    """PROCESSORS saved under `folder`: the shared GPT-2 tokenizer with each one's special tokens and image token."""
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    saved = {}
    for key, (class_name, settings, specials, (_, image_token, _)) in PROCESSORS.items():
        tokenizer = AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"),
                                                  extra_special_tokens={"image_token": image_token})
        tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
        tokenizer.pad_token = tokenizer.eos_token
        processor = image_only_processor(getattr(transformers, class_name), Qwen2VLImageProcessorPil(**settings),
                                         tokenizer)
        saved[key] = folder / key
        processor.save_pretrained(saved[key])
    return saved


def _write_sharegpt(folder: Path, images: dict[str, Path]) -> None:
    """ROWS as a LLaMA-Factory sharegpt ranking set under `folder` (images relative to it, a system as the leading
    turn), registered as "vision_pairs" in its dataset_info.json."""
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    records = []
    for row in ROWS:
        turns = ([{"role": "system", "content": row["system"]}] if row["system"] else []) + row["prompt"]
        records.append({"conversations": [{"from": roles[turn["role"]], "value": turn["content"]} for turn in turns],
                        "chosen": {"from": "gpt", "value": row["chosen"]},
                        "rejected": {"from": "gpt", "value": row["rejected"]},
                        "images": [os.path.relpath(images[name], folder) for name in row["images"]]})
    (folder / "vision_pairs.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    entry = {"file_name": "vision_pairs.json", "ranking": True, "formatting": "sharegpt",
             "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}
    (folder / "dataset_info.json").write_text(json.dumps({"vision_pairs": entry}), encoding="utf-8")


@pytest.fixture(scope="module")
def vision_setup(tmp_path_factory) -> dict:
    """The data folder (sharegpt set + images), the saved processors and the image paths."""
    root = tmp_path_factory.mktemp("vision-templates")
    images = _write_images(root / "data" / "images")
    _write_sharegpt(root / "data", images)
    return {"data": root / "data", "processors": _write_processors(root / "processors"), "images": images}


@pytest.fixture(scope="module")
def llamafactory_vision(llamafactory_python, vision_setup, tmp_path_factory) -> dict:  # noqa: F811
    """LLaMA-Factory's output for every case of `_cases()`, by (template, thinking, max pixels, cutoff)."""
    cases = _cases()
    rows = [{**row, "images": [str(vision_setup["images"][name]) for name in row["images"]]} for row in ROWS]
    request = {"processors": {key: str(path) for key, path in vision_setup["processors"].items()},
               "cases": [{**case, "rows": rows} for case in cases]}
    output = tmp_path_factory.mktemp("llamafactory-vision-oracle") / "out.pt"
    environment = {**os.environ, "LLAMAFACTORY_VERBOSITY": "WARN", "HF_HUB_OFFLINE": "1",
                   "DISABLE_VERSION_CHECK": "1", "PYTHONPATH": ""}
    done = subprocess.run([llamafactory_python, str(Path(__file__).with_name("llamafactory_vision_oracle.py")),
                           str(output)], input=json.dumps(request), text=True, capture_output=True, env=environment,
                          timeout=600, check=False)
    assert done.returncode == 0, f"the LLaMA-Factory oracle failed: {done.stderr[-3000:]}"
    result = torch.load(output, weights_only=False)
    return {(case["template"], case["enable_thinking"], case["image_max_pixels"], case["cutoff_len"]): (case, answer)
            for case, answer in zip(cases, result["cases"])}


def _preftune_rows(vision_setup, case) -> tuple[object, list[dict]]:
    """(processor, tokenized rows) of the sharegpt set, as preftune reads it for a LLaMA-Factory config with the
    case's template and pixel limits."""
    processor = load_processor(str(vision_setup["processors"][case["processor"]]),
                               image_max_pixels=case["image_max_pixels"], image_min_pixels=case["image_min_pixels"])
    loaded = load_preference_data("vision_pairs", dataset_dir=str(vision_setup["data"]))
    settings = TokenizeSettings(max_length=case["cutoff_len"], template=case["template"],
                                enable_thinking=case["enable_thinking"])
    tokenized = tokenize_dataset(loaded.dataset, processor, settings).dataset
    return processor, tokenized.to_list()


def _sequences_and_labels(example: dict, pad_token_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """The chosen and rejected input ids of preftune's plain batch for one example, and their labels in
    LLaMA-Factory's form: the token at each position its scoring plan scores (predicted from the position before),
    IGNORE elsewhere."""
    batch = collate_pairs([example], pad_token_id=pad_token_id)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    labels = [[IGNORE] * length for length in lengths]
    for row, position, label in zip(batch.score_rows.tolist(), batch.score_positions.tolist(),
                                    batch.score_labels.tolist()):
        labels[row][position + 1] = label
    return [batch.input_ids[row, :lengths[row]].tolist() for row in range(2)], labels


def _image_runs(ids: list[int], start: int, pad: int, end: int) -> list[int]:
    """The number of image tokens between each <|vision_start|> and its <|vision_end|>, in order."""
    runs, inside = [], None
    for token in ids:
        if token == start:
            inside = 0
        elif token == end and inside is not None:
            runs.append(inside)
            inside = None
        elif token == pad and inside is not None:
            inside += 1
    return runs


def test_an_oracle_environment_is_rebuilt_when_its_install_steps_change_and_completed_when_steps_are_added():
    steps = [list(step) for step in INSTALL_STEPS]
    added = [list(step) for step in ADDED_STEPS]
    assert ADDED_STEPS and oracle_plan(None) == (True, list(ADDED_STEPS))
    assert oracle_plan({"steps": steps[:-1]}) == (True, list(ADDED_STEPS))
    assert oracle_plan({"steps": steps[::-1], "added_steps": added}) == (True, list(ADDED_STEPS))
    assert oracle_plan({"steps": steps}) == (False, list(ADDED_STEPS))  # built before ADDED_STEPS existed
    assert oracle_plan({"steps": steps, "added_steps": added[:-1]}) == (False, list(ADDED_STEPS[-1:]))
    assert oracle_plan({"steps": steps, "added_steps": added}) == (False, [])


@pytest.mark.parametrize("name", VISION_TEMPLATES)
def test_rows_with_images_get_llamafactorys_input_ids_labels_and_image_tokens(name, llamafactory_vision,
                                                                            vision_setup):
    compared = 0
    for thinking in _thinking_modes(name):
        for max_pixels, _ in PIXEL_LIMITS:
            case, answer = llamafactory_vision[(name, thinking, max_pixels, None)]
            processor, rows = _preftune_rows(vision_setup, case)
            tokenizer = processor.tokenizer
            start, pad, end = tokenizer.convert_tokens_to_ids(list(PROCESSORS[case["processor"]][3]))
            assert [row["row"] for row in rows] == list(range(len(ROWS)))
            for index, (row, theirs) in enumerate(zip(rows, answer["rows"])):
                where = f"{name} / enable_thinking={thinking} / image_max_pixels={max_pixels} / row {index}"
                assert "error" not in theirs, f"{where}: LLaMA-Factory failed: {theirs.get('error')}"
                (chosen, rejected), (chosen_labels, rejected_labels) = _sequences_and_labels(
                    row, tokenizer.pad_token_id)
                assert chosen == theirs["chosen_input_ids"], f"{where}: chosen input ids"
                assert rejected == theirs["rejected_input_ids"], f"{where}: rejected input ids"
                assert chosen_labels == theirs["chosen_labels"], f"{where}: chosen labels"
                assert rejected_labels == theirs["rejected_labels"], f"{where}: rejected labels"
                assert _image_runs(row["prompt_ids"], start, pad, end) == theirs["image_tokens"], f"{where}: images"
                assert len(theirs["image_tokens"]) == len(ROWS[index]["images"])
                compared += 1
    assert compared == len(ROWS) * len(PIXEL_LIMITS) * len(_thinking_modes(name))


@pytest.mark.parametrize("key", sorted(PROCESSORS))
def test_the_images_pixel_values_are_llamafactorys(key, llamafactory_vision, vision_setup):
    compared = 0
    for case, answer in llamafactory_vision.values():
        if case["processor"] != key or not case["pixels"]:  # pixel values do not depend on the template
            continue
        processor, rows = _preftune_rows(vision_setup, case)
        image_inputs = ImageInputs.of(processor)
        for index, (row, theirs) in enumerate(zip(rows, answer["rows"])):
            ours = image_inputs([row["images"]], torch.tensor([row["prompt_ids"]]))
            where = f"{key} / image_max_pixels={case['image_max_pixels']} / row {index}"
            assert ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist(), where
            torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5, msg=where)
            compared += 1
    assert compared == len(ROWS) * len(PIXEL_LIMITS)


def test_rows_with_images_are_cut_as_llamafactory_cuts_them_or_dropped_where_it_cuts_an_images_tokens(
        llamafactory_vision, vision_setup):
    # LLaMA-Factory's infer_seqlen may cut into an image's tokens (the model then fails on the batch: its pixel values
    # no longer match its image tokens); preftune drops such a pair and counts it (tokenize_dataset's stats)
    kinds = set()
    _, uncut = llamafactory_vision[(TRUNCATION_TEMPLATE, True, PIXEL_LIMITS[-1][0], None)]
    for cutoff in TRUNCATION_CUTOFFS:
        case, answer = llamafactory_vision[(TRUNCATION_TEMPLATE, True, PIXEL_LIMITS[-1][0], cutoff)]
        processor, rows = _preftune_rows(vision_setup, case)
        image_token = processor.image_token_id
        by_row = {row["row"]: row for row in rows}
        for index, theirs in enumerate(answer["rows"]):
            where = f"cutoff_len={cutoff} / row {index}"
            assert "error" not in theirs, f"{where}: LLaMA-Factory failed: {theirs.get('error')}"
            images_cut = theirs["chosen_input_ids"].count(image_token) < sum(theirs["image_tokens"])
            cut = len(theirs["chosen_input_ids"]) < len(uncut["rows"][index]["chosen_input_ids"])
            kinds.add("image cut" if images_cut else "cut" if cut else "whole")
            if images_cut:
                assert index not in by_row, f"{where}: kept with part of an image's tokens"
                continue
            assert index in by_row, where
            (chosen, rejected), (chosen_labels, rejected_labels) = _sequences_and_labels(
                by_row[index], processor.tokenizer.pad_token_id)
            assert (chosen, chosen_labels) == (theirs["chosen_input_ids"], theirs["chosen_labels"]), where
            assert (rejected, rejected_labels) == (theirs["rejected_input_ids"], theirs["rejected_labels"]), where
    assert kinds == {"image cut", "cut", "whole"}, kinds
