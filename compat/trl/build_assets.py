"""Build, offline and deterministically, local stand-ins for the hub artifacts TRL's DPO tests load.

    python compat/trl/build_assets.py [ASSETS_DIR] [--gpt2-tokenizer DIR] [--force]

ASSETS_DIR (default /tmp/trl-compat-assets) receives ``trl-internal-testing/<name>/`` for every text model id and
dataset id used by TRL's ``tests/test_dpo_trainer.py``, so that ``"trl-internal-testing/<name>"`` can be replaced
by ``"ASSETS_DIR/trl-internal-testing/<name>"`` and loaded with ``from_pretrained`` / ``load_dataset``:

- models: tiny random causal LMs of each architecture (2 layers, hidden size 8-16), saved with
  ``save_pretrained`` in bfloat16 like the hub's tiny models, with a tokenizer built from GPT-2's byte-level BPE
  (``shared/assets/gpt2-tokenizer``) plus the special tokens and a chat template of the model's family
  (chat_templates.py). The vocabulary of each model is exactly the tokenizer's length.
  ``tiny-RemoteForCausalLM`` carries its own modeling code (``auto_map``): without ``trust_remote_code``
  transformers refuses it ("contains custom code"), with it the class ``RemoteForCausalLM`` loads.
- datasets: folders with a README.md whose YAML front matter declares the configs and their train/test parquet
  files (dataset_rows.py), loadable with ``load_dataset(folder, config, split=..., streaming=...)``.

Vision-language model ids and image datasets are not built (see ``NOT_BUILT``).
The build writes a stamp holding a fingerprint of this code and of the library versions; ``ensure_assets``
rebuilds when the stamp is missing or differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import chat_templates  # noqa: E402  (sibling module; this folder is not a package)
import dataset_rows  # noqa: E402

ORG = "trl-internal-testing"
DEFAULT_ASSETS = Path("/tmp/trl-compat-assets")
STAMP_NAME = ".build-stamp.json"

NOT_BUILT = {
    "tiny-Gemma3ForConditionalGeneration": "vision-language model (later issue)",
    "tiny-Gemma4ForConditionalGeneration": "vision-language model (later issue)",
    "tiny-Idefics2ForConditionalGeneration": "vision-language model (later issue)",
    "tiny-Idefics3ForConditionalGeneration": "vision-language model (later issue)",
    "tiny-LlavaForConditionalGeneration": "vision-language model (later issue)",
    "tiny-LlavaNextForConditionalGeneration": "vision-language model (later issue)",
    "tiny-Qwen2VLForConditionalGeneration": "vision-language model (later issue)",
    "tiny-Qwen2_5_VLForConditionalGeneration": "vision-language model (later issue)",
    "tiny-SmolVLMForConditionalGeneration": "vision-language model (later issue)",
    "tiny-Qwen3VLForConditionalGeneration": "vision-language model (later issue)",
    "tiny-Qwen3_5ForConditionalGeneration-NoThink": "vision-language model (later issue)",
    "tiny-Qwen3_5MoeForConditionalGeneration-3.6": "vision-language model (later issue)",
    "zen-image": "image dataset (later issue)",
    "zen-multi-image": "image dataset (later issue)",
}
"""Hub names TRL's DPO tests use that this script does not build, with the reason."""


def default_gpt2_tokenizer() -> Path:
    """shared/assets/gpt2-tokenizer beside the checkout, or under $PREFTUNE_SHARED (as tests/conftest.py does)."""
    shared = Path(os.environ.get("PREFTUNE_SHARED", REPO_ROOT.parent / "shared"))
    return shared / "assets" / "gpt2-tokenizer"


# -- tokenizers -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSpec:
    """A family's tokens on top of GPT-2's 50,257: `special` ones (never split, skipped when decoding with
    skip_special_tokens) and `extra` plain added tokens (e.g. <tool_call>, as Qwen has them)."""

    chat_template: str
    eos: str
    special: tuple[str, ...]
    extra: tuple[str, ...] = ()
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    adds_bos: bool = False  # the tokenizer puts `bos` before every encoded text, as Llama 3, Cohere and LFM2 do


