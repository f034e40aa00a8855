"""Runs inside the LLaMA-Factory oracle venv (tests/test_templates_llamafactory.py creates it): encodes preference rows
with LLaMA-Factory's own template and pairwise (DPO) or feedback (KTO) processor and prints their token ids as JSON.

Input (stdin, JSON): {"tokenizers": {key: saved tokenizer dir}, "probes": [texts], "seqlen": [[source_len,
target_len, cutoff_len], ...], "cases": [{"template", "tokenizer", "enable_thinking", "cutoff_len" (optional, no
cutoff when absent), "kind" ("pairwise", the default, or "feedback"), "rows": [pairwise: {"system", "prompt":
[user/assistant messages], "chosen", "rejected"}; feedback: {"system", "prompt", "completion", "label"}]}]}.
Output (JSON, written to the file named by the first argument): {"probes": {key: [ids of each probe text]},
"seqlen": [LLaMA-Factory's infer_seqlen of each triple], "cases": [{"jinja": LLaMA-Factory's Jinja export or null,
"rows": [pairwise: {"prompt_ids", "chosen_ids", "rejected_ids", "via"}; feedback: {"prompt_ids", "completion_ids",
"label", "kl_prompt_ids", "kl_completion_ids"}; or {"error"}, ...]}, ...]}.

A feedback case's rows go through `FeedbackDatasetProcessor.preprocess_dataset` as ONE batch, as LLaMA-Factory
hands them over with one preprocessing worker and at most `preprocessing_batch_size` (1000) rows: row i's KL
response is row i - 1's (row 0's is the last row's). Its prompt and response (and the KL ones) are split at the
labels' first non-ignored token.

LLaMA-Factory's `get_template_and_fix_tokenizer` changes the tokenizer (EOS replaced by the template's first stop
word, stop words added as special tokens, pad set): each case starts from the tokenizer as loaded (its EOS and pad
restored, or a fresh copy when tokens were added). The ids are those of
`PairwiseDatasetProcessor.preprocess_dataset` (what LLaMA-Factory's DPO/ORPO training reads), with the case's
`cutoff_len`. A
multimodal template whose plugin needs a real processor even for text-only rows falls back to
`template.encode_oneturn` plus the processor's EOS rule ("via": "encode_oneturn").
"""

import copy
import json
import sys
import types

from transformers import AutoTokenizer

from llamafactory.data.processor import FeedbackDatasetProcessor, PairwiseDatasetProcessor
from llamafactory.data.processor.processor_utils import infer_seqlen
from llamafactory.data.template import get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX


NO_CUTOFF = 10**6


def data_args(template: str, enable_thinking: bool, cutoff_len: int = NO_CUTOFF):
    return types.SimpleNamespace(template=template, train_on_prompt=False, tool_format=None, default_system=None,
                                 enable_thinking=enable_thinking, preserve_thinking=False, cutoff_len=cutoff_len)


def split_at_labels(input_ids, labels):
    """(prompt ids, response ids): the prompt is the ignored-label part."""
    prompt_len = labels.count(IGNORE_INDEX)
    return input_ids[:prompt_len], input_ids[prompt_len:]


def encode_row(template, tokenizer, args, row):
    prompt = row["prompt"]
    responses = [{"role": "assistant", "content": row["chosen"]}, {"role": "assistant", "content": row["rejected"]}]
    examples = {"_prompt": [prompt], "_response": [responses], "_system": [row["system"] or ""], "_tools": [""],
                "_images": [None], "_videos": [None], "_audios": [None]}
    try:
        processor = PairwiseDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=args)
        out = processor.preprocess_dataset(examples)
        prompt_ids, chosen_ids = split_at_labels(out["chosen_input_ids"][0], out["chosen_labels"][0])
        rejected_prompt_ids, rejected_ids = split_at_labels(out["rejected_input_ids"][0], out["rejected_labels"][0])
        if rejected_prompt_ids != prompt_ids:
            return {"error": "LLaMA-Factory gave chosen and rejected different prompts"}
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "via": "processor"}
    except (AttributeError, TypeError, ValueError) as error:
        fallback_reason = f"{type(error).__name__}: {error}"
    system = row["system"] or None
    prompt_ids, chosen_ids = template.encode_oneturn(tokenizer, prompt + responses[:1], system, None)
    _, rejected_ids = template.encode_oneturn(tokenizer, prompt + responses[1:], system, None)
    if template.efficient_eos:
        chosen_ids, rejected_ids = chosen_ids + [tokenizer.eos_token_id], rejected_ids + [tokenizer.eos_token_id]
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
            "via": "encode_oneturn", "fallback_reason": fallback_reason}


