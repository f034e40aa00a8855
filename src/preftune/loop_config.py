"""The `loop:` section of a config: the settings of iterative and online DPO (`preftune loop`, `preftune.loop.run_loop`).

`LoopConfig.from_mapping` checks every key and value and raises ConfigError naming the key as `loop.<key>`. The
section is a plain mapping in `DPOConfig.loop` (validated by this module when the config is built); the rest of the
config (loss, β, learning rate, batch sizes, ...) trains each round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from preftune.errors import ConfigError

PROMPT_SELECTIONS = ("fresh", "same")
REFERENCE_MODES = ("initial", "previous")
PAIR_MODES = ("best_vs_worst", "all_pairs")  # preftune.judges.PAIR_MODES (a test keeps the two equal)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class LoopConfig:
    """Iterative DPO: per round, sample from the current policy, judge, build pairs, train, evaluate.

    Each field's `doc` metadata is its description in the README's config table (rows `loop.<key>`).
    """

    prompts: str | None = field(default=None, metadata=_doc(
        "Prompts file sampled each round (JSONL/JSON rows with `prompt` or `messages`, optional `id`). Required."))
    judge: str | None = field(default=None, metadata=_doc(
        "What scores the samples: `package.module:function` or a reward-model directory (as `preftune judge "
        "--judge`). Required."))
    rounds: int = field(default=2, metadata=_doc("Rounds of sample → judge → train → evaluate."))
    prompts_per_round: int | None = field(default=None, metadata=_doc(
        "Prompts sampled per round; `null`: all of them (`same`) or an equal share per round (`fresh`)."))
    prompt_selection: str = field(default="fresh", metadata=_doc(
        "`fresh`: round K takes the K-th slice of the prompts file; `same`: every round takes the first "
        "`prompts_per_round` prompts."))
    num_samples: int = field(default=4, metadata=_doc("Responses sampled per prompt and round (>= 2)."))
    temperature: float = field(default=1.0, metadata=_doc("Sampling temperature of the rounds' samples (0: greedy)."))
    top_p: float = field(default=1.0, metadata=_doc("Nucleus sampling mass of the rounds' samples."))
    max_new_tokens: int = field(default=64, metadata=_doc("Most tokens per sampled response."))
    sampling_seed: int | None = field(default=None, metadata=_doc(
        "Seed of round 1's samples (round K uses seed + K − 1); `null`: the config's `seed`."))
    sampling_batch_size: int = field(default=16, metadata=_doc("Sequences per forward batch when sampling."))
    pair_mode: str = field(default="best_vs_worst", metadata=_doc(
        "Pairs from each prompt's judged samples: `best_vs_worst` (one per prompt) or `all_pairs`."))
    min_gap: float = field(default=0.0, metadata=_doc("Skip pairs whose score gap is <= this (ties)."))
    steps_per_round: int | None = field(default=None, metadata=_doc(
        "Optimizer steps per round; `null`: `max_steps` / `num_train_epochs` apply to each round."))
    reference: str = field(default="initial", metadata=_doc(
        "Reference of each round's DPO loss: `initial` (the starting model, or `ref_model_name_or_path`) or "
        "`previous` (the model the round starts from)."))
    eval_prompts: str | None = field(default=None, metadata=_doc(
        "Prompts for each round's sampled evaluation against the initial model (judge reward, win rate, KL); "
        "`null`: none."))
    eval_num_samples: int = field(default=2, metadata=_doc("Responses per evaluation prompt and model."))
    online: bool = field(default=False, metadata=_doc(
        "Online DPO (TRL's OnlineDPOTrainer): each round trains step by step, every step sampling two responses per "
        "prompt of its batch from the current policy, judging them and taking one DPO step on the pair; "
        "`num_samples`, `pair_mode` and `min_gap` are not used, `judge` may also be a pairwise-labels file."))
    missing_eos_penalty: float | None = field(default=None, metadata=_doc(
        "With `online`: subtracted from the score of a response that ran to `max_new_tokens` without a stop token "
        "(scoring judges only); `null`: none."))

    @classmethod
    def from_mapping(cls, data: Any, *, file: str | None = None) -> LoopConfig:
        """The section from a mapping; ConfigError(key="loop.<key>", file=file) for an unknown key or a bad value."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping of loop settings, got {type(data).__name__}", key="loop", file=file)
        names = {spec.name for spec in fields(cls)}
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown loop setting; expected one of {', '.join(sorted(names))}",
                                  key=f"loop.{key}", file=file)
        config = cls(**dict(data))
        config.check(file=file)
        return config

    def check(self, *, file: str | None = None) -> None:
        """Every value's type and range (the keys needing files are checked by `preftune.loop.check_loop`)."""
        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"expected {expected}, got {getattr(self, key)!r}", key=f"loop.{key}", file=file)

        need(self.prompts is not None and _is_text(self.prompts), "prompts", "a prompts file path")
        need(self.judge is not None and _is_text(self.judge), "judge",
             "a judge: 'package.module:function' or a reward-model directory")
        need(_is_int(self.rounds) and self.rounds >= 1, "rounds", "an integer >= 1")
        need(self.prompts_per_round is None or _is_int(self.prompts_per_round) and self.prompts_per_round >= 1,
             "prompts_per_round", "an integer >= 1 or null")
        need(self.prompt_selection in PROMPT_SELECTIONS, "prompt_selection", " or ".join(PROMPT_SELECTIONS))
        need(_is_int(self.num_samples) and self.num_samples >= 2, "num_samples", "an integer >= 2 (pairs need two)")
        need(_is_number(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        need(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        need(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1")
        need(self.sampling_seed is None or _is_int(self.sampling_seed) and self.sampling_seed >= 0, "sampling_seed",
             "an integer >= 0 or null")
        need(_is_int(self.sampling_batch_size) and self.sampling_batch_size >= 1, "sampling_batch_size",
             "an integer >= 1")
        need(self.pair_mode in PAIR_MODES, "pair_mode", " or ".join(PAIR_MODES))
        need(_is_number(self.min_gap) and self.min_gap >= 0, "min_gap", "a number >= 0")
        need(self.steps_per_round is None or _is_int(self.steps_per_round) and self.steps_per_round >= 1,
             "steps_per_round", "an integer >= 1 or null")
        need(self.reference in REFERENCE_MODES, "reference", " or ".join(REFERENCE_MODES))
        need(self.eval_prompts is None or _is_text(self.eval_prompts), "eval_prompts", "a prompts file path or null")
        need(_is_int(self.eval_num_samples) and self.eval_num_samples >= 1, "eval_num_samples", "an integer >= 1")
        need(isinstance(self.online, bool), "online", "true or false")
        need(self.missing_eos_penalty is None or _is_number(self.missing_eos_penalty) and self.online,
             "missing_eos_penalty", "a number with online: true, or null")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def loop_keys_table_rows() -> list[tuple[str, str, str]]:
    """(key, default, description) of every `loop.<key>` setting, for the README's config table."""
    return [(f"loop.{spec.name}", spec.default, spec.metadata["doc"]) for spec in fields(LoopConfig)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
