"""Benchmark cases: a model directory, a tokenizer and preference pairs that every engine reads identically.

``build_case(name, root, ...)`` writes ``root/<case>/``:

- ``model/``: the model (safetensors, float32) and its tokenizer; policy and reference are both loaded from here.
- ``rows.jsonl``: explicit-prompt text pairs ``{"prompt", "chosen", "rejected"}`` in source order.
- ``case.json``: settings (max_length, model sizes for the FLOP count) and, per row, the token lengths
  ``[prompt, chosen completion, rejected completion]`` after EOS, the prefix rule and ``keep_start`` truncation
  (the text-pair rule that TRL 1.16 and preftune share), so a worker can state how many tokens a batch holds
  without asking either engine.

Cases:
- ``a``: random-init Llama (hidden 256, 4 layers, 4 heads, MLP 688, vocab 32000: 19.5 M parameters) on synthetic
  pairs of a word-level tokenizer ("w4" .. "w31999", one token per word, so lengths are exact): prompts of 65–220
  tokens, completions of 33–293 tokens including EOS; max_length 1024 (nothing is cut).
- ``b``: the same body with the GPT-2 tokenizer (50,257 tokens + a pad token: vocab 50,258) on HH-RLHF helpful-base
  test pairs; max_length 1024.
- ``c``: the real stories260K Llama (pad = unk) on HH-RLHF helpful-base test pairs; max_length 512.

Smoke variants shrink models (case a: hidden 64, 2 layers, vocab 512) and data so that a run takes seconds.

Case ``d`` (long pairs) is built per length point by ``build_long_pair_case``: a random-init Qwen2-shaped model
(hidden 256, 4 layers, 4 heads / 2 key-value heads, MLP 688, untied, the GPT-2 tokenizer + ``<|pad|>``: vocab
50,258) and pairs of exact token lengths made of single-token GPT-2 words.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from preftune.data.tokenize import common_prefix_length

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("PREFTUNE_SHARED", REPO_ROOT.parent / "shared"))
ASSETS = SHARED_DIR / "assets"
HH_HELPFUL_TEST = ASSETS / "hh-rlhf-test" / "helpful-base-test.jsonl.gz"
GPT2_TOKENIZER = ASSETS / "gpt2-tokenizer"
STORIES_MODEL = ASSETS / "stories260K-hf"
ASSISTANT_TAG = "\n\nAssistant:"

CASES = ("a", "b", "c")
LONG_CASES = ("d",)  # long pairs: not part of "all" (a run takes an hour on 2 cores)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass
class CaseSettings:
    """What a case is: its description, ``max_length`` and the synthetic-model shape (cases a and b)."""

    name: str
    description: str
    max_length: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    vocab_size: int = 32000
    num_key_value_heads: int | None = None
    architecture: str = "llama"


def case_settings(name: str, *, smoke: bool = False) -> CaseSettings:
    """The settings of case ``name`` (``a``, ``b`` or ``c``); ``smoke`` shrinks the synthetic models."""
    if name == "a":
        settings = CaseSettings("a", "random-init Llama 19.5M, word-level vocab 32000, synthetic pairs", max_length=1024)
    elif name == "b":
        settings = CaseSettings("b", "random-init Llama body, GPT-2 tokenizer (vocab 50258), HH-RLHF pairs", 1024, vocab_size=50258)
    elif name == "c":
        settings = CaseSettings("c", "stories260K Llama (real), HH-RLHF pairs", max_length=512)
    else:
        raise ValueError(f"unknown case {name!r}; expected one of {', '.join(CASES)}")
    if smoke:
        settings.hidden_size, settings.num_layers, settings.num_heads, settings.intermediate_size = 64, 2, 2, 172
        if name == "a":
            settings.vocab_size, settings.max_length = 512, 256
        if name == "b":
            settings.max_length = 256
        if name == "c":
            settings.max_length = 256
        settings.description += " [smoke]"
    return settings


# ----------------------------------------------------------------------------------------------- tokenizers
def word_level_tokenizer(vocab_size: int):
    """A tokenizer with ids 0-3 = <pad> <s> </s> <unk> and id i = the word ``w{i}`` (whitespace-split, no BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def gpt2_tokenizer_with_pad():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def stories_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(STORIES_MODEL))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


