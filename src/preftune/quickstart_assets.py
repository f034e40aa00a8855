"""Everything the offline quickstart needs, built in code: a tokenizer, a tiny model and a toy preference task.

Nothing here is downloaded or copied: `preftune quickstart` must run on a laptop with no network and no
shared asset folder. The pieces are deliberately small so that DPO trains to a clear result on two CPU cores
in about a minute.

The toy task: a user asks an assistant to do a chore ("user : can you fix the lamp ? assistant :"). The
preferred ("chosen") reply is polite and helpful ("sure , i will fix the lamp now ."); the dispreferred
("rejected") reply is rude or refuses ("no , fix the lamp yourself ."). Verbs, objects and reply templates
are drawn at random, so every pair differs. The held-out split asks about (verb, object) combinations that
never occur in training, and about some objects that never occur in training at all, so a high held-out
reward accuracy means the model learnt "polite and helpful beats rude", not the training rows.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from preftune.errors import ConfigError

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

CHORE_VERBS = ("clean", "fix", "check", "paint", "move", "wash", "open", "close", "carry", "sort", "fold", "fill")
TRAIN_OBJECTS = (
    "window", "door", "lamp", "table", "chair", "car", "bike", "garden", "kitchen", "roof",
    "fence", "desk", "shelf", "box", "bag", "sink", "floor", "wall", "gate", "bed",
)  # fmt: skip
HELD_OUT_OBJECTS = ("boat", "oven", "clock", "radio")
"""Objects that appear only in the held-out split (they are in the vocabulary, never in a training row)."""

PROMPT_TEMPLATES = (
    "user : can you {verb} the {obj} ? assistant :",
    "user : please {verb} the {obj} . assistant :",
    "user : could you {verb} the {obj} today ? assistant :",
)
# Replies start with a space: TRL's convention for text rows is that prompt + reply is the full text.
CHOSEN_TEMPLATES = (
    " sure , i will {verb} the {obj} now .",
    " of course , i can {verb} the {obj} for you .",
    " gladly , i will {verb} the {obj} right away .",
    " happy to help , the {obj} will be done soon .",
)
REJECTED_TEMPLATES = (
    " no , {verb} the {obj} yourself .",
    " not my job , go away .",
    " whatever , i do not care about the {obj} .",
    " ask someone else , i am busy .",
)

HELD_OUT_COMBINATION_FRACTION = 0.15
"""Fraction of (verb, training object) combinations reserved for the held-out split."""

QUICKSTART_DATA_SIZES = {"n_train": 512, "n_eval": 128}
"""Row counts of the quickstart's training and held-out splits."""

QUICKSTART_TRAINING = {
    "beta": 0.1,
    "loss_type": ["sigmoid"],
    "learning_rate": 5e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "gradient_accumulation_steps": 1,
    "max_steps": 120,
    "max_length": 64,
    "eval_strategy": "steps",
    "eval_steps": 20,
    "logging_steps": 10,
    "seed": 0,
}
"""Recommended DPO settings for the quickstart, under TRL `DPOConfig` field names (`DPOConfig(**QUICKSTART_TRAINING)`
is valid). With `QUICKSTART_DATA_SIZES` this is 120 steps of 16 pairs (3.75 epochs of 512 pairs); TRL 1.16 trains it
in about 6 s on 2 CPU cores and reaches held-out `eval_rewards/accuracies` 1.0 for seeds 0, 1 and 2."""


def quickstart_vocabulary() -> list[str]:
    """Every token the quickstart tokenizer knows: the special tokens first, then each word once, in a fixed order.

    The words are exactly those of the prompt/reply templates and the content lists, so any text produced by
    `build_preference_data` tokenizes without `<unk>`.
    """
    words: list[str] = []
    texts = [*PROMPT_TEMPLATES, *CHOSEN_TEMPLATES, *REJECTED_TEMPLATES]
    for text in texts:
        for word in text.replace("{verb}", " ").replace("{obj}", " ").split():
            words.append(word)
    words.extend(CHORE_VERBS)
    words.extend(TRAIN_OBJECTS)
    words.extend(HELD_OUT_OBJECTS)
    vocabulary = list(SPECIAL_TOKENS)
    for word in words:
        if word not in vocabulary:
            vocabulary.append(word)
    return vocabulary


