"""Sampling responses from a causal LM, and the candidates file that `preftune sample` writes.

Sampling is reproducible per sample, independent of batching: sample s of the prompt with key k draws its
randomness from its own `torch.Generator`, seeded from (seed, k, s). Each step, the next-token scores of a row are
divided by the temperature, cut to the top-p nucleus, and perturbed with Gumbel noise from that row's generator;
the argmax is then an exact draw from the tempered nucleus distribution (the Gumbel-max trick). The batch's
composition, its padding and the batch size therefore do not change what a sample is (up to float differences
in the padded forward, which can flip a draw only when two perturbed scores tie to ~1e-6). Temperature 0 is greedy.

Prompts: a string is used as it is; a conversation (a list of {"role", "content"} messages) is rendered with the
chat template training would use (`templates.choose_template`: the `template` name, else the tokenizer's own, else
"default") and `add_generation_prompt=True`, exactly as training renders a conversational prompt
(`preftune.data.tokenize`). Token ids get the tokenizer's BOS unless the rendered text already starts with it; with
a named template a conversation's ids are the prompt ids training uses (`templates.encode_prompt`, LLaMA-Factory's
encoding).

Candidates JSONL (one JSON object per prompt, one line each):
`{"prompt_id": str, "prompt": str | list[dict], "responses": [str, ...], "model": str,
"sampling": {"temperature", "top_p", "max_new_tokens", "seed"}}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopPLogitsWarper

from preftune.data.templates import choose_template, encode_prompt
from preftune.data.tokenize import check_messages, encode_text, render_messages
from preftune.errors import ConfigError, DataError
from preftune.models import model_device

logger = logging.getLogger(__name__)

CUT_CHARACTER = "\ufffd"  # what tokenizers decode the bytes of an incomplete character to

Prompt = str | list  # a plain string, or a conversation: a list of {"role", "content"} messages


@dataclass
class SamplingParams:
    """How to sample.

    Attributes:
        temperature: scores are divided by it before sampling; 0 = greedy decoding (num_samples copies).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p (1 = all).
        max_new_tokens: most tokens generated per response (the stop token included).
        num_samples: responses per prompt.
        seed: base seed; sample s of prompt key k uses a generator seeded from (seed, k, s).
        batch_size: sequences (prompt x sample rows) per forward batch; does not change the samples.
        stop_token_ids: tokens that end a response (kept in `completion_ids`, dropped from the text); None = the
            tokenizer's EOS and the model's `generation_config.eos_token_id`.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    num_samples: int = 2
    seed: int = 0
    batch_size: int = 16
    stop_token_ids: tuple[int, ...] | None = field(default=None)

    def __post_init__(self):
        checks = [
            ("temperature", self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("num_samples", _is_int(self.num_samples) and self.num_samples >= 1, "an integer >= 1"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "an integer >= 0"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"expected {expected}, got {getattr(self, key)!r}", key=key)

    def record(self) -> dict:
        """The settings stored with each candidates row."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GeneratedSample:
    """One response.

    Attributes:
        text: the decoded response (prompt text excluded, special tokens stripped).
        prompt_ids: the prompt's token ids as fed to the model (no padding).
        completion_ids: the sampled token ids, the stop token included when the response stopped.
        stopped: True when a stop token ended it, False when it ran to max_new_tokens.
    """

    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    stopped: bool


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


def render_prompts(tokenizer, prompts: Sequence[Prompt], template: str | None = None) -> list[str]:
    """The text each prompt is generated from: strings as they are, conversations through the chat template chosen
    as training chooses it (`templates.choose_template`: the named `template`, else the tokenizer's own
    `chat_template`, else the named template "default" with a warning). An unknown template name is a ConfigError;
    a conversation that ends with an assistant turn is a DataError naming the prompt index (there is nothing left
    to answer).
    """
    return _prepared_prompts(tokenizer, prompts, template)[0]


def _prepared_prompts(tokenizer, prompts: Sequence[Prompt], template: str | None) -> tuple[list[str], list[list[int]]]:
    """(rendered texts, token ids) of the prompts: a string's ids are its tokens (with BOS unless it starts with
    it); a conversation's are the prompt ids training uses (a named template's `encode_prompt`, else the rendered
    text's tokens)."""
    choice = None
    if any(not isinstance(prompt, str) for prompt in prompts):
        choice = choose_template(tokenizer, template)
    texts, ids = [], []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append(prompt)
            ids.append(encode_text(tokenizer, prompt))
            continue
        check_messages(prompt, index, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise DataError("the conversation ends with an assistant turn; expected it to end with the turn to "
                            "answer (drop the final assistant message)", row=index, field="prompt")
        text = render_messages(tokenizer, list(prompt), choice.jinja_source, add_generation_prompt=True, row=index)
        texts.append(text)
        ids.append(encode_prompt(choice.name, tokenizer, list(prompt), row=index) if choice.name is not None
                   else encode_text(tokenizer, text))
    return texts, ids


def prompt_id(prompt: Prompt) -> str:
    """A stable id for a prompt without one: the first 16 hex digits of SHA-256 of its canonical JSON."""
    canonical = json.dumps(prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, key: object, sample: int) -> int:
    """The generator seed of sample `sample` of the prompt with key `key` (63 bits of SHA-256)."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{sample}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class PerRowGumbelSampling(LogitsProcessor):
    """Scores → temperature → top-p → + Gumbel noise from each row's own generator; greedy argmax then samples."""

    def __init__(self, temperature: float, top_p: float, generators: list[torch.Generator]):
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1 else None
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return scores + gumbel


def _stop_ids(model, tokenizer, params: SamplingParams) -> list[int]:
    if params.stop_token_ids is not None:
        return sorted(set(params.stop_token_ids))
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _check_length(model, prompt_ids: list[int], params: SamplingParams, index: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and len(prompt_ids) + params.max_new_tokens > limit:
        raise DataError(f"the prompt has {len(prompt_ids)} tokens; with max_new_tokens={params.max_new_tokens} that "
                        f"exceeds the model's context of {limit} tokens", row=index, field="prompt")


def _generate_rows(model, rows: list[tuple[list[int], int]], params: SamplingParams, stop_ids: list[int],
                   pad_id: int) -> list[list[int]]:
    """Generate for rows of (prompt ids, generator seed): the new token ids of each row, padding included."""
    width = max(len(ids) for ids, _ in rows)
    device = model_device(model)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids, _ in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows], device=device)
    processors = LogitsProcessorList()
    if params.temperature > 0:
        generators = [torch.Generator().manual_seed(seed) for _, seed in rows]
        processors.append(PerRowGumbelSampling(params.temperature, params.top_p, generators))
    # Neutral values set explicitly: transformers fills the options left unset from the model's own
    # generation_config (a repetition penalty there would otherwise change the distribution sampled from).
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=stop_ids or None, pad_token_id=pad_id, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, min_length=0, min_new_tokens=0, renormalize_logits=False)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                            logits_processor=processors)
    return output[:, width:].tolist()