# ------------------------------------------------------------------------------------------------------ data
def synthetic_rows(count: int, vocab_size: int, *, seed: int = 0, smoke: bool = False) -> list[dict]:
    """Random word pairs: prompts of 65–220 words, completions of 32–292 words (+ EOS = 33–293 tokens)."""
    rng = random.Random(seed)
    prompt_range, completion_range = ((9, 40), (4, 30)) if smoke else ((65, 220), (32, 292))
    words = lambda n: " ".join(f"w{rng.randrange(len(SPECIAL_TOKENS), vocab_size)}" for _ in range(n))  # noqa: E731
    rows = []
    for _ in range(count):
        prompt = words(rng.randint(*prompt_range))
        chosen = " " + words(rng.randint(*completion_range))
        rejected = " " + words(rng.randint(*completion_range))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def split_hh_pair(chosen: str, rejected: str) -> dict | None:
    """An HH-RLHF pair as ``{prompt, chosen, rejected}``: the prompt runs through the last ``\\n\\nAssistant:`` that
    both transcripts share; None when there is no shared assistant turn or a response is empty."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_TAG)
    if cut < 0:
        return None
    prompt = chosen[: cut + len(ASSISTANT_TAG)]
    chosen_response, rejected_response = chosen[len(prompt) :], rejected[len(prompt) :]
    if not chosen_response.strip() or not rejected_response.strip():
        return None
    return {"prompt": prompt, "chosen": chosen_response, "rejected": rejected_response}


def hh_rows(path: Path = HH_HELPFUL_TEST) -> list[dict]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            pair = split_hh_pair(record["chosen"], record["rejected"])
            if pair is not None:
                rows.append(pair)
    return rows


# ------------------------------------------------------------------------------------------- token lengths
def _encode(tokenizer, text: str) -> list[int]:
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def pair_lengths(tokenizer, row: dict, max_length: int) -> tuple[int, int, int] | None:
    """``(prompt, chosen, rejected)`` token counts as both engines tokenize a text pair, or None when the pair has
    no room (the prompt alone reaches ``max_length``): EOS appended to completions, prompt = the common prefix of
    the prompt's ids with both full sequences, completions cut at the end to ``max_length - prompt``."""
    eos = tokenizer.eos_token or ""
    chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
    rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
    prompt_ids = _encode(tokenizer, row["prompt"])
    chosen_full = _encode(tokenizer, row["prompt"] + chosen)
    rejected_full = _encode(tokenizer, row["prompt"] + rejected)
    prompt_len = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    if prompt_len == 0 or prompt_len >= max_length:
        return None
    room = max_length - prompt_len
    chosen_len = min(len(chosen_full) - prompt_len, room)
    rejected_len = min(len(rejected_full) - prompt_len, room)
    if chosen_len == 0 or rejected_len == 0:
        return None
    return prompt_len, chosen_len, rejected_len


