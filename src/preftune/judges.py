"""Judges: score (prompt, response) pairs, higher is better; turn scored candidates into preference pairs.

A judge is named by a spec (`load_judge`):

- `"package.module:function"`: a Python reward function. The contract is the batch form
  `fn(prompts: list[str], responses: list[str]) -> list[float]` (one finite score per response, same order). A
  function that scores one pair at a time, `fn(prompt: str, response: str) -> float`, is accepted when it is marked
  with the `@per_item` decorator below or when `load_judge(..., per_item=True)` (`--per-item` on the command line)
  says so; nothing is guessed from signatures.
- a directory: a reward model, `AutoModelForSequenceClassification` with `num_labels == 1`, loaded from safetensors
  weights with `trust_remote_code=False`; the score is its logit for the text prompt + response (a conversation
  prompt is rendered with the reward model's tokenizer's chat template, with the response as the assistant turn).

Prompts reach a Python function as strings: a string prompt as it is, a conversation flattened to
"role: content" lines (`prompt_text`).

Human labels are a different kind of judge: `PairwiseLabels` compares two responses instead of scoring one.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from preftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@runtime_checkable
class Judge(Protocol):
    """Scores responses; higher is better."""

    name: str

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        """One finite score per (prompts[i], responses[i])."""
        ...


def per_item(function: Callable[[str, str], float]) -> Callable[[str, str], float]:
    """Mark a reward function that scores one (prompt, response) pair per call, `fn(prompt, response) -> float`."""
    function.preftune_per_item = True
    return function


def prompt_text(prompt) -> str:
    """A prompt as one string: a string as it is; a conversation as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{message['role']}: {message['content']}" for message in prompt)


# --------------------------------------------------------------------------------------------------------------
# A rule reward: sentiment words
# --------------------------------------------------------------------------------------------------------------

# Written for preftune (not taken from a published lexicon), in the spirit of word-count sentiment scores such as
# Hu & Liu's opinion lexicon: common positive and negative words of simple children's stories, with their usual
# inflections, so that the score is easy to read and to move by rewording a story.
POSITIVE_WORDS = frozenset("""
    happy happier happiest happily happiness glad joy joyful love loved loves loving lovely fun funny
    smile smiled smiles smiling laugh laughed laughs laughing good great nice kind kindly best better
    beautiful pretty wonderful amazing awesome excited exciting proud brave friend friends friendly
    hug hugged hugs cheer cheered cheerful thank thanked thanks thankful grateful safe calm peaceful
    enjoy enjoyed enjoys delicious sweet gentle helpful care cared caring share shared sharing
    bright sunny warm yay hooray win won special favorite together playful
""".split())
NEGATIVE_WORDS = frozenset("""
    sad sadly sadness unhappy cry cried cries crying tear tears angry anger mad upset scared scary
    afraid fear frightened bad worse worst mean naughty rude hurt hurts hurting pain painful sick
    hate hated hates hit broke broken break lost lonely alone sorry worried worry worries fight fought
    yell yelled shout shouted scream screamed terrible horrible awful ugly dark dangerous danger
    bored boring fail failed wrong poor grumpy frown frowned sore ouch
""".split())
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def sentiment_word_score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """(# positive words − # negative words) in each response (the prompt is not counted).

    Words are the lower-cased runs of letters (an apostrophe inside a word kept); each occurrence counts. The lists
    are `POSITIVE_WORDS` and `NEGATIVE_WORDS` (see their comment for where they come from).
    """
    scores = []
    for response in responses:
        words = _WORD.findall(response.lower())
        scores.append(float(sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)))
    return scores


