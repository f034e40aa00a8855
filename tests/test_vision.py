"""Vision-language DPO: rows with images read from every format, tokenized by the processor, scored
by a vision-language model with the images' pixel values; step-1 loss, rewards and log-probs against TRL 1.16's
DPOTrainer (the oracle) on the same rows and weights, in the plain and the prefix-shared layouts (the layouts
checked against each other: tests/test_vision_layouts.py; Gemma 3's: tests/test_vision_gemma3.py). Tiny
random Qwen2-VL, Qwen3-VL, LLaVA and Gemma 3 built from configs; processors from the shared GPT-2 tokenizer and a
PIL image processor: nothing is downloaded."""

from __future__ import annotations

import copy
import json
import math
import logging

import datasets
import pytest
import torch
from conftest import shared_asset
from PIL import Image

from preftune.data.collate import collate_pairs, collate_shared_prefix
from preftune.data.formats import load_preference_data
from preftune.data.images import ImageInputs
from preftune.data.tokenize import TokenizeSettings, tokenize_dataset
from preftune.errors import ConfigError, DataError
from preftune.logprobs import pair_logprobs
from preftune.losses import preference_loss
from preftune.models import image_only_processor

# A Qwen2-VL-style chat template (image parts become <|vision_start|><|image_pad|><|vision_end|>).
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def coloured(name: str, size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, COLOURS[name])


def trl_rows() -> list[dict]:
    """TRL's vision format: an images list, a conversational prompt with an image part (sizes differ, so rows get
    different numbers of image tokens; one row has two images)."""
    questions = [("red", (56, 56), "What colour is the square?"), ("green", (84, 56), "图片是什么颜色？"),
                 ("blue", (40, 30), "Name the colour."), ("yellow", (28, 28), "Colour?")]
    rows = []
    for index, (colour, size, question) in enumerate(questions):
        images = [coloured(colour, size)] + ([coloured("blue", (28, 56))] if index == 1 else [])
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        wrong = "blue" if colour != "blue" else "red"
        rows.append({
            "images": images,
            "prompt": [{"role": "user", "content": parts}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {colour}."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {wrong}, I think."}]}],
        })
    return rows


def trl_rows_with_images_on_disk(tmp_path) -> tuple:
    """``trl_rows()`` with each image saved as a PNG under ``tmp_path/media`` and named by its file: (folder, rows)."""
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for index, row in enumerate(trl_rows()):
        names = []
        for number, image in enumerate(row["images"]):
            image.save(media / f"{index}-{number}.png")
            names.append(f"{index}-{number}.png")
        rows.append(dict(row, images=names))
    return media, rows


def gpt2_tokenizer_with(*special_tokens: str):
    """The shared GPT-2 tokenizer with a model family's special tokens added; padding with EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"))
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def processor():
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    tokenizer = gpt2_tokenizer_with("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                                    "<|im_start|>", "<|im_end|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 84)
    return image_only_processor(Qwen2VLProcessor, image_processor, tokenizer, chat_template=TEMPLATE)


def tiny_qwen2_vl(processor, seed: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = processor.tokenizer
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=processor.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval()


def tokenized_rows(rows, processor, max_length=None):
    loaded = load_preference_data(rows)
    return tokenize_dataset(loaded.dataset, processor, TokenizeSettings(max_length=max_length, chat_template=TEMPLATE))


def collated(dataset, processor, layout=collate_pairs):
    examples = list(dataset)
    collate = ImageInputs.of(processor).wrap(layout)
    return collate(examples, pad_token_id=processor.tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------------- parity


LLAVA_TEMPLATE = (  # turns end on a newline: tokens never merge across the prompt/completion boundary
    "{% for message in messages %}{{ message['role'] }}:\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)


@pytest.fixture(scope="module")
def llava_processor():
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = gpt2_tokenizer_with("<image>")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                          num_additional_image_tokens=1)


def tiny_llava(processor, seed: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=len(processor.tokenizer), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_id=processor.image_token_id, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def qwen3_vl_processor():
    """Qwen3-VL's processor (16-pixel patches) over the same tokenizer and chat template as the Qwen2-VL one."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    tokenizer = gpt2_tokenizer_with("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                                    "<|im_start|>", "<|im_end|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 96, patch_size=16)
    return image_only_processor(Qwen3VLProcessor, image_processor, tokenizer, chat_template=TEMPLATE)


