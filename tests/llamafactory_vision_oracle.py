"""Runs inside the LLaMA-Factory oracle venv (tests/test_templates_llamafactory.py creates it): encodes preference rows
WITH IMAGES as LLaMA-Factory's DPO data path does (the template's multimodal plugin expands each ``<image>``, then
`PairwiseDatasetProcessor.preprocess_dataset`), and computes the images' model inputs as its collator does
(`mm_plugin.get_mm_inputs`).

Input (stdin, JSON): {"processors": {key: saved processor folder}, "cases": [{"template", "processor" (a key),
"enable_thinking", "image_max_pixels", "image_min_pixels" (LLaMA-Factory's model arguments), "cutoff_len" (None: no
cutoff), "pixels" (whether to return pixel values), "rows": [{"system",
"prompt": [user/assistant messages with <image> placeholders], "chosen", "rejected", "images": [file paths]}]}]}.
Output: a torch file (the first argument) holding {"cases": [{"rows": [{"chosen_input_ids", "chosen_labels",
"rejected_input_ids", "rejected_labels", "image_tokens": [image tokens of each image], and when the case asks for
them "pixel_values", "image_grid_thw"} or {"error"}]}]}.

The processor is loaded from the folder as its parts (tokenizer, image processor: transformers without torchvision
cannot build the processor's video processor) and given the attributes LLaMA-Factory's `patch_processor` sets from
the model arguments (`image_max_pixels`, `image_min_pixels`). The Qwen3-VL plugin reads the video processor's
`merge_size` even for rows without videos: a stand-in with the image processor's.
"""

import copy
import json
import sys
import types

import torch
import transformers
from transformers import AutoTokenizer, ImageProcessingMixin

from llamafactory.data.processor import PairwiseDatasetProcessor
from llamafactory.data.template import get_template_and_fix_tokenizer


def patch_processor(processor, tokenizer, case):
    """What LLaMA-Factory's `llamafactory.model.patcher.patch_processor` sets (that module imports trl, which this
    environment does not have): the tokenizer and the model arguments it reads, here the case's pixel limits and
    ModelArguments' defaults for the rest."""
    processor.tokenizer = tokenizer
    processor.image_max_pixels, processor.image_min_pixels = case["image_max_pixels"], case["image_min_pixels"]
    processor.image_do_pan_and_scan, processor.crop_to_patches = False, False
    processor.video_max_pixels, processor.video_min_pixels = 256 * 256, 16 * 16
    processor.video_fps, processor.video_maxlen = 2.0, 128
    processor.use_audio_in_video, processor.audio_sampling_rate = False, 16000


def load_processor(folder, case):
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    # AutoImageProcessor of this transformers wants torchvision even for a PIL image processor: its class by name
    image_processor_class = getattr(transformers, ImageProcessingMixin.get_image_processor_dict(folder)[0][
        "image_processor_type"])
    image_processor = image_processor_class.from_pretrained(folder)
    processor = types.SimpleNamespace(image_processor=image_processor,
                                      video_processor=types.SimpleNamespace(merge_size=image_processor.merge_size),
                                      model_input_names=["input_ids", "attention_mask", "pixel_values",
                                                         "image_grid_thw"])
    patch_processor(processor, tokenizer, case)
    return tokenizer, processor


def data_args(case):
    return types.SimpleNamespace(template=case["template"], train_on_prompt=False, tool_format=None,
                                 default_system=None, enable_thinking=case["enable_thinking"], preserve_thinking=False,
                                 cutoff_len=case.get("cutoff_len") or 10**6)


def encode_row(template, tokenizer, processor, args, row, want_pixels):
    responses = [{"role": "assistant", "content": row["chosen"]}, {"role": "assistant", "content": row["rejected"]}]
    examples = {"_prompt": [row["prompt"]], "_response": [responses], "_system": [row["system"] or ""],
                "_tools": [""], "_images": [row["images"]], "_videos": [None], "_audios": [None]}
    pairwise = PairwiseDatasetProcessor(template=template, tokenizer=tokenizer, processor=processor, data_args=args)
    out = pairwise.preprocess_dataset(examples)
    encoded = {key: out[key][0] for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                            "rejected_labels")}
    plugin = template.mm_plugin
    merge = processor.image_processor.merge_size ** 2
    grids = plugin._get_mm_inputs(row["images"], [], [], processor)["image_grid_thw"]
    encoded["image_tokens"] = [int(grid.prod()) // merge for grid in grids]
    if not want_pixels:
        return encoded
    mm_inputs = plugin.get_mm_inputs(row["images"], [], [], [len(row["images"])], [0], [0],
                                     [encoded["chosen_input_ids"]], processor)
    encoded["pixel_values"] = mm_inputs["pixel_values"]
    encoded["image_grid_thw"] = mm_inputs["image_grid_thw"]
    return encoded


def run_case(case, folder):
    tokenizer, processor = load_processor(folder, case)
    args = data_args(case)
    template = get_template_and_fix_tokenizer(tokenizer, args)
    rows = []
    for row in case["rows"]:
        try:
            rows.append(encode_row(template, tokenizer, processor, args, copy.deepcopy(row), case["pixels"]))
        except Exception as error:  # noqa: BLE001 - reported to the test, which decides
            rows.append({"error": f"{type(error).__name__}: {error}"})
    return {"rows": rows}


def main():
    request = json.load(sys.stdin)
    cases = [run_case(case, request["processors"][case["processor"]]) for case in request["cases"]]
    torch.save({"cases": cases}, sys.argv[1])


if __name__ == "__main__":
    main()