GPT2_EOT = "<|endoftext|>"  # already in GPT-2's vocabulary (id 50256)

QWEN_TOKENS = dict(
    eos="<|im_end|>",
    pad=GPT2_EOT,
    special=(GPT2_EOT, "<|im_start|>", "<|im_end|>"),
    extra=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
)
TOKENIZERS = {
    "qwen2.5": TokenizerSpec(chat_template=chat_templates.QWEN2_5, **QWEN_TOKENS),
    "qwen3": TokenizerSpec(chat_template=chat_templates.QWEN3, **QWEN_TOKENS),
    "olmo3": TokenizerSpec(
        chat_template=chat_templates.OLMO3,
        eos=GPT2_EOT,
        pad="<|pad|>",
        special=(GPT2_EOT, "<|pad|>", "<|im_start|>", "<|im_end|>"),
        extra=("<think>", "</think>", "<functions>", "</functions>", "<function_calls>", "</function_calls>"),
    ),
    "nemotron-h": TokenizerSpec(
        chat_template=chat_templates.NEMOTRON_H,
        bos="<s>",
        eos="<|im_end|>",
        unk="<unk>",
        special=("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"),
        extra=("<think>", "</think>", "<tool_call>", "</tool_call>"),
    ),
    "lfm2": TokenizerSpec(
        chat_template=chat_templates.LFM2,
        bos="<|startoftext|>",
        eos="<|im_end|>",
        pad="<|pad|>",
        special=(
            "<|pad|>", "<|startoftext|>", GPT2_EOT, "<|im_start|>", "<|im_end|>", "<|tool_list_start|>",
            "<|tool_list_end|>", "<|tool_call_start|>", "<|tool_call_end|>", "<|tool_response_start|>",
            "<|tool_response_end|>",
        ),  # fmt: skip
        adds_bos=True,
    ),
    "cohere2": TokenizerSpec(
        chat_template=chat_templates.COHERE2,
        bos="<BOS_TOKEN>",
        eos="<|END_OF_TURN_TOKEN|>",
        pad="<PAD>",
        unk="<UNK>",
        special=(
            "<PAD>", "<UNK>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
            "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>",
        ),  # fmt: skip
        adds_bos=True,
    ),
    "glm4": TokenizerSpec(
        chat_template=chat_templates.GLM4_MOE,
        eos=GPT2_EOT,
        pad=GPT2_EOT,
        special=(GPT2_EOT, "[gMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
        extra=("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
               "</arg_value>", "<tool_response>", "</tool_response>"),  # fmt: skip
    ),
    "harmony": TokenizerSpec(
        chat_template=chat_templates.HARMONY,
        bos="<|startoftext|>",
        eos="<|return|>",
        pad=GPT2_EOT,
        special=(
            "<|startoftext|>", GPT2_EOT, "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>",
            "<|message|>", "<|call|>",
        ),  # fmt: skip
    ),
    "llama3": TokenizerSpec(
        chat_template=chat_templates.LLAMA3,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        special=(
            "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|eot_id|>", "<|python_tag|>",
        ),  # fmt: skip
        adds_bos=True,
    ),
}


# How text is cut into words before BPE: the pattern of current byte-level tokenizers (Llama 3, Qwen2, cl100k)
# rather than GPT-2's. It keeps a run of newlines in one piece ("\n\n" then a word), so a chat template whose
# generation prompt ends with "\n\n" tokenizes the same alone and followed by the answer, as with the real models.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def build_tokenizer(spec: TokenizerSpec, gpt2_dir: Path):
    """GPT-2's byte-level BPE with the family's tokens, BOS handling and chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(BPE.from_file(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt")))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.extra])
    post = [processors.ByteLevel(trim_offsets=False)]
    if spec.adds_bos:
        bos_id = backend.token_to_id(spec.bos)
        post.append(
            processors.TemplateProcessing(
                single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]
            )
        )
    backend.post_processor = processors.Sequence(post)
    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=131072,
        chat_template=spec.chat_template,
        **{key: value for key, value in named.items() if value is not None},
    )
    return tokenizer


# -- models -----------------------------------------------------------------------------------------------------

TINY = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32)


@dataclass(frozen=True)
class ModelSpec:
    """A tiny model folder: `make_config(vocab_size, token_ids)` returns its transformers config."""

    name: str
    tokenizer: str
    make_config: Callable[[int, dict], object]
    remote_code: bool = False
    fp32_parameters: tuple[str, ...] = ()  # parameter name suffixes kept in float32, as in the real checkpoint
    extra_eos: tuple[str, ...] = ()  # tokens that also end generation (config eos_token_id becomes a list)


def _token_ids(tokenizer, spec: TokenizerSpec) -> dict:
    ids = {"eos_token_id": tokenizer.convert_tokens_to_ids(spec.eos)}
    ids["bos_token_id"] = tokenizer.convert_tokens_to_ids(spec.bos) if spec.bos else None
    ids["pad_token_id"] = tokenizer.convert_tokens_to_ids(spec.pad) if spec.pad else None
    return ids


def _qwen2(vocab, ids):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, **TINY, **ids)


def _qwen3_moe(vocab, ids):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab, **TINY, head_dim=4, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, **ids,
    )  # fmt: skip


def _gpt_oss(vocab, ids):
    from transformers import GptOssConfig

    return GptOssConfig(vocab_size=vocab, **TINY, head_dim=4, num_local_experts=4, num_experts_per_tok=2, **ids)


def _cohere2(vocab, ids):
    from transformers import Cohere2Config

    return Cohere2Config(vocab_size=vocab, **TINY, logit_scale=1.0, **ids)


def _glm4_moe(vocab, ids):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        vocab_size=vocab, **TINY, head_dim=2, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        attention_bias=True, use_qk_norm=True, **ids,
    )  # fmt: skip


def _nemotron_h(vocab, ids):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=vocab, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
        layers_block_type=["mamba", "attention", "moe"], mamba_num_heads=8, mamba_head_dim=4, mamba_n_groups=1,
        ssm_state_size=16, mamba_d_conv=4, mamba_expand=2, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, **ids,
    )  # fmt: skip


def _olmo3(vocab, ids):
    from transformers import Olmo3Config

    return Olmo3Config(vocab_size=vocab, **TINY, **ids)


def _lfm2(vocab, ids):
    from transformers import Lfm2Config

    return Lfm2Config(vocab_size=vocab, **TINY, full_attn_idxs=[1], block_multiple_of=8, **ids)


def _lfm2_5(vocab, ids):
    from transformers import Lfm2Config

    return Lfm2Config(
        vocab_size=vocab, **TINY, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False, **ids
    )


def _llama(vocab, ids):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, **TINY, **ids)


MODELS = [
    ModelSpec("tiny-Qwen2ForCausalLM-2.5", "qwen2.5", _qwen2),
    ModelSpec("tiny-Qwen3MoeForCausalLM", "qwen3", _qwen3_moe),
    ModelSpec("tiny-GptOssForCausalLM", "harmony", _gpt_oss),
    ModelSpec("tiny-Cohere2ForCausalLM", "cohere2", _cohere2),
    ModelSpec("tiny-Glm4MoeForCausalLM", "glm4", _glm4_moe, extra_eos=("<|user|>", "<|observation|>")),
    ModelSpec("tiny-NemotronHForCausalLM-nano", "nemotron-h", _nemotron_h, fp32_parameters=("A_log", ".D")),
    ModelSpec("tiny-Olmo3ForCausalLM", "olmo3", _olmo3),
    ModelSpec("tiny-Lfm2ForCausalLM", "lfm2", _lfm2),
    ModelSpec("tiny-Lfm2ForCausalLM-2.5", "lfm2", _lfm2_5),
    ModelSpec("tiny-RemoteForCausalLM", "llama3", _llama, remote_code=True),
]


def _make_config(spec: ModelSpec, tokenizer):
    ids = _token_ids(tokenizer, TOKENIZERS[spec.tokenizer])
    if spec.extra_eos:
        ids["eos_token_id"] = [ids["eos_token_id"], *tokenizer.convert_tokens_to_ids(list(spec.extra_eos))]
    return spec.make_config(len(tokenizer), ids)


REMOTE_CONFIGURATION = '''"""Configuration of a tiny test model that loads only with trust_remote_code (built by compat/trl)."""

from transformers import LlamaConfig


class RemoteConfig(LlamaConfig):
    model_type = "remote"
'''

REMOTE_MODELING = '''"""A tiny test model that loads only with trust_remote_code: Llama layers under model type "remote"."""

from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from .configuration_remote import RemoteConfig


class RemoteModel(LlamaModel):
    config_class = RemoteConfig


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig


class RemoteForSequenceClassification(LlamaForSequenceClassification):
    config_class = RemoteConfig
'''


def _make_remote(folder: Path) -> None:
    """Turn a saved Llama folder into a remote-code model: same weights, model type "remote", auto_map to the
    modeling files written next to them."""
    (folder / "configuration_remote.py").write_text(REMOTE_CONFIGURATION)
    (folder / "modeling_remote.py").write_text(REMOTE_MODELING)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "remote"
    config["architectures"] = ["RemoteForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_remote.RemoteConfig",
        "AutoModel": "modeling_remote.RemoteModel",
        "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        "AutoModelForSequenceClassification": "modeling_remote.RemoteForSequenceClassification",
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_model(spec: ModelSpec, gpt2_dir: Path, folder: Path) -> None:
    """Save the tokenizer and a randomly initialised bf16 model (seeded by its name) into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(TOKENIZERS[spec.tokenizer], gpt2_dir)
    config = _make_config(spec, tokenizer)
    torch.manual_seed(zlib.crc32(spec.name.encode()))
    model = AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16)
    for name, parameter in model.named_parameters():
        if spec.fp32_parameters and name.endswith(spec.fp32_parameters):
            parameter.data = parameter.data.float()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(
        f"# {spec.name}\n\nTiny random {type(model).__name__} (stand-in for the hub's trl-internal-testing/"
        f"{spec.name}), built offline by compat/trl/build_assets.py. Not a trained model.\n"
    )
    if spec.remote_code:
        _make_remote(folder)