def tiny_qwen3_vl(processor, seed: int):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = processor.tokenizer
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[1]),
        image_token_id=processor.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


# A Gemma-3-style chat template: an image part is <start_of_image>, which the processor expands into
# "\n\n<start_of_image>" + <image_soft_token> x image_seq_length + "<end_of_image>\n\n"; turns end on a newline.
GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}"
    "\n{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_gemma3_processor():
    """Gemma 3's processor over the shared GPT-2 tokenizer with Gemma's image tokens (named, as Gemma's tokenizer
    config names them: ``boi_token``, ``eoi_token``, ``image_token``) and turn markers, and the PIL image processor
    (no torchvision) resizing every image to 28 x 28; each image becomes 4 ``<image_soft_token>``s."""
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"), extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
                                 replace_extra_special_tokens=False)
    tokenizer.pad_token = tokenizer.eos_token
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE,
                           image_seq_length=4)


@pytest.fixture(scope="module")
def gemma3_processor():
    return tiny_gemma3_processor()


def tiny_gemma3(processor, seed: int):
    """A random Gemma 3 (SigLIP encoder of 4 x 4 patches of 7 pixels, pooled into 4 image tokens; a sliding-window
    layer of 16 tokens, shorter than the rows, and a global one). Its projector's weight, zeros at init (images
    would not count), is drawn at random."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = processor.tokenizer
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                         sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=7),
        mm_tokens_per_image=4, boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    return model


def check_parity_with_trl(processor, template, build, loss_type, tmp_path, shared=True):
    """TRL 1.16's DPOTrainer and preftune on the same rows, policy and reference: same input ids, pixel values and
    token types; loss, rewards and log-probs within 1e-4, in the plain layout and (``shared``) in the prefix-shared
    one (one row ``prompt | chosen | rejected`` per pair, each image encoded once)."""
    trl = pytest.importorskip("trl")
    logging.getLogger("trl").setLevel(logging.ERROR)
    policy, reference = build(processor, seed=0), build(processor, seed=1)
    beta = 0.2
    rows = trl_rows()
    args = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], loss_type=[loss_type],
                         beta=beta, per_device_train_batch_size=len(rows), max_length=None)
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=datasets.Dataset.from_list(trl_rows()), processing_class=processor)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False).item()
    mode = "train" if trainer.model.training else "eval"
    metrics = {key: values[-1] for key, values in trainer._metrics[mode].items()}

    loaded = load_preference_data(rows)
    tokenized = tokenize_dataset(loaded.dataset, processor, TokenizeSettings(max_length=None, chat_template=template))
    batch = collated(tokenized.dataset, processor)
    assert torch.equal(batch.input_ids, inputs["input_ids"])  # same tokens, image tokens expanded alike
    assert torch.equal(batch.model_inputs["pixel_values"], inputs["pixel_values"])
    for key in ("mm_token_type_ids", "token_type_ids"):  # 1 on image tokens: Qwen-VL's RoPE, Gemma 3's attention
        assert (key in batch.model_inputs) == (key in inputs), key
        assert key not in inputs or torch.equal(batch.model_inputs[key], inputs[key]), key
    layouts = [batch]
    if shared:
        shared_batch = collated(tokenized.dataset, processor, collate_shared_prefix)
        images_once = inputs["pixel_values"][: inputs["pixel_values"].shape[0] // 2]  # TRL: chosen rows' images first
        assert torch.equal(shared_batch.model_inputs["pixel_values"], images_once)
        layouts.append(shared_batch)
    for layout in layouts:
        check_layout_against_trl(policy, reference, layout, loss_type, beta, trl_loss, metrics)


def check_layout_against_trl(policy, reference, batch, loss_type, beta, trl_loss, metrics):
    with torch.no_grad():
        ours, ref = pair_logprobs(policy, batch), pair_logprobs(reference, batch)
    losses = preference_loss(loss_type, ours.chosen_logps, ours.rejected_logps, ref.chosen_logps, ref.rejected_logps,
                             beta=beta, chosen_lengths=ours.chosen_lengths, rejected_lengths=ours.rejected_lengths)
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-4)
    assert ours.chosen_logps.mean().item() == pytest.approx(metrics["logps/chosen"], abs=1e-4)
    assert ours.rejected_logps.mean().item() == pytest.approx(metrics["logps/rejected"], abs=1e-4)
    chosen_rewards = beta * (ours.chosen_logps - ref.chosen_logps)
    rejected_rewards = beta * (ours.rejected_logps - ref.rejected_logps)
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-4)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_qwen2_vl_step_one_loss_rewards_and_logps_equal_trl(processor, tmp_path, loss_type):
    check_parity_with_trl(processor, TEMPLATE, tiny_qwen2_vl, loss_type, tmp_path)


def test_qwen3_vl_step_one_loss_rewards_and_logps_equal_trl(qwen3_vl_processor, tmp_path):
    check_parity_with_trl(qwen3_vl_processor, TEMPLATE, tiny_qwen3_vl, "sigmoid", tmp_path)


def test_llava_step_one_loss_rewards_and_logps_equal_trl(llava_processor, tmp_path):
    check_parity_with_trl(llava_processor, LLAVA_TEMPLATE, tiny_llava, "sigmoid", tmp_path)


def test_the_images_change_the_log_probs(processor):
    """The pixel values reach the model: the same text with other images scores differently."""
    policy = tiny_qwen2_vl(processor, seed=0)
    rows = trl_rows()[:1]
    recoloured = copy.deepcopy(rows)
    recoloured[0]["images"] = [coloured("green", (56, 56))]
    with torch.no_grad():
        first = pair_logprobs(policy, collated(tokenized_rows(rows, processor).dataset, processor))
        second = pair_logprobs(policy, collated(tokenized_rows(recoloured, processor).dataset, processor))
    assert not torch.allclose(first.chosen_logps, second.chosen_logps)


# ------------------------------------------------------------------------------------------------------ data


def test_llamafactory_sharegpt_rows_read_images_relative_to_dataset_dir(tmp_path, processor):
    (tmp_path / "images").mkdir()
    coloured("red", (56, 56)).save(tmp_path / "images" / "0001.png")
    rows = [{"conversations": [{"from": "human", "value": "<image>这张图片里有什么颜色？"}],
             "chosen": {"from": "gpt", "value": "红色。"}, "rejected": {"from": "gpt", "value": "蓝色。"},
             "images": ["images/0001.png"]}]
    (tmp_path / "rlhf_v.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    registry = {"rlhf_v_local": {"file_name": "rlhf_v.json", "ranking": True, "formatting": "sharegpt",
                                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                             "images": "images"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    loaded = load_preference_data("rlhf_v_local", dataset_dir=str(tmp_path))
    row = loaded.dataset[0]
    assert row["prompt"] == [{"role": "user", "content": "<image>这张图片里有什么颜色？"}]
    assert row["images"] == [{"bytes": None, "path": str(tmp_path / "images" / "0001.png")}]
    tokenized = tokenize_dataset(loaded.dataset, processor, TokenizeSettings(max_length=None, chat_template=TEMPLATE))
    prompt_ids = tokenized.dataset[0]["prompt_ids"]
    # a 56x56 image in 14-pixel patches merged 2x2: 2x2 = 4 image tokens, between vision start and end
    tokens = processor.tokenizer.convert_ids_to_tokens(prompt_ids)
    start = tokens.index("<|vision_start|>")
    assert tokens[start + 1 : start + 6] == ["<|image_pad|>"] * 4 + ["<|vision_end|>"]


def test_images_as_bytes_paths_and_a_datasets_image_column_read_alike(tmp_path):
    coloured("red", (30, 20)).save(tmp_path / "a.png")
    text = {"prompt": [{"role": "user", "content": "Colour?"}], "chosen": [{"role": "assistant", "content": "red"}],
            "rejected": [{"role": "assistant", "content": "blue"}]}
    as_path = load_preference_data([dict(text, image=str(tmp_path / "a.png"))]).dataset[0]
    as_bytes = load_preference_data([dict(text, images=[(tmp_path / "a.png").read_bytes()])]).dataset[0]
    feature = datasets.Features({"image": datasets.Image(), "prompt": [{"role": datasets.Value("string"),
                                 "content": datasets.Value("string")}], "chosen": [{"role": datasets.Value("string"),
                                 "content": datasets.Value("string")}], "rejected": [{"role": datasets.Value("string"),
                                 "content": datasets.Value("string")}]})
    as_feature = load_preference_data(datasets.Dataset.from_list([dict(text, image=str(tmp_path / "a.png"))],
                                                                 features=feature)).dataset[0]
    from preftune.data.images import load_image

    pixels = [list(load_image(row["images"][0]).getdata()) for row in (as_path, as_bytes, as_feature)]
    assert pixels[0] == pixels[1] == pixels[2] == [COLOURS["red"]] * 600
    # a prompt without placeholders gets its images before the first user message's text (TRL's rule)
    assert as_path["prompt"] == [{"role": "user", "content": "<image>Colour?"}]


def test_a_missing_image_file_names_the_file_row_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"images": [], "prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant",
            "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    bad = dict(good, images=["missing.png"])
    path.write_text("\n".join(json.dumps(row) for row in (good, bad)) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_preference_data(str(path))
    assert (caught.value.file, caught.value.row, caught.value.field) == (str(path), 1, "images")
    assert f"image 0: file not found: {tmp_path / 'missing.png'}" in str(caught.value)
    skipped = load_preference_data(str(path), on_bad_row="skip")
    assert len(skipped.dataset) == 1 and skipped.skipped_rows[0][0] == 1


def test_a_file_that_is_not_an_image_and_a_count_mismatch_are_data_errors(tmp_path):
    (tmp_path / "fake.png").write_text("not an image", encoding="utf-8")
    row = {"images": ["fake.png"], "prompt": [{"role": "user", "content": "<image>Hi"}],
           "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match=r"row 0, field 'images': image 0 \(.*fake.png\) cannot be read as an image"):
        load_preference_data([row], dataset_dir=str(tmp_path))
    coloured("red", (28, 28)).save(tmp_path / "a.png")
    two_marks = dict(row, images=["a.png"], prompt=[{"role": "user", "content": "<image><image>Hi"}])
    with pytest.raises(DataError, match="row 0, field 'images': the row has 1 images but its prompt marks 2"):
        load_preference_data([two_marks], dataset_dir=str(tmp_path))


def test_a_video_column_is_still_refused():
    row = {"videos": ["clip.mp4"], "prompt": [{"role": "user", "content": "<video>Hi"}],
           "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match=r"field 'videos': not supported yet: video inputs \(column 'videos'\)"):
        load_preference_data([row], on_bad_row="skip")


def test_rows_with_images_need_a_processor(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"))
    loaded = load_preference_data(trl_rows()[:1])
    with pytest.raises(ConfigError, match="the data has images but processing_class is a tokenizer"):
        tokenize_dataset(loaded.dataset, tokenizer, TokenizeSettings(max_length=None, chat_template=TEMPLATE))


def test_truncation_never_cuts_an_images_tokens_it_drops_the_pair(processor):
    rows = trl_rows()
    full = tokenized_rows(rows, processor).dataset
    image_token = processor.image_token_id
    # keep_end cuts a pair's shared prompt at its start: len(prompt) + longest completion - max_length tokens.
    # Choose max_length so that row 1 (two images) loses its first image token and row 3 keeps everything.
    def overflow(row):
        return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))

    max_length = overflow(full[1]) - full[1]["prompt_ids"].index(image_token) - 1
    expected_kept = [i for i, row in enumerate(full)
                     if max(0, overflow(row) - max_length) <= row["prompt_ids"].index(image_token)]
    assert 1 not in expected_kept and expected_kept  # the case is the one meant
    loaded = load_preference_data(rows)
    cut = tokenize_dataset(loaded.dataset, processor, TokenizeSettings(max_length=max_length, chat_template=TEMPLATE,
                                                                       truncation_mode="keep_end"))
    assert [row["row"] for row in cut.dataset] == expected_kept
    assert cut.stats.dropped_no_room == [i for i in range(len(rows)) if i not in expected_kept]
    for row in cut.dataset:  # every kept pair keeps all of its image tokens
        assert row["prompt_ids"].count(image_token) == full[row["row"]]["prompt_ids"].count(image_token)


# ---------------------------------------------------------------------------------------------------- trainer


def vision_config(tmp_path, **overrides):
    from preftune.config import DPOConfig

    settings = dict(output_dir=str(tmp_path / "run"), learning_rate=1e-2, max_steps=1, logging_steps=1,
                    save_strategy="no", per_device_train_batch_size=4, max_length=None, seed=0, overwrite_cache=True,
                    report_to=[], beta=0.2)
    return DPOConfig(**(settings | overrides))


def trl_first_loss_and_metrics(trl, policy, reference, processor, tmp_path) -> tuple[float, dict]:
    """TRL 1.16's DPOTrainer (beta 0.2, batch 4) on ``trl_rows()`` with copies of ``policy`` and ``reference``: the
    loss of the first batch and its logged metrics (``rewards/*``, ``logps/*``), computed without a step."""
    logging.getLogger("trl").setLevel(logging.ERROR)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], beta=0.2,
                         per_device_train_batch_size=4, max_length=None)
    rows = trl_rows()
    oracle = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)
    inputs = oracle.data_collator([oracle.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        loss = oracle._compute_loss(oracle.model, inputs, return_outputs=False).item()
    mode = "train" if oracle.model.training else "eval"
    return loss, {key: values[-1] for key, values in oracle._metrics[mode].items()}


def tokenized_batch(processor, template, layout=collate_pairs):
    """``trl_rows()`` tokenized with ``template`` and collated in ``layout``."""
    loaded = load_preference_data(trl_rows())
    settings = TokenizeSettings(max_length=None, chat_template=template)
    return collated(tokenize_dataset(loaded.dataset, processor, settings).dataset, processor, layout)


def dpo_loss_and_gradients(policy, reference_logps, batch, **options):
    """Sigmoid DPO loss of ``batch`` against fixed reference log-probs: (log-probs, loss, every parameter's grad)."""
    policy.zero_grad(set_to_none=True)
    ours = pair_logprobs(policy, batch, **options)
    loss = preference_loss("sigmoid", ours.chosen_logps, ours.rejected_logps, *reference_logps, beta=0.2).mean()
    loss.backward()
    return ours, loss.detach(), {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}


def assert_same_logps_loss_and_gradients(first, second, atol=1e-5):
    """Two ``dpo_loss_and_gradients`` results agree within ``atol``; the vision encoder got gradients."""
    (logps_a, loss_a, grads_a), (logps_b, loss_b, grads_b) = first, second
    torch.testing.assert_close(logps_a.chosen_logps, logps_b.chosen_logps, atol=atol, rtol=0)
    torch.testing.assert_close(logps_a.rejected_logps, logps_b.rejected_logps, atol=atol, rtol=0)
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    assert any("visual" in name or "vision_tower" in name for name in grads_a)  # the encoder is trained too
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=0, msg=name)


@pytest.mark.slow
def test_the_trainers_first_step_loss_and_rewards_equal_trl(processor, tmp_path):
    trl = pytest.importorskip("trl")
    from preftune import DPOTrainer

    policy, reference = tiny_qwen2_vl(processor, seed=0), tiny_qwen2_vl(processor, seed=1)
    rows = trl_rows()
    trl_loss, metrics = trl_first_loss_and_metrics(trl, policy, reference, processor, tmp_path)

    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=vision_config(tmp_path),
                         train_dataset=rows, processing_class=processor)
    assert (trainer.layout.prefix_sharing, trainer.layout.padding_free) == (None, False)  # shared rows where they pay
    assert trainer.evaluate(eval_dataset=rows)["eval_loss"] == pytest.approx(trl_loss, abs=1e-4)
    trainer.train()
    first = next(record for record in trainer.state.log_history if "loss" in record)
    assert first["loss"] == pytest.approx(trl_loss, abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert first[key] == pytest.approx(metrics[key], abs=1e-4), key


def parameters_by_part(model):
    from preftune.model_setup import PROJECTOR_KEYS, VISION_TOWER_KEYS, is_under

    parts = {"vision": {}, "projector": {}, "language": {}}
    for name, parameter in model.named_parameters():
        part = "projector" if is_under(name, PROJECTOR_KEYS) else "vision" if is_under(name, VISION_TOWER_KEYS) \
            else "language"
        parts[part][name] = parameter.detach().clone()
    return parts


FAMILIES = {"qwen2_vl": ("processor", tiny_qwen2_vl), "qwen3_vl": ("qwen3_vl_processor", tiny_qwen3_vl),
            "llava": ("llava_processor", tiny_llava), "gemma3": ("gemma3_processor", tiny_gemma3)}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("freeze_vision_tower", "freeze_multi_modal_projector"), [(True, True), (False, False)])
def test_freeze_keys_decide_which_parts_train(request, tmp_path, family, freeze_vision_tower,
                                              freeze_multi_modal_projector):
    from preftune import DPOTrainer

    fixture, build = FAMILIES[family]
    processor = request.getfixturevalue(fixture)
    policy = build(processor, seed=0)
    before = parameters_by_part(policy)
    assert before["vision"] and before["projector"] and before["language"]
    trainer = DPOTrainer(model=policy, args=vision_config(tmp_path, freeze_vision_tower=freeze_vision_tower,
                                                          freeze_multi_modal_projector=freeze_multi_modal_projector),
                         train_dataset=trl_rows(), processing_class=processor)
    trainer.train()
    after = parameters_by_part(trainer.model)
    changed = {part: any(not torch.equal(before[part][name], after[part][name]) for name in before[part])
               for part in before}
    assert changed == {"vision": not freeze_vision_tower, "projector": not freeze_multi_modal_projector,
                       "language": True}


def test_lora_adapts_the_language_model_only_and_its_reference_is_the_adapter_disabled_model(processor, tmp_path):
    from preftune import DPOTrainer
    from preftune.model_setup import PROJECTOR_KEYS, VISION_TOWER_KEYS, is_under

    policy = tiny_qwen2_vl(processor, seed=0)
    trainer = DPOTrainer(model=policy, args=vision_config(tmp_path, finetuning_type="lora", lora_rank=4),
                         train_dataset=trl_rows(), processing_class=processor)
    adapted = [name for name, _ in trainer.model.named_parameters() if "lora_" in name]
    assert adapted and not any(is_under(name, VISION_TOWER_KEYS + PROJECTOR_KEYS) for name in adapted)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy = reference


@pytest.mark.slow
def test_a_model_folder_with_a_processor_config_loads_processor_and_model_and_sets_pixel_limits(processor, tmp_path):
    """LLaMA-Factory's way: only a model path. Its processor is loaded (joined from image processor and tokenizer
    without torchvision), image_max_pixels/image_min_pixels resize the images before the image processor, whose own
    limits stay (LLaMA-Factory's rule), and the images resolve against media_dir."""
    from preftune import DPOTrainer

    folder = tmp_path / "tiny-qwen2-vl"
    tiny_qwen2_vl(processor, seed=0).save_pretrained(folder)
    processor.save_pretrained(folder)
    media, rows = trl_rows_with_images_on_disk(tmp_path)
    trainer = DPOTrainer(model=str(folder), args=vision_config(tmp_path, image_max_pixels=28 * 28, image_min_pixels=28 * 28,
                                                              media_dir=str(media)),
                         train_dataset=rows)
    loaded = trainer.processing_class
    assert type(loaded).__name__ == "Qwen2VLProcessor" and loaded.image_max_pixels == loaded.image_min_pixels == 28 * 28
    assert loaded.image_processor.size.longest_edge == 56 * 84
    assert type(trainer.model).__name__ == "Qwen2VLForConditionalGeneration"
    # resized to about 28x28 pixels first (the image processor alone would give the first image 4 tokens): one 2x2
    # block of 14-pixel patches, merged into a single image token per image
    counts = [row["prompt_ids"].count(loaded.image_token_id) for row in trainer.data.train.dataset]
    assert counts == [1, 2, 1, 1]
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    saved = trainer.save_model(str(tmp_path / "out"))  # the processor is saved with the model and loads back
    from preftune.models import load_processor

    assert load_processor(str(saved)).image_processor.size.longest_edge == 56 * 84


def test_the_tokenization_cache_sees_an_image_file_replaced_under_the_same_name(processor, tmp_path):
    coloured("red", (28, 28)).save(tmp_path / "a.png")
    row = {"images": ["a.png"], "prompt": [{"role": "user", "content": "<image>Colour?"}],
           "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]}
    settings = TokenizeSettings(max_length=None, chat_template=TEMPLATE)

    def image_tokens():
        loaded = load_preference_data([row], dataset_dir=str(tmp_path))
        tokenized = tokenize_dataset(loaded.dataset, processor, settings, cache_dir=str(tmp_path / "cache"))
        return tokenized.dataset[0]["prompt_ids"].count(processor.image_token_id)

    assert image_tokens() == 1  # 28x28: one merged 2x2 block of patches
    coloured("red", (56, 56)).save(tmp_path / "a.png")
    assert image_tokens() == 4


def test_data_check_reads_rows_with_images(tmp_path, capsys):
    from preftune.cli import main

    coloured("red", (28, 28)).save(tmp_path / "a.png")
    row = {"images": ["a.png"], "prompt": [{"role": "user", "content": "<image>Colour?"}],
           "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert main(["data", "check", str(path)]) == 0


def test_unpaired_rows_with_images_are_refused(processor):
    row = {"images": [coloured("red", (28, 28))], "prompt": [{"role": "user", "content": "<image>Colour?"}],
           "completion": [{"role": "assistant", "content": "red"}], "label": True}
    loaded = load_preference_data([row, dict(row, label=False)])
    with pytest.raises(DataError, match="not supported yet: unpaired"):
        tokenize_dataset(loaded.dataset, processor, TokenizeSettings(max_length=None, chat_template=TEMPLATE))


def test_rows_with_the_same_text_and_other_images_are_not_duplicates_and_clean_files_keep_their_images(tmp_path):
    from preftune.cli import main

    for name in ("red", "green"):
        coloured(name, (28, 28)).save(tmp_path / f"{name}.png")
    text = {"prompt": [{"role": "user", "content": "<image>Colour?"}], "chosen": [{"role": "assistant", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "y"}]}
    rows = [dict(text, images=["red.png"]), dict(text, images=["green.png"]), dict(text, images=["red.png"])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert main(["data", "check", str(path), "--fix", str(tmp_path / "clean.jsonl")]) in (0, 1)
    clean = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["images"] for row in clean] == [[str(tmp_path / "red.png")], [str(tmp_path / "green.png")]]
    assert len(load_preference_data(str(tmp_path / "clean.jsonl")).dataset) == 2