# --------------------------------------------------------------------------------------------------------------
# Loading judges
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FunctionJudge:
    """A Python reward function as a judge (batch or per-item form; see the module docstring)."""

    name: str
    function: Callable
    per_item: bool = False

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        texts = [prompt_text(prompt) for prompt in prompts]
        if self.per_item:
            return [self._item_score(prompt, response, index) for index, (prompt, response)
                    in enumerate(zip(texts, responses))]
        return self._checked(self.function(texts, list(responses)), len(responses))

    def _item_score(self, prompt: str, response: str, index: int) -> float:
        value = self.function(prompt, response)
        return _finite(value, self.name, index, hint="a per-item reward function must return one number")

    def _checked(self, values, expected: int) -> list[float]:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().reshape(-1).tolist()
        elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy arrays
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            raise ConfigError(
                f"reward function {self.name} returned {type(values).__name__}; expected a list of {expected} "
                "floats (one per response). A function that scores one (prompt, response) at a time must be "
                "marked with @preftune.judges.per_item or loaded with per_item=True (--per-item)", key="judge")
        if len(values) != expected:
            raise ConfigError(f"reward function {self.name} returned {len(values)} scores for {expected} responses; "
                              "expected one score per response", key="judge")
        return [_finite(value, self.name, index) for index, value in enumerate(values)]


def _finite(value, name: str, index: int, hint: str = "expected a finite number") -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ConfigError(f"reward function {name} gave {type(value).__name__} for response {index}; {hint}",
                          key="judge")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"reward function {name} gave {number} for response {index}; expected a finite number",
                          key="judge")
    return number


def _check_lengths(prompts: Sequence, responses: Sequence) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses; expected one prompt per response")


class RewardModelJudge:
    """A sequence-classification reward model (num_labels = 1): the score of prompt + response is its logit.

    Texts are tokenized with the reward model's tokenizer (its BOS added unless the text starts with it), padded on
    the right, and cut to their last `max_length` tokens (default: the model's context) so the response is kept.
    """

    def __init__(self, path: str | Path, *, device=None, batch_size: int = 16, max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        self.name = str(path)
        self.batch_size = batch_size
        config = _reward_model_config(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, trust_remote_code=False, use_safetensors=True, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot load a reward model from '{path}' (safetensors weights and a tokenizer "
                              f"expected): {str(error).strip().splitlines()[0]}", key="judge") from None
        self.model.to(device or "cpu").eval()
        self.pad_id = next(v for v in (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id,
                                       self.tokenizer.eos_token_id, 0) if v is not None)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.pad_id
        self.max_length = max_length or getattr(config, "max_position_embeddings", None)

    def texts(self, prompts: list, responses: list[str]) -> list[str]:
        """The text scored for each pair: prompt + response, or a conversation with the response as its answer."""
        texts = []
        for prompt, response in zip(prompts, responses):
            if isinstance(prompt, str):
                texts.append(prompt + response)
            elif isinstance(getattr(self.tokenizer, "chat_template", None), str):
                messages = list(prompt) + [{"role": "assistant", "content": response}]
                texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append(prompt_text(list(prompt) + [{"role": "assistant", "content": response}]))
        return texts

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        texts = self.texts(prompts, responses)
        scores: list[float] = []
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                encoded = [self._encode(text) for text in texts[start: start + self.batch_size]]
                width = max(len(ids) for ids in encoded)
                input_ids = torch.tensor([ids + [self.pad_id] * (width - len(ids)) for ids in encoded], device=device)
                mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded], device=device)
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                scores.extend(float(value) for value in logits[:, 0].float().cpu())
        return scores

    def _encode(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        ids = self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), verbose=False)["input_ids"]
        return list(ids[-self.max_length:] if self.max_length else ids)


def _reward_model_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ConfigError(f"'{path}' has no config.json; expected a reward model directory "
                          "(AutoModelForSequenceClassification with num_labels=1) or 'package.module:function'",
                          key="judge")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read '{path / 'config.json'}': {error}", key="judge") from None
    if config.num_labels != 1:
        raise ConfigError(f"the reward model '{path}' has num_labels={config.num_labels}; expected 1 (one score "
                          "per sequence)", key="judge")
    return config