# ---------------------------------------------------------------------------------------------------- build
def _random_llama(settings: CaseSettings, tokenizer, *, seed: int = 0):
    """A random-init causal LM of ``settings.architecture`` (``llama`` or ``qwen2``) and shape, float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        settings.architecture,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_key_value_heads or settings.num_heads,
        intermediate_size=settings.intermediate_size,
        vocab_size=settings.vocab_size,
        max_position_embeddings=max(2048, settings.max_length),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config).to(torch.float32)


def model_dimensions(model) -> dict:
    """Sizes for the FLOP count: body matmul parameters (2-D weights other than the input/output embeddings),
    hidden size, attention width (heads × head_dim), layers, vocabulary, total parameters."""
    config = model.config
    embedding_ids = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_ids.add(id(output.weight))
    body = sum(p.numel() for p in model.parameters() if p.ndim == 2 and id(p) not in embedding_ids)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "body_matmul_parameters": body,
        "hidden_size": config.hidden_size,
        "attention_width": config.num_attention_heads * head_dim,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
    }


def build_case(name: str, root: Path, *, pairs: int | None = None, smoke: bool = False, seed: int = 0) -> Path:
    """Write case ``name`` under ``root/<name>`` (see the module docstring) and return that directory.

    ``pairs`` caps the rows kept (after dropping pairs with no room); default 256 (16 in smoke mode).
    """
    from transformers import AutoModelForCausalLM

    settings = case_settings(name, smoke=smoke)
    wanted = pairs if pairs is not None else (16 if smoke else 256)
    if name == "a":
        tokenizer = word_level_tokenizer(settings.vocab_size)
        source_rows = synthetic_rows(wanted, settings.vocab_size, seed=seed, smoke=smoke)
        model = _random_llama(settings, tokenizer, seed=seed)
    elif name == "b":
        tokenizer = gpt2_tokenizer_with_pad()
        source_rows = hh_rows()
        model = _random_llama(settings, tokenizer, seed=seed)
    else:
        tokenizer = stories_tokenizer()
        source_rows = hh_rows()
        model = AutoModelForCausalLM.from_pretrained(str(STORIES_MODEL), dtype="float32")

    rows, lengths = [], []
    for row in source_rows:
        counted = pair_lengths(tokenizer, row, settings.max_length)
        if counted is None:
            continue
        rows.append(row)
        lengths.append(list(counted))
        if len(rows) == wanted:
            break

    return _write_case(Path(root) / name, settings, model, tokenizer, rows, lengths, smoke)


# ---------------------------------------------------------------------------------------- case d: long pairs
def long_pair_settings(prompt: int, completion: int, *, smoke: bool = False) -> CaseSettings:
    """Case d at one length point: a prompt of ``prompt`` tokens and two completions of ``completion`` tokens
    (EOS included); ``max_length`` leaves room, so nothing is cut. ``smoke`` shrinks the body (hidden 64, 2 layers)."""
    settings = CaseSettings(
        f"d-{prompt}+2x{completion}",
        f"random-init Qwen2 (hidden 256, 4 layers), GPT-2 vocab 50258, one pair of {prompt:,} + 2x{completion:,} tokens",
        max_length=prompt + completion + 8,
        num_heads=4,
        num_key_value_heads=2,
        vocab_size=50258,
        architecture="qwen2",
    )
    if smoke:
        settings.hidden_size, settings.num_layers, settings.num_heads, settings.num_key_value_heads = 64, 2, 2, 1
        settings.intermediate_size = 172
        settings.description += " [smoke]"
    return settings


def single_token_words(tokenizer) -> list[str]:
    """GPT-2 words that are one token with their leading space (``" the"``): letters only, 3-10 characters, each
    checked by encoding it; text made of them has exactly one token per word."""
    words = []
    for token in tokenizer.get_vocab():
        word = token[1:]
        if token.startswith("Ġ") and 3 <= len(word) <= 10 and word.isascii() and word.isalpha():
            words.append(" " + word)
    words.sort()
    return [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]


def long_pair_rows(tokenizer, count: int, prompt: int, completion: int, *, seed: int = 0) -> list[dict]:
    """``count`` pairs of random single-token words: a prompt of ``prompt`` tokens and two different completions of
    ``completion - 1`` words (the engines append EOS, so ``completion`` tokens)."""
    rng = random.Random(seed)
    vocabulary = single_token_words(tokenizer)
    text = lambda n: "".join(rng.choice(vocabulary) for _ in range(n))  # noqa: E731
    return [{"prompt": text(prompt), "chosen": text(completion - 1), "rejected": text(completion - 1)} for _ in range(count)]


def build_long_pair_case(root: Path, prompt: int, completion: int, *, pairs: int, smoke: bool = False, seed: int = 0) -> Path:
    """Write case d at one length point under ``root/<settings.name>`` (same layout as ``build_case``) and return
    that directory. Raises ValueError when the pairs do not tokenize to the requested lengths."""
    settings = long_pair_settings(prompt, completion, smoke=smoke)
    tokenizer = gpt2_tokenizer_with_pad()
    rows = long_pair_rows(tokenizer, pairs, prompt, completion, seed=seed)
    lengths = [pair_lengths(tokenizer, row, settings.max_length) for row in rows]
    if any(counted != (prompt, completion, completion) for counted in lengths):
        raise ValueError(f"case d: pairs tokenize to {lengths[:3]}, expected {(prompt, completion, completion)}")
    model = _random_llama(settings, tokenizer, seed=seed)
    return _write_case(Path(root) / settings.name, settings, model, tokenizer, rows, [list(c) for c in lengths], smoke)


def _write_case(case_dir: Path, settings: CaseSettings, model, tokenizer, rows: list[dict], lengths: list, smoke: bool) -> Path:
    model_dir = case_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    with open(case_dir / "rows.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    meta = {"settings": asdict(settings), "smoke": smoke, "pairs": len(rows), "model": model_dimensions(model), "lengths": lengths}
    (case_dir / "case.json").write_text(json.dumps(meta), encoding="utf-8")
    return case_dir


def load_case(case_dir: Path) -> tuple[dict, list[dict]]:
    """``(case.json contents, rows)`` of a built case."""
    case_dir = Path(case_dir)
    meta = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
    with open(case_dir / "rows.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return meta, rows