def jinja_export(template, tokenizer):
    try:
        return template._get_jinja_template(tokenizer)
    except ValueError:  # LLaMA-Factory exports no Jinja for templates that write a token by id
        return None


def encode_feedback_rows(template, tokenizer, args, rows):
    """Every row through the feedback processor in one batch (LLaMA-Factory's KTO input: the completion in the first
    response slot for a desirable row, in the second for an undesirable one)."""
    empty = {"role": "assistant", "content": ""}
    responses = []
    for row in rows:
        completion = {"role": "assistant", "content": row["completion"]}
        responses.append([completion, empty] if row["label"] else [empty, completion])
    count = len(rows)
    examples = {"_prompt": [row["prompt"] for row in rows], "_response": responses,
                "_system": [row["system"] or "" for row in rows], "_tools": [""] * count, "_images": [None] * count,
                "_videos": [None] * count, "_audios": [None] * count}
    processor = FeedbackDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=args)
    out = processor.preprocess_dataset(examples)
    if len(out["input_ids"]) != count:
        return [{"error": f"LLaMA-Factory kept {len(out['input_ids'])} of {count} rows"}] * count
    encoded = []
    for index in range(count):
        prompt_ids, completion_ids = split_at_labels(out["input_ids"][index], out["labels"][index])
        kl_prompt_ids, kl_completion_ids = split_at_labels(out["kl_input_ids"][index], out["kl_labels"][index])
        encoded.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": out["kto_tags"][index],
                        "kl_prompt_ids": kl_prompt_ids, "kl_completion_ids": kl_completion_ids})
    return encoded


def run_case(case, tokenizer):
    args = data_args(case["template"], case["enable_thinking"], case.get("cutoff_len") or NO_CUTOFF)
    try:
        template = get_template_and_fix_tokenizer(tokenizer, args)
    except Exception as error:  # noqa: BLE001 - reported to the test, which decides
        return {"jinja": None, "rows": [{"error": f"{type(error).__name__}: {error}"}] * len(case["rows"])}
    if case.get("kind") == "feedback":
        try:
            rows = encode_feedback_rows(template, tokenizer, args, case["rows"])
        except Exception as error:  # noqa: BLE001
            rows = [{"error": f"{type(error).__name__}: {error}"}] * len(case["rows"])
        return {"jinja": None, "rows": rows}
    rows = []
    for row in case["rows"]:
        try:
            rows.append(encode_row(template, tokenizer, args, row))
        except Exception as error:  # noqa: BLE001
            rows.append({"error": f"{type(error).__name__}: {error}"})
    return {"jinja": jinja_export(template, tokenizer), "rows": rows}


def main():
    request = json.load(sys.stdin)
    pristine = {key: AutoTokenizer.from_pretrained(path) for key, path in request["tokenizers"].items()}
    working = {key: copy.deepcopy(tokenizer) for key, tokenizer in pristine.items()}
    output = {"probes": {key: [tokenizer.encode(text, add_special_tokens=False) for text in request["probes"]]
                         for key, tokenizer in pristine.items()},
              "seqlen": [list(infer_seqlen(*triple)) for triple in request.get("seqlen", [])],
              "cases": []}
    for case in request["cases"]:
        key = case["tokenizer"]
        output["cases"].append(run_case(case, working[key]))
        if len(working[key]) != len(pristine[key]):
            working[key] = copy.deepcopy(pristine[key])
        else:
            working[key].eos_token, working[key].pad_token = pristine[key].eos_token, pristine[key].pad_token
    with open(sys.argv[1], "w", encoding="utf-8") as handle:
        json.dump(output, handle)


if __name__ == "__main__":
    main()