def _completion(tokenizer, prompt_ids: list[int], new_ids: list[int], stop_ids: list[int]) -> GeneratedSample:
    """Cut the new ids at the first stop token and decode the response as the text the prompt's text is followed by.

    Decoding prompt + response and removing the decoded prompt keeps the space a SentencePiece tokenizer puts in
    front of the first response word (decoding the response's ids alone would drop it). A response that ran to
    max_new_tokens inside a character made of several byte tokens (a Chinese character is 3 UTF-8 bytes) ends at
    the last whole character: the incomplete bytes would decode to U+FFFD (one per byte with SentencePiece's byte
    fallback). The ids are kept whole.
    """
    stop = next((i for i, token in enumerate(new_ids) if token in stop_ids), None)
    completion = new_ids if stop is None else new_ids[: stop + 1]
    body = completion if stop is None else completion[:-1]
    text = _response_text(tokenizer, prompt_ids, body)
    if stop is None and text.endswith(CUT_CHARACTER):
        whole = (_response_text(tokenizer, prompt_ids, body[:-drop]) for drop in range(1, min(3, len(body)) + 1))
        text = next((shorter for shorter in whole if not shorter.endswith(CUT_CHARACTER)), text)
    return GeneratedSample(text=text, prompt_ids=list(prompt_ids), completion_ids=list(completion),
                           stopped=stop is not None)