# -- datasets ---------------------------------------------------------------------------------------------------

DATASETS = {
    "zen": (dataset_rows.zen_configs, False),
    "harmony": (dataset_rows.harmony_configs, True),
    "toolcall": (dataset_rows.toolcall_configs, True),
}
"""name -> (rows per config, whether mixed-type columns are stored as datasets' Json type, as the hub sets are)."""


def build_dataset(name: str, folder: Path) -> None:
    """Write every config of dataset `name` as train/test parquet files plus the README that declares them."""
    from datasets import Dataset

    make_rows, mixed_types_as_json = DATASETS[name]
    yaml = ["---", "configs:"]
    for config_name, rows in make_rows().items():
        dataset = Dataset.from_list(rows, on_mixed_types="use_json" if mixed_types_as_json else None)
        n_test = math.ceil(len(rows) * 0.1)  # like train_test_split(test_size=0.1)
        splits = {"train": range(len(rows) - n_test), "test": range(len(rows) - n_test, len(rows))}
        yaml += [f"- config_name: {config_name}", "  data_files:"]
        for split, indices in splits.items():
            relative = f"{config_name}/{split}-00000-of-00001.parquet"
            (folder / config_name).mkdir(parents=True, exist_ok=True)
            dataset.select(indices).to_parquet(str(folder / relative))
            yaml += [f"  - split: {split}", f"    path: {relative}"]
    yaml += ["---", "", f"# {name}", "", f"Local stand-in for the hub dataset {ORG}/{name}, written by "
             "compat/trl/build_assets.py from compat/trl/dataset_rows.py.", ""]  # fmt: skip
    (folder / "README.md").write_text("\n".join(yaml))


