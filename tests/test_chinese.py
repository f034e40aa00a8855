"""Chinese through everything: readers (in Chinese-named folders and files), LLaMA-Factory's dpo_zh_demo,
`preftune data check`, tokenization, training, `preftune report`, `preftune sample` and the labeling app.

What is checked is that Chinese text comes out exactly as it went in (never \\uXXXX-escaped where people read it,
never cut inside a character), compared with the rows written out by hand or parsed here independently."""

from __future__ import annotations

import gzip
import json
import math
import re

import datasets
import pandas as pd
import pytest
import torch
from conftest import shared_asset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from preftune.cli import main
from preftune.data.formats import load_preference_data
from preftune.data.templates import get_template
from preftune.data.tokenize import TokenizeSettings, tokenize_pair

ESCAPED = re.compile(r"\\u[0-9a-fA-F]{4}")


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# Each form as written in a file, and the canonical row preftune must make of it.
TEXT_EXPLICIT = ([{"prompt": "天空是什么颜色？", "chosen": "蓝色。", "rejected": "绿色。"},
                  {"prompt": "用一句话介绍北京。", "chosen": "北京是中国的首都。", "rejected": "不知道。"}],
                 [{"prompt": "天空是什么颜色？", "chosen": "蓝色。", "rejected": "绿色。"},
                  {"prompt": "用一句话介绍北京。", "chosen": "北京是中国的首都。", "rejected": "不知道。"}])
TEXT_IMPLICIT = ([{"chosen": "中国的首都是北京。", "rejected": "中国的首都是上海。"},
                  {"chosen": "问：1+1等于几？\n答：2", "rejected": "问：1+1等于几？\n答：3"}],
                 [{"prompt": "中国的首都是", "chosen": "北京。", "rejected": "上海。"},
                  {"prompt": "问：1+1等于几？\n答：", "chosen": "2", "rejected": "3"}])
CHAT_EXPLICIT = ([{"prompt": [{"role": "system", "content": "你是一个乐于助人的助手。"}] + user("你好！"),
                   "chosen": assistant("你好！有什么可以帮你的吗？"), "rejected": assistant("走开。")}],
                 [{"prompt": [{"role": "system", "content": "你是一个乐于助人的助手。"}] + user("你好！"),
                   "chosen": assistant("你好！有什么可以帮你的吗？"), "rejected": assistant("走开。")}])
CHAT_IMPLICIT = ([{"chosen": user("长城有多长？") + assistant("约两万一千公里。"),
                   "rejected": user("长城有多长？") + assistant("十米。")}],
                 [{"prompt": user("长城有多长？"), "chosen": assistant("约两万一千公里。"),
                   "rejected": assistant("十米。")}])
FORMS = {"text_explicit": TEXT_EXPLICIT, "text_implicit": TEXT_IMPLICIT, "chat_explicit": CHAT_EXPLICIT,
         "chat_implicit": CHAT_IMPLICIT}


def rows_of(loaded):
    return [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in loaded.dataset]