def build_tokenizer(save_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `quickstart_vocabulary()`, built in code with the `tokenizers` library.

    Text is split on whitespace and punctuation; each word is one token, unknown words map to `<unk>`.
    Encoding with special tokens prepends `<s>` (BOS); decoding joins tokens with single spaces, so text
    written with spaces around punctuation (as every quickstart row is) round-trips exactly.
    `<pad>`, `<unk>`, `<s>`, `</s>` are the pad, unk, bos and eos tokens.

    When `save_dir` is given the tokenizer is written there with `save_pretrained`, loadable by
    `AutoTokenizer.from_pretrained(save_dir)`.
    """
    vocabulary = quickstart_vocabulary()
    token_to_id = {token: index for index, token in enumerate(vocabulary)}
    backend = Tokenizer(WordLevel(vocab=token_to_id, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = Whitespace()
    backend.post_processor = TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, token_to_id[BOS_TOKEN])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(save_dir)
        logger.info("saved quickstart tokenizer (%d tokens) to %s", len(tokenizer), save_dir)
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, save_dir: Path | None = None
) -> LlamaForCausalLM:
    """A tiny randomly initialised Llama (about 88K parameters) sized to `tokenizer`.

    Hidden size 64, 2 layers, 4 attention heads, MLP size 128, 128 positions, tied input/output embeddings,
    no dropout. The same `seed` gives the same weights; the global torch RNG state is left untouched.
    When `save_dir` is given the model is written there as safetensors, loadable by
    `AutoModelForCausalLM.from_pretrained(save_dir)`.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(save_dir, safe_serialization=True)
        logger.info("saved quickstart model (%d parameters) to %s", model.num_parameters(), save_dir)
    return model


def _split_combinations(rng: random.Random) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(verb, object) combinations for training and for the held-out split; the two lists are disjoint."""
    seen_objects = [(verb, obj) for verb in CHORE_VERBS for obj in TRAIN_OBJECTS]
    rng.shuffle(seen_objects)
    n_held_out = round(HELD_OUT_COMBINATION_FRACTION * len(seen_objects))
    train_combinations = sorted(seen_objects[n_held_out:])
    held_out = sorted(seen_objects[:n_held_out]) + [(verb, obj) for verb in CHORE_VERBS for obj in HELD_OUT_OBJECTS]
    return train_combinations, held_out


def _draw_rows(combinations: list[tuple[str, str]], n_rows: int, rng: random.Random, split: str) -> list[dict]:
    """`n_rows` distinct preference rows drawn from `combinations` with random prompt and reply templates."""
    capacity = len(combinations) * len(PROMPT_TEMPLATES) * len(CHOSEN_TEMPLATES) * len(REJECTED_TEMPLATES)
    if n_rows > capacity:
        raise ConfigError(
            f"the {split} split holds at most {capacity} distinct pairs, {n_rows} were asked for",
            key="n_train" if split == "train" else "n_eval",
        )
    rows: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    while len(rows) < n_rows:
        verb, obj = rng.choice(combinations)
        fill = {"verb": verb, "obj": obj}
        row = {
            "prompt": rng.choice(PROMPT_TEMPLATES).format(**fill),
            "chosen": rng.choice(CHOSEN_TEMPLATES).format(**fill),
            "rejected": rng.choice(REJECTED_TEMPLATES).format(**fill),
        }
        key = (row["prompt"], row["chosen"], row["rejected"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def build_preference_data(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows of the polite-assistant task, in TRL's standard text format.

    Each row is `{"prompt": str, "chosen": str, "rejected": str}`; `chosen` is the polite, helpful reply,
    `rejected` the rude or refusing one, both starting with a space so that prompt + reply is the full text.
    Rows are distinct within each split. No held-out prompt occurs in training: held-out rows ask about
    (verb, object) combinations absent from training, and `HELD_OUT_OBJECTS` appear only there.
    The same `seed` gives the same rows.

    Raises:
        ConfigError: a count is negative or exceeds the number of distinct pairs the split can hold.
    """
    if n_train < 0 or n_eval < 0:
        key = "n_train" if n_train < 0 else "n_eval"
        raise ConfigError(f"row counts must be non-negative, got n_train={n_train}, n_eval={n_eval}", key=key)
    rng = random.Random(seed)
    train_combinations, held_out_combinations = _split_combinations(rng)
    train_rows = _draw_rows(train_combinations, n_train, rng, "train")
    eval_rows = _draw_rows(held_out_combinations, n_eval, rng, "eval")
    return train_rows, eval_rows


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    """Write `rows` to `path` as JSON Lines (one object per line, UTF-8); create parent folders; return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def build_quickstart_workspace(workdir: Path, seed: int = 0) -> dict[str, Path]:
    """Build the quickstart's model, tokenizer and data under `workdir` and return their paths.

    Layout: `workdir/model` (model safetensors + config + tokenizer files), `workdir/data/train.jsonl`,
    `workdir/data/eval.jsonl`, with the row counts of `QUICKSTART_DATA_SIZES`. Returns
    `{"model_dir": ..., "train_file": ..., "eval_file": ...}`.
    """
    workdir = Path(workdir)
    model_dir = workdir / "model"
    tokenizer = build_tokenizer(save_dir=model_dir)
    build_model(tokenizer, seed=seed, save_dir=model_dir)
    train_rows, eval_rows = build_preference_data(
        QUICKSTART_DATA_SIZES["n_train"], QUICKSTART_DATA_SIZES["n_eval"], seed=seed
    )
    train_file = write_jsonl(train_rows, workdir / "data" / "train.jsonl")
    eval_file = write_jsonl(eval_rows, workdir / "data" / "eval.jsonl")
    logger.info("quickstart workspace ready in %s (%d train / %d eval pairs)", workdir, len(train_rows), len(eval_rows))
    return {"model_dir": model_dir, "train_file": train_file, "eval_file": eval_file}