def load_judge(spec: str, *, device=None, batch_size: int = 16, per_item: bool | None = None) -> Judge:
    """The judge a spec names: an existing directory (reward model) or "package.module:function".

    `per_item`: True calls the function once per pair, False with the lists; None (default) uses the function's
    `@per_item` mark. ConfigError(key="judge") for a module that cannot be imported, a missing or non-callable
    attribute, a directory that is not a num_labels=1 reward model, or a spec of neither form.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"expected a judge spec, got {spec!r}", key="judge")
    path = Path(spec)
    if path.is_dir():
        return RewardModelJudge(path, device=device, batch_size=batch_size)
    if path.exists():
        raise ConfigError(f"'{spec}' is a file; expected a reward model directory or 'package.module:function'",
                          key="judge")
    module_name, colon, attribute = spec.strip().rpartition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"'{spec}' is neither a directory nor 'package.module:function'", key="judge")
    function = _import_attribute(module_name, attribute, spec)
    marked = bool(getattr(function, "preftune_per_item", False))
    return FunctionJudge(name=spec, function=function, per_item=marked if per_item is None else per_item)


def _import_attribute(module_name: str, attribute: str, spec: str) -> Callable:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import module '{module_name}' of judge '{spec}': {error}", key="judge") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"module '{module_name}' has no attribute '{attribute}' (judge '{spec}')", key="judge")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"'{spec}' is a {type(target).__name__}, not callable; expected a reward function "
                          "fn(prompts, responses) -> list[float]", key="judge")
    return target


# --------------------------------------------------------------------------------------------------------------
# Pairwise human labels
# --------------------------------------------------------------------------------------------------------------

_WINNER_VALUE = {"a": 1.0, "b": 0.0, "tie": 0.5}


class PairwiseLabels:
    """Human pairwise judgments: which of two responses to a prompt is better.

    `compare(prompt, a, b)` is 1.0 when a won, 0.0 when b won, 0.5 for a tie, None for a pair never labelled; it is
    order-insensitive (asking about (b, a) gives 1 − the stored result). A pair labelled several times gets the
    mean of its labels.
    """

    def __init__(self, labels: dict[tuple[str, str, str], list[float]], source: str = "in-memory"):
        self._labels = labels
        self.source = source
        self.name = f"labels:{source}"

    @classmethod
    def from_rows(cls, rows: Sequence[dict], source: str = "in-memory") -> "PairwiseLabels":
        """Rows {"prompt", "response_a", "response_b", "winner": "a" | "b" | "tie"}; DataError naming row/field."""
        labels: dict[tuple[str, str, str], list[float]] = {}
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", file=source, row=index)
            for field, kinds in (("prompt", (str, list)), ("response_a", str), ("response_b", str)):
                if field not in row:
                    raise DataError("missing", file=source, row=index, field=field)
                if not isinstance(row[field], kinds):
                    expected = "a string or a list of messages" if field == "prompt" else "a string"
                    raise DataError(f"expected {expected}, got {type(row[field]).__name__}", file=source, row=index,
                                    field=field)
            winner = row.get("winner")
            if winner not in _WINNER_VALUE:
                raise DataError(f"expected 'a', 'b' or 'tie', got {winner!r}", file=source, row=index, field="winner")
            key = _prompt_key(row["prompt"])
            a, b = row["response_a"], row["response_b"]
            value = _WINNER_VALUE[winner]
            if a > b:  # store each unordered pair once, as (smaller, larger)
                a, b, value = b, a, 1.0 - value
            labels.setdefault((key, a, b), []).append(value)
        return cls(labels, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "PairwiseLabels":
        """Read a JSONL file of label rows (see `from_rows`)."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read the labels file ({error})", file=str(path)) from None
        rows = []
        for index, line in enumerate(lines):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"not a JSON line ({error.msg})", file=str(path), row=index) from None
        return cls.from_rows(rows, str(path))

    def __len__(self) -> int:
        return len(self._labels)

    def compare(self, prompt, response_a: str, response_b: str) -> float | None:
        key = _prompt_key(prompt)
        if response_a <= response_b:
            values = self._labels.get((key, response_a, response_b))
            return None if values is None else sum(values) / len(values)
        values = self._labels.get((key, response_b, response_a))
        return None if values is None else 1.0 - sum(values) / len(values)


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