# -- checks -----------------------------------------------------------------------------------------------------


def check_model_folder(spec: ModelSpec, folder: Path) -> None:
    """Load the folder back as TRL would and check what the tests rely on: the vocabulary covers the tokenizer,
    the chat template renders plain and tool conversations with the prompt as a prefix of prompt + completion,
    and a forward pass gives finite logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=spec.remote_code, dtype=torch.float32)
    if len(tokenizer) > model.config.get_text_config().vocab_size:
        raise AssertionError(f"{spec.name}: tokenizer has {len(tokenizer)} tokens, model {model.config.vocab_size}")
    zen = dataset_rows.zen_configs()["conversational_preference"][0]
    tool = dataset_rows.toolcall_configs()["preference"][0]
    harmony = dataset_rows.harmony_configs()["preference"][0]
    for row, kwargs in ((zen, {}), (tool, {"tools": tool["tools"]}), (harmony, harmony["chat_template_kwargs"])):
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, **kwargs)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        for completion in (row["chosen"], row["rejected"]):
            full = tokenizer.apply_chat_template(row["prompt"] + completion, tokenize=True, **kwargs)
            full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
            if full[: len(prompt)] != prompt or len(full) <= len(prompt):
                raise AssertionError(f"{spec.name}: the rendered prompt is not a strict prefix of prompt+completion")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokenizer("Beautiful is better than ugly.")["input_ids"]])).logits
    if not torch.isfinite(logits).all():
        raise AssertionError(f"{spec.name}: non-finite logits")


# -- the whole build --------------------------------------------------------------------------------------------


def fingerprint() -> str:
    """Hash of the code that defines the assets and of the libraries that write them."""
    digest = hashlib.sha256()
    for source in ("build_assets.py", "chat_templates.py", "dataset_rows.py"):
        digest.update((HERE / source).read_bytes())
    for package in ("transformers", "tokenizers", "datasets", "torch", "safetensors", "pyarrow"):
        digest.update(f"{package}=={version(package)}".encode())
    return digest.hexdigest()


def build_all(assets_dir: Path, gpt2_dir: Path) -> None:
    """Build every asset into a sibling folder, check it, then move it into place (a failed build leaves
    no half-written assets behind)."""
    if not (gpt2_dir / "vocab.json").is_file():
        raise SystemExit(f"build_assets: GPT-2 tokenizer not found: {gpt2_dir}/vocab.json (use --gpt2-tokenizer)")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    staging = assets_dir.with_name(assets_dir.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    for spec in MODELS:
        print(f"build_assets: model {ORG}/{spec.name}", flush=True)
        build_model(spec, gpt2_dir, staging / ORG / spec.name)
        check_model_folder(spec, staging / ORG / spec.name)
    for name in DATASETS:
        print(f"build_assets: dataset {ORG}/{name}", flush=True)
        build_dataset(name, staging / ORG / name)
    stamp = {"fingerprint": fingerprint(), "models": [s.name for s in MODELS], "datasets": list(DATASETS),
             "not_built": NOT_BUILT}  # fmt: skip
    (staging / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    shutil.rmtree(assets_dir, ignore_errors=True)
    staging.rename(assets_dir)
    print(f"build_assets: done: {assets_dir}", flush=True)


def assets_are_current(assets_dir: Path) -> bool:
    stamp = assets_dir / STAMP_NAME
    return stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint()


def ensure_assets(assets_dir: Path, gpt2_dir: Path | None = None) -> None:
    """Build the assets unless `assets_dir` holds a build of this very code and these library versions."""
    if not assets_are_current(assets_dir):
        build_all(assets_dir, gpt2_dir or default_gpt2_tokenizer())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("assets_dir", nargs="?", type=Path, default=DEFAULT_ASSETS)
    parser.add_argument("--gpt2-tokenizer", type=Path, default=None, help="folder with GPT-2's vocab.json/merges.txt")
    parser.add_argument("--force", action="store_true", help="rebuild even if the assets are current")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    assets_dir = args.assets_dir.resolve()
    if args.force or not assets_are_current(assets_dir):
        build_all(assets_dir, args.gpt2_tokenizer or default_gpt2_tokenizer())
    else:
        print(f"build_assets: up to date: {assets_dir}")


if __name__ == "__main__":
    main()