def _response_text(tokenizer, prompt_ids: list[int], body: list[int]) -> str:
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + body, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(body, skip_special_tokens=True)


def iter_generate(model, tokenizer, prompts: Sequence[Prompt], params: SamplingParams, *, template: str | None = None,
                  keys: Sequence[object] | None = None, progress: bool = True
                  ) -> Iterator[tuple[list[int], list[list[GeneratedSample]]]]:
    """Sample `params.num_samples` responses per prompt, yielding after each batch.

    Yields (prompt indices, samples) per batch of about `params.batch_size // params.num_samples` prompts (at
    least one), in prompt order; samples[j] holds the responses of prompt indices[j]. `keys` (default: the prompt
    indices) seed each prompt's samples: give stable keys (e.g. prompt ids) to get the same samples for a prompt
    whatever else is sampled with it. The model is put in eval mode and run under `torch.inference_mode()`.
    """
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"got {len(keys)} keys for {len(prompts)} prompts")
    prompt_ids = _prepared_prompts(tokenizer, prompts, template)[1]
    for index, ids in enumerate(prompt_ids):
        _check_length(model, ids, params, index)
    stop_ids, pad_id = _stop_ids(model, tokenizer, params), _pad_id(tokenizer)
    per_batch = max(1, params.batch_size // params.num_samples)
    model.eval()
    with torch.inference_mode(), tqdm(total=len(prompts), desc="Sampling", unit="prompts", disable=not progress) as bar:
        for start in range(0, len(prompts), per_batch):
            indices = list(range(start, min(start + per_batch, len(prompts))))
            rows = [(prompt_ids[i], sample_seed(params.seed, keys[i], s)) for i in indices
                    for s in range(params.num_samples)]
            new_ids = []
            for chunk in range(0, len(rows), params.batch_size):
                new_ids.extend(_generate_rows(model, rows[chunk: chunk + params.batch_size], params, stop_ids, pad_id))
            samples = [_completion(tokenizer, ids, new, stop_ids) for (ids, _), new in zip(rows, new_ids)]
            n = params.num_samples
            yield indices, [samples[j * n: (j + 1) * n] for j in range(len(indices))]
            bar.update(len(indices))


def generate_samples(model, tokenizer, prompts: Sequence[Prompt], params: SamplingParams, *,
                     template: str | None = None, keys: Sequence[object] | None = None,
                     progress: bool = True) -> list[list[GeneratedSample]]:
    """`iter_generate` collected: per prompt, its `params.num_samples` samples (text and token ids)."""
    results: list[list[GeneratedSample]] = [[] for _ in prompts]
    for indices, samples in iter_generate(model, tokenizer, prompts, params, template=template, keys=keys,
                                          progress=progress):
        for index, prompt_samples in zip(indices, samples):
            results[index] = prompt_samples
    return results


def generate(model, tokenizer, prompts: Sequence[Prompt], params: SamplingParams, *, template: str | None = None,
             keys: Sequence[object] | None = None, progress: bool = True) -> list[list[str]]:
    """Per prompt, `params.num_samples` decoded responses (prompt excluded, special tokens stripped).

    Batched with left padding; stops at the stop tokens (default EOS); same seed -> same responses, whatever the
    batch size (see the module docstring). `keys` as in `iter_generate`.
    """
    samples = generate_samples(model, tokenizer, prompts, params, template=template, keys=keys, progress=progress)
    return [[sample.text for sample in prompt_samples] for prompt_samples in samples]


# --------------------------------------------------------------------------------------------------------------
# Candidates file
# --------------------------------------------------------------------------------------------------------------


def candidate_row(prompt_id_: str, prompt: Prompt, responses: list[str], model: str, params: SamplingParams) -> dict:
    """One candidates row (the format in the module docstring)."""
    return {"prompt_id": prompt_id_, "prompt": prompt, "responses": list(responses), "model": model,
            "sampling": params.record()}


def append_candidates(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Append rows as JSON lines, then flush and fsync, so an interrupted run leaves only whole lines behind it."""
    if not rows:
        return
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_candidates(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """The rows of a candidates file.

    A last line without its newline that is not valid JSON is a write cut short by a kill: it is dropped with a
    warning (and with `repair=True` cut off the file, so appending can continue). Any other unreadable line, or a
    row without "prompt_id", "prompt" and a "responses" list, is a DataError naming the file and row (0-based line).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read the candidates file ({error.strerror or error})", file=str(path)) from None
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    rows = [_parse_candidate(line, path, index) for index, line in enumerate(lines) if line.strip()]
    if torn.strip():
        try:
            rows.append(_checked_candidate(json.loads(torn.decode("utf-8")), path, len(lines)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s: dropped an incomplete last line (%d bytes; an interrupted write)", path, len(torn))
            if repair:
                with open(path, "r+b") as handle:
                    handle.truncate(len(data) - len(torn))
                    handle.flush()
                    os.fsync(handle.fileno())
    return rows


def _parse_candidate(line: bytes, path: Path, index: int) -> dict:
    try:
        return _checked_candidate(json.loads(line.decode("utf-8")), path, index)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not a JSON line ({error}); expected one candidates object per line", file=str(path),
                        row=index) from None


def _checked_candidate(row, path: Path, index: int) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", file=str(path), row=index)
    for key in ("prompt_id", "prompt", "responses"):
        if key not in row:
            raise DataError("missing; expected a candidates row with prompt_id, prompt and responses",
                            file=str(path), row=index, field=key)
    if not isinstance(row["responses"], list) or not all(isinstance(r, str) for r in row["responses"]):
        raise DataError("expected a list of response strings", file=str(path), row=index, field="responses")
    return row


def sampling_dict(params: SamplingParams) -> dict:
    """All sampling settings as a plain dict (for logs and summaries)."""
    return asdict(params)


# --------------------------------------------------------------------------------------------------------------
# Prompts file
# --------------------------------------------------------------------------------------------------------------


def read_prompts(path: str) -> list[tuple[str, object]]:
    """(prompt_id, prompt) for each row of a JSONL or JSON-list prompts file.

    A row holds "prompt" (a string) or "messages" (a conversation; a final assistant turn is dropped, so chat
    data can be reused as prompts), and optionally "id" (string or integer; default: a hash of the prompt, see
    `preftune.generation.prompt_id`). A prompt repeated without an id is kept once; two rows with the same "id"
    and different prompts are a DataError. Bad rows: DataError naming the file, the row and the field.
    """
    from preftune.data.formats import iter_file_rows

    file = Path(path)
    if not file.is_file():
        raise DataError("no such file; expected a JSONL or JSON prompts file", file=path)
    seen: dict[str, object] = {}
    prompts: list[tuple[str, object]] = []
    for row, record in iter_file_rows(file, path):
        if isinstance(record, DataError):
            raise record
        prompt = _row_prompt(record, path, row)
        explicit = record.get("id")
        if explicit is not None and (isinstance(explicit, bool) or not isinstance(explicit, (str, int))):
            raise DataError(f"expected a string or integer id, got {type(explicit).__name__}", file=path, row=row,
                            field="id")
        key = str(explicit) if explicit is not None else prompt_id(prompt)
        if key in seen:
            if explicit is not None and seen[key] != prompt:
                raise DataError(f"id {key!r} was already used by an earlier row with a different prompt; expected "
                                "unique ids", file=path, row=row, field="id")
            logger.warning("file %s, row %d: prompt %s repeats an earlier row; sampled once", path, row, key)
            continue
        seen[key] = prompt
        prompts.append((key, prompt))
    if not prompts:
        raise DataError("no prompts; expected rows with 'prompt' or 'messages'", file=path)
    return prompts


def _row_prompt(record, path: str, row: int) -> object:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", file=path, row=row)
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"expected a non-empty string, got {prompt!r:.60}", file=path, row=row, field="prompt")
        return prompt
    if "messages" not in record:
        raise DataError(f"expected a 'prompt' (string) or 'messages' (list of messages) field, found keys "
                        f"{', '.join(record) or 'none'}", file=path, row=row)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a non-empty list of messages, got {type(messages).__name__}", file=path, row=row,
                        field="messages")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"message {index} must be a {{'role': str, 'content': str}} mapping, got {message!r:.80}",
                            file=path, row=row, field="messages")
    messages = list(messages)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] == "system":
        raise DataError("no user turn to answer; expected messages ending with a user turn (a final assistant "
                        "turn is dropped)", file=path, row=row, field="messages")
    return messages