# --------------------------------------------------------------------------------------------------------------
# From scores to pairs
# --------------------------------------------------------------------------------------------------------------

PAIR_MODES = ("best_vs_worst", "all_pairs")


@dataclass
class PairStats:
    """What `pairs_from_candidates` did: prompts and responses read, pairs written, pairs skipped as ties
    (score gap <= min_gap), and prompts with fewer than two responses (no pair possible)."""

    prompts: int = 0
    responses: int = 0
    pairs: int = 0
    ties_skipped: int = 0
    too_few_responses: int = 0


def _as_assistant(prompt, response: str):
    return [{"role": "assistant", "content": response}] if isinstance(prompt, list) else response


def _pair(prompt, responses: list[str], scores: list[float], chosen: int, rejected: int) -> dict:
    return {"prompt": prompt, "chosen": _as_assistant(prompt, responses[chosen]),
            "rejected": _as_assistant(prompt, responses[rejected]),
            "score_chosen": scores[chosen], "score_rejected": scores[rejected]}


def pairs_from_candidates(rows: Sequence[dict], scores: Sequence[Sequence[float]], mode: str = "best_vs_worst",
                          min_gap: float = 0.0) -> tuple[list[dict], PairStats]:
    """Preference pairs (TRL format) from scored candidates.

    rows: candidates rows ({"prompt", "responses", ...}); scores[i][j]: the score of rows[i]["responses"][j].
    mode "best_vs_worst": one pair per prompt, the highest-scored response (the first of equals) over the lowest
    (the last of equals); "all_pairs": every unordered pair of responses, the higher-scored one chosen.
    A pair whose score gap is <= min_gap is a tie: skipped and counted. Conversation prompts give
    conversational pairs (chosen/rejected = [{"role": "assistant", "content": ...}]).
    Returns (pairs {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}, PairStats).
    """
    if mode not in PAIR_MODES:
        raise ConfigError(f"unknown mode {mode!r}; expected one of {', '.join(PAIR_MODES)}", key="mode")
    if min_gap < 0:
        raise ConfigError(f"expected a number >= 0, got {min_gap}", key="min_gap")
    if len(rows) != len(scores):
        raise ValueError(f"got {len(scores)} score lists for {len(rows)} rows")
    pairs, stats = [], PairStats()
    for row, row_scores in zip(rows, scores):
        responses, row_scores = list(row["responses"]), [float(s) for s in row_scores]
        if len(row_scores) != len(responses):
            raise ValueError(f"prompt {row.get('prompt_id')!r}: {len(row_scores)} scores for {len(responses)} responses")
        stats.prompts += 1
        stats.responses += len(responses)
        if len(responses) < 2:
            stats.too_few_responses += 1
            continue
        if mode == "best_vs_worst":
            best = max(range(len(responses)), key=lambda j: (row_scores[j], -j))
            worst = min(range(len(responses)), key=lambda j: (row_scores[j], -j))
            candidates = [(best, worst)]
        else:
            candidates = [(i, j) if row_scores[i] >= row_scores[j] else (j, i)
                          for i in range(len(responses)) for j in range(i + 1, len(responses))]
        for chosen, rejected in candidates:
            if row_scores[chosen] - row_scores[rejected] <= min_gap:
                stats.ties_skipped += 1
            else:
                pairs.append(_pair(row["prompt"], responses, row_scores, chosen, rejected))
    stats.pairs = len(pairs)
    return pairs, stats


def score_candidates(judge: Judge, rows: Sequence[dict], *, batch_size: int = 256) -> list[list[float]]:
    """The judge's score of every response of every row: scores[i][j] for rows[i]["responses"][j]."""
    flat = [(i, row["prompt"], response) for i, row in enumerate(rows) for response in row["responses"]]
    values: list[float] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start: start + batch_size]
        values.extend(judge.score([prompt for _, prompt, _ in chunk], [response for _, _, response in chunk]))
    scores: list[list[float]] = [[] for _ in rows]
    for (i, _, _), value in zip(flat, values):
        scores[i].append(value)
    return scores