def write_file(folder, name, rows):
    """`rows` in the format named by the suffix of `name`; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))  # \u escapes
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path)
    elif name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False, encoding="utf-8-sig")  # with a BOM, as Excel writes it
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------- readers


READER_CASES = [(suffix, form) for suffix in (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", "_已保存")
                for form in FORMS if not (suffix == ".csv" and form.startswith("chat"))]  # CSV cells: text only


@pytest.mark.parametrize("suffix, form", READER_CASES)
def test_every_reader_reads_chinese_rows_in_a_chinese_folder_exactly(tmp_path, suffix, form):
    written, expected = FORMS[form]
    path = write_file(tmp_path / "中文 数据", f"偏好数据{suffix}", written)
    loaded = load_preference_data(str(path))
    assert rows_of(loaded) == expected and loaded.source == str(path)


def test_a_chinese_relative_path_resolves_against_dataset_dir(tmp_path):
    write_file(tmp_path / "数据目录", "偏好.jsonl", TEXT_EXPLICIT[0])
    assert rows_of(load_preference_data("偏好.jsonl", dataset_dir=str(tmp_path / "数据目录"))) == TEXT_EXPLICIT[1]


def test_a_non_utf8_chinese_file_is_refused_naming_gbk(tmp_path):
    path = tmp_path / "表格.csv"
    path.write_bytes("prompt,chosen,rejected\n天空,蓝,绿\n".encode("gb18030"))
    with pytest.raises(Exception, match=r"expected UTF-8 text; a file saved as GBK / GB18030") as caught:
        load_preference_data(str(path))
    assert str(path) in str(caught.value)


def naive_sharegpt(row):
    """The LLaMA-Factory sharegpt ranking row as a canonical conversational pair, parsed independently."""
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    prompt = [{"role": roles[turn["from"]], "content": turn["value"]} for turn in row["conversations"]]
    return {"prompt": prompt, "chosen": assistant(row["chosen"]["value"]),
            "rejected": assistant(row["rejected"]["value"])}


def test_llamafactory_dpo_zh_demo_reads_every_row_exactly():
    folder = shared_asset("llamafactory")
    raw = json.loads((folder / "dpo_zh_demo.json").read_text(encoding="utf-8"))
    loaded = load_preference_data("dpo_zh_demo", dataset_dir=str(folder))
    assert loaded.is_conversational and not loaded.skipped_rows
    assert rows_of(loaded) == [naive_sharegpt(row) for row in raw]
    assert sum("的" in row["chosen"][0]["content"] for row in rows_of(loaded)) > 250  # it is Chinese


def test_a_chinese_dataset_name_in_a_chinese_registry_folder(tmp_path):
    folder = shared_asset("llamafactory")
    raw = json.loads((folder / "dpo_zh_demo.json").read_text(encoding="utf-8"))[:5]
    registry = {"中文偏好": {"file_name": "偏好 数据.json", "ranking": True, "formatting": "sharegpt",
                          "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}
    target = tmp_path / "数据集 目录"
    write_file(target, "偏好 数据.json", raw)
    (target / "dataset_info.json").write_text(json.dumps(registry, ensure_ascii=False), encoding="utf-8")
    loaded = load_preference_data("中文偏好", dataset_dir=str(target))
    assert rows_of(loaded) == [naive_sharegpt(row) for row in raw]
    assert loaded.source == f"{target / '偏好 数据.json'} (dataset '中文偏好')"


# ---------------------------------------------------------------- preftune data check

CHECK_ROWS = [
    {"prompt": "天空是什么颜色？", "chosen": "蓝色。", "rejected": "绿色。"},
    {"prompt": "天空是什么颜色？", "chosen": "蓝色。", "rejected": "蓝色。"},  # 1: identical
    {"prompt": "你好", "chosen": "", "rejected": "走开。"},  # 2: empty chosen (refused by the reader)
    {"chosen": "中国的首都是北京。", "rejected": "中国的首都是上海。"},  # implicit prompt, fine
    {"chosen": "北京", "rejected": "上海"},  # 4: nothing shared, so no prompt
]


def test_data_check_reports_chinese_paths_and_row_numbers(tmp_path, capsys):
    path = write_file(tmp_path / "检查 数据", "偏好.jsonl", CHECK_ROWS)
    assert main(["data", "check", str(path)]) == 0
    table = capsys.readouterr().out
    assert table.startswith(f"[train] {path}: paired (text, 1 rejected per prompt); 5 rows read, 2 ok, 3 with problems")
    rows = dict(re.findall(r"^  (\w+) +(\d+|-)  ", table, flags=re.MULTILINE))
    assert (rows["identical_pair"], rows["empty_or_short"], rows["unreadable_row"]) == ("1", "1", "1")
    assert f"e.g. file {path}, row 4, field 'prompt': chosen and rejected share no leading words" in table


def test_data_check_json_is_readable_chinese_and_fix_round_trips(tmp_path, capsys):
    path = write_file(tmp_path / "检查 数据", "偏好.jsonl", CHECK_ROWS)
    clean = tmp_path / "输出 目录" / "干净.jsonl"
    assert main(["data", "check", str(path), "--json", "--fix", str(clean)]) == 0
    captured = capsys.readouterr()
    assert str(path) in captured.out and not ESCAPED.search(captured.out)
    report = json.loads(captured.out)["train"]
    assert report["source"] == str(path)
    assert {rule["rule"]: rule["examples"] for rule in report["rules"] if rule["count"]} == {
        "identical_pair": [1], "empty_or_short": [2], "unreadable_row": [4]}
    text = clean.read_text(encoding="utf-8")
    assert not ESCAPED.search(text)
    expected = [CHECK_ROWS[0], {"prompt": "中国的首都是", "chosen": "北京。", "rejected": "上海。"}]
    assert [json.loads(line) for line in text.splitlines()] == expected
    assert rows_of(load_preference_data(str(clean))) == expected


# ---------------------------------------------------------------- tokenization


@pytest.mark.parametrize("tokenizer_name", ["gpt2-tokenizer", "stories260K-hf"])
def test_chinese_tokenizes_losslessly_and_decodes_back_to_prompt_and_completion(tokenizer_name):
    # GPT-2: byte-level BPE. stories260K: 512 SentencePiece pieces without Chinese, but byte fallback: each Chinese
    # character becomes its 3 UTF-8 byte tokens, never unk.
    tokenizer = AutoTokenizer.from_pretrained(shared_asset(tokenizer_name))
    settings = TokenizeSettings(max_length=None, chat_template=get_template("qwen"))
    text_rows = TEXT_EXPLICIT[1] + TEXT_IMPLICIT[1]
    for row in text_rows:
        ids = tokenize_pair(dict(row, row=0), tokenizer, settings)
        assert not ids["prefix_mismatch"]
        assert tokenizer.unk_token_id not in ids["prompt_ids"][1:] + ids["chosen_ids"][:-1]  # GPT-2: unk = BOS = EOS
        decode = lambda token_ids: tokenizer.decode(token_ids, skip_special_tokens=True).removeprefix(" ")  # noqa: E731
        assert decode(ids["prompt_ids"]) == row["prompt"]
        assert decode(ids["chosen_ids"]) == row["chosen"] and decode(ids["rejected_ids"]) == row["rejected"]
        assert ids["chosen_ids"][-1] == ids["rejected_ids"][-1] == tokenizer.eos_token_id
    for row in CHAT_EXPLICIT[1] + CHAT_IMPLICIT[1]:
        ids = tokenize_pair(dict(row, row=0), tokenizer, settings)
        rendered = tokenizer.apply_chat_template(row["prompt"], chat_template=get_template("qwen"), tokenize=False,
                                                 add_generation_prompt=True)
        assert tokenizer.decode(ids["prompt_ids"], skip_special_tokens=True).removeprefix(" ") == rendered
        assert tokenizer.decode(ids["chosen_ids"]) == row["chosen"][0]["content"] + "<|im_end|>\n"
    demo = load_preference_data("dpo_zh_demo", dataset_dir=str(shared_asset("llamafactory")), max_samples=20)
    for row in demo.dataset:
        ids = tokenize_pair(row, tokenizer, settings)
        rendered = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], chat_template=get_template("qwen"),
                                                 tokenize=False)
        if tokenizer_name == "stories260K-hf":  # its normalizer (llama2.c's) turns runs of spaces into one
            rendered = re.sub(" {2,}", " ", rendered)
        assert tokenizer.decode(ids["prompt_ids"] + ids["chosen_ids"], skip_special_tokens=True).removeprefix(" ") \
            == rendered


# ---------------------------------------------------------------- training, report


SHORT_ZH_DEMO_ROWS = [50, 107]  # two of the shortest dpo_zh_demo rows (stories260K: 3 tokens per Chinese character)


@pytest.mark.slow
def test_training_on_chinese_data_with_chinese_paths_and_run_name_then_report(tmp_path, capsys):
    # The real stories260K: its tokenizer has no Chinese pieces but byte fallback, so Chinese trains losslessly
    # (tested above). Data: short dpo_zh_demo rows under a registry entry like LLaMA-Factory's, and TRL rows.
    work = tmp_path / "实验 目录"
    demo = json.loads((shared_asset("llamafactory") / "dpo_zh_demo.json").read_text(encoding="utf-8"))
    write_file(work / "数据", "dpo_zh_demo 短.json", [demo[index] for index in SHORT_ZH_DEMO_ROWS])
    entry = json.loads((shared_asset("llamafactory") / "dataset_info.json").read_text(encoding="utf-8"))["dpo_zh_demo"]
    (work / "数据" / "dataset_info.json").write_text(json.dumps({"中文偏好": dict(entry, file_name="dpo_zh_demo 短.json")},
                                                               ensure_ascii=False), encoding="utf-8")
    write_file(work / "数据", "对话.jsonl", CHAT_EXPLICIT[0] + CHAT_IMPLICIT[0])
    output = work / "输出" / "第一次 运行"
    config = work / "配置.yaml"
    config.write_text("\n".join([
        f"model_name_or_path: {shared_asset('stories260K-hf')}", "stage: dpo", "finetuning_type: full",
        "dataset: 中文偏好, 对话.jsonl", f"dataset_dir: {work / '数据'}", "template: qwen", "cutoff_len: 320",
        "per_device_train_batch_size: 4", "max_steps: 2", "logging_steps: 1", "pref_beta: 0.1",
        "learning_rate: 1.0e-3", f"output_dir: {output}", "run_name: 中文实验一号", "overwrite_cache: true"]) + "\n",
        encoding="utf-8")
    assert main(["train", str(config)]) == 0
    assert f"outputs in {output}" in capsys.readouterr().out
    summary_text = (output / "summary.json").read_text(encoding="utf-8")
    assert "中文实验一号" in summary_text and str(output) in summary_text and not ESCAPED.search(summary_text)
    used = json.loads(summary_text)["data"]["train"]
    assert (used["pairs_used"], used["pairs_truncated"], used["rows_dropped_no_room"]) == (4, 0, 0)
    history = json.loads((output / "log_history.json").read_text(encoding="utf-8"))
    assert [record["step"] for record in history if "loss" in record] == [1, 2]
    assert all(math.isfinite(record["loss"]) for record in history if "loss" in record)
    assert (output / "training_curves.png").stat().st_size > 0 and (output / "model.safetensors").exists()

    assert main(["report", str(output)]) == 0
    story = capsys.readouterr().out
    assert story.startswith(f"Run in {output}: 2 optimizer steps\nSettings: run_name 中文实验一号, loss_type sigmoid")
    assert main(["report", str(output), "--json"]) == 0
    dumped = capsys.readouterr().out
    assert not ESCAPED.search(dumped)
    report = json.loads(dumped)
    assert report["output_dir"] == str(output) and report["settings"]["run_name"] == "中文实验一号"


def test_summary_json_keeps_chinese_and_escapes_only_what_utf8_cannot_hold(tmp_path):
    from preftune.metrics import RunRecorder

    recorder = RunRecorder(tmp_path / "输出", plot=False)
    path = recorder.write_summary({"config": {"run_name": "中文实验", "output_dir": str(tmp_path / "输出")}})
    text = path.read_text(encoding="utf-8")
    assert "中文实验" in text and not ESCAPED.search(text)
    # A lone surrogate (undecodable bytes of a command-line argument) is not UTF-8: that document keeps \u escapes.
    path = recorder.write_summary({"config": {"run_name": "中文", "output_dir": "bad\udcff"}})
    assert json.loads(path.read_text(encoding="utf-8"))["config"] == {"run_name": "中文", "output_dir": "bad\udcff"}


# ---------------------------------------------------------------- sample, label


def scripted_model(tokenizer, triggers, script, folder):
    """A Llama that, greedily, answers `script` (token ids, then EOS) after any token in `triggers`.

    Attention and MLP outputs are zero, so the last hidden state is the normalised embedding of the current token:
    the model is a bigram table. Each token of the chain gets its own embedding axis, and the LM head row of the
    next token points along it. The chain's tokens must be distinct.
    """
    chain = [*script, tokenizer.eos_token_id]
    assert len(set(chain) | set(triggers)) == len(chain) + len(triggers)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in (model.model.embed_tokens.weight, model.lm_head.weight, model.model.layers[0].self_attn.o_proj.weight,
                          model.model.layers[0].mlp.down_proj.weight):
            parameter.zero_()
        axes = {token: axis for axis, token in enumerate([*triggers, *chain])}
        for token, axis in axes.items():
            model.model.embed_tokens.weight[token, axis] = 1.0
        for trigger in triggers:
            model.lm_head.weight[chain[0], axes[trigger]] = 10.0
        for token, following in zip(chain, chain[1:]):
            model.lm_head.weight[following, axes[token]] = 10.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_sample_writes_chinese_prompts_and_responses_unescaped_and_the_label_app_shows_them(tmp_path, capsys):
    from preftune.labeling.app import create_app

    tokenizer = AutoTokenizer.from_pretrained(shared_asset("stories260K-hf"))
    prompts = ["中国的首都是", user("你好，请介绍一下北京。")]
    rendered = tokenizer.apply_chat_template(prompts[1], chat_template=get_template("qwen"), tokenize=False,
                                             add_generation_prompt=True)
    triggers = [tokenizer(prompts[0])["input_ids"][-1], tokenizer(rendered)["input_ids"][-1]]
    answer = "北京"  # six byte tokens (stories260K has no Chinese pieces), all different
    script = tokenizer.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in answer.encode("utf-8")])
    work = tmp_path / "采样 目录"
    model = scripted_model(tokenizer, triggers, script, work / "模型")
    prompts_file = write_file(work, "提示.jsonl", [{"prompt": prompts[0]}, {"messages": prompts[1]}])
    out, store = work / "候选.jsonl", work / "标注.sqlite"
    assert main(["sample", "--model", str(model), "--prompts", str(prompts_file), "--out", str(out),
                 "--num-samples", "1", "--temperature", "0", "--max-new-tokens", "12", "--template", "qwen",
                 "--no-progress", "--store", str(store)]) == 0
    text = out.read_text(encoding="utf-8")
    assert not ESCAPED.search(text)
    rows = [json.loads(line) for line in text.splitlines()]
    assert [(row["prompt"], row["responses"]) for row in rows] == [(prompts[0], ["北京"]), (prompts[1], ["北京"])]

    # Cut after four of the six bytes: the response is the whole first character, not "北" + U+FFFD.
    cut = work / "截断.jsonl"
    assert main(["sample", "--model", str(model), "--prompts", str(prompts_file), "--out", str(cut), "--limit", "1",
                 "--num-samples", "1", "--temperature", "0", "--max-new-tokens", "4", "--no-progress"]) == 0
    assert json.loads(cut.read_text(encoding="utf-8"))["responses"] == ["北"]

    # The labeling app: the store imported by `sample --store` shows the Chinese prompt, and a Chinese annotator
    # name works. Each prompt has one response, so add a second one to make a pair.
    from preftune.labeling.store import import_candidates

    import_candidates(store, [{"prompt_id": rows[0]["prompt_id"], "prompt": prompts[0], "responses": ["上海"]}])
    client = create_app(store).test_client()
    assert client.post("/annotator", data={"annotator": "张三"}).status_code == 303
    page = client.get("/label").get_data(as_text=True)
    assert "中国的首都是" in page and "北京" in page and "上海" in page and "张三" in page
    pair_id = re.search(r'name="pair_id" value="(\d+)"', page).group(1)
    posted = client.post("/judge", data={"pair_id": pair_id, "annotator": "张三", "choice": "tie", "note": "都一样"},
                         headers={"Accept": "application/json"})
    assert posted.status_code == 201
    capsys.readouterr()
    assert main(["label", "status", "--db", str(store), "--json"]) == 0
    status = capsys.readouterr().out
    assert "张三" in status and json.loads(status)["annotators"] == {"张三": 1}
