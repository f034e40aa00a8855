"""Runs inside the LLaMA-Factory oracle venv (tests/test_templates_llamafactory.py creates it): encodes preference rows
with LLaMA-Factory's own template and pairwise processor and prints their token ids as JSON.

Input (stdin, JSON): {"tokenizers": {key: saved tokenizer dir}, "probes": [texts], "cases": [{"template",
"tokenizer", "enable_thinking", "rows": [{"system", "prompt": [user/assistant messages], "chosen", "rejected"}]}]}.
Output (JSON, written to the file named by the first argument): {"probes": {key: [ids of each probe text]},
"cases": [{"jinja": LLaMA-Factory's Jinja export or null, "rows": [{"prompt_ids", "chosen_ids", "rejected_ids",
"via"} or {"error"}, ...]}, ...]}.

LLaMA-Factory's `get_template_and_fix_tokenizer` changes the tokenizer (EOS replaced by the template's first stop
word, stop words added as special tokens, pad set): each case starts from the tokenizer as loaded (its EOS and pad
restored, or a fresh copy when tokens were added). The ids are those of
`PairwiseDatasetProcessor.preprocess_dataset` (what LLaMA-Factory's DPO/ORPO training reads), with no cutoff. A
multimodal template whose plugin needs a real processor even for text-only rows falls back to
`template.encode_oneturn` plus the processor's EOS rule ("via": "encode_oneturn").
"""

import copy
import json
import sys
import types

from transformers import AutoTokenizer

from llamafactory.data.processor import PairwiseDatasetProcessor
from llamafactory.data.template import get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX


def data_args(template: str, enable_thinking: bool):
    return types.SimpleNamespace(template=template, train_on_prompt=False, tool_format=None, default_system=None,
                                 enable_thinking=enable_thinking, preserve_thinking=False, cutoff_len=10**6)


def encode_row(template, tokenizer, args, row):
    prompt = row["prompt"]
    responses = [{"role": "assistant", "content": row["chosen"]}, {"role": "assistant", "content": row["rejected"]}]
    examples = {"_prompt": [prompt], "_response": [responses], "_system": [row["system"] or ""], "_tools": [""],
                "_images": [None], "_videos": [None], "_audios": [None]}
    try:
        processor = PairwiseDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=args)
        out = processor.preprocess_dataset(examples)
        prompt_len = out["chosen_labels"][0].count(IGNORE_INDEX)
        chosen, rejected = out["chosen_input_ids"][0], out["rejected_input_ids"][0]
        return {"prompt_ids": chosen[:prompt_len], "chosen_ids": chosen[prompt_len:],
                "rejected_ids": rejected[prompt_len:], "via": "processor"}
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


def run_case(case, tokenizer):
    args = data_args(case["template"], case["enable_thinking"])
    try:
        template = get_template_and_fix_tokenizer(tokenizer, args)
    except Exception as error:  # noqa: BLE001 - reported to the test, which decides
        return {"jinja": None, "rows": [{"error": f"{type(error).__name__}: {error}"}] * len(case["rows"])}
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
