"""Judges (preftune.judges): reward functions by dotted path, reward-model directories, the sentiment-word rule,
pairwise human labels, and turning scored candidates into pairs."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from preftune.errors import ConfigError, DataError
from preftune.judges import (
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    PairwiseLabels,
    load_judge,
    pairs_from_candidates,
    score_candidates,
    sentiment_word_score,
)


# --------------------------------------------------------------------------------------------------------------
# The sentiment-word rule
# --------------------------------------------------------------------------------------------------------------


def test_sentiment_word_score_counts_positive_minus_negative_words_of_the_response_only():
    prompts = ["She was sad and angry.", "", "x"]
    responses = ["Lily was Happy, happy and glad! But the dog was sad.", "The box was on the table.",
                 "He cried. It hurt. \"Sorry,\" he said."]
    assert sentiment_word_score(prompts, responses) == [3 - 1, 0, 0 - 3]


def test_the_word_lists_are_lower_case_words_and_disjoint():
    assert not POSITIVE_WORDS & NEGATIVE_WORDS
    assert all(word.isalpha() and word.islower() for word in POSITIVE_WORDS | NEGATIVE_WORDS)


# --------------------------------------------------------------------------------------------------------------
# Reward functions by dotted path
# --------------------------------------------------------------------------------------------------------------

REWARDS_MODULE = '''
from preftune.judges import per_item

def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]

@per_item
def marked_item_reward(prompt, response):
    return float(response.count("a"))

def item_reward(prompt, response):
    return float(len(prompt))

def short_list(prompts, responses):
    return [1.0]

def nan_reward(prompts, responses):
    return [float("nan")] * len(responses)

def text_reward(prompts, responses):
    return ["high"] * len(responses)

def tensor_reward(prompts, responses):
    import torch
    return torch.arange(len(responses), dtype=torch.float32)

def echo_prompts(prompts, responses):
    global SEEN
    SEEN = list(prompts)
    return [0.0] * len(responses)

NOT_CALLABLE = 3
'''


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(REWARDS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_a_batch_reward_function_scores_every_response(rewards_module):
    judge = load_judge(f"{rewards_module}:length_reward")
    assert judge.score(["p", "q"], ["abc", ""]) == [3.0, 0.0]
    assert load_judge(f"{rewards_module}:tensor_reward").score(["p"] * 3, ["a"] * 3) == [0.0, 1.0, 2.0]


def test_per_item_functions_by_decorator_or_by_flag(rewards_module):
    assert load_judge(f"{rewards_module}:marked_item_reward").score(["p", "p"], ["banana", "kiwi"]) == [3.0, 0.0]
    assert load_judge(f"{rewards_module}:item_reward", per_item=True).score(["abcd", "ab"], ["x", "y"]) == [4.0, 2.0]
    with pytest.raises(ConfigError, match="per_item"):  # called with lists, it returns one number
        load_judge(f"{rewards_module}:item_reward").score(["ab", "cd"], ["x", "y"])


def test_conversation_prompts_reach_functions_as_role_content_lines(rewards_module):
    judge = load_judge(f"{rewards_module}:echo_prompts")
    judge.score([[{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}], "plain"], ["a", "b"])
    assert sys.modules[rewards_module].SEEN == ["system: S\nuser: Hi", "plain"]


@pytest.mark.parametrize("name, message", [
    ("short_list", "1 scores for 2 responses"),
    ("nan_reward", "finite"),
    ("text_reward", "str"),
    ("NOT_CALLABLE", "not callable"),
    ("missing_function", "no attribute 'missing_function'"),
])
def test_bad_reward_functions_are_clear_config_errors(rewards_module, name, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_judge(f"{rewards_module}:{name}").score(["p", "q"], ["a", "b"])
    assert error.value.key == "judge"


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("just_a_name", "neither a directory nor"),
    (":fn", "neither a directory nor"),
])
def test_bad_specs_are_clear_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_judge(spec)


def test_the_builtin_rule_loads_by_its_documented_spec():
    judge = load_judge("preftune.judges:sentiment_word_score")
    assert judge.score(["p"], ["a happy, kind dog"]) == [2.0]


# --------------------------------------------------------------------------------------------------------------
# Reward-model directories
# --------------------------------------------------------------------------------------------------------------


def _tiny_reward_model(directory, stories_model_dir, num_labels=1):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         num_labels=num_labels, pad_token_id=0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(stories_model_dir).save_pretrained(directory)
    return model.eval()


def test_a_reward_model_directory_scores_with_its_logit_batched_as_one_by_one(tmp_path, stories_model_dir):
    model = _tiny_reward_model(tmp_path / "rm", stories_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    prompts = ["Once upon a time", "Tom had a ball.", "The cat"]
    responses = [" there was a dog.", " It was red and very very big and round.", ""]
    judge = load_judge(str(tmp_path / "rm"), batch_size=2)
    scores = judge.score(prompts, responses)
    with torch.no_grad():  # each text alone, no padding at all
        expected = [model(**tokenizer(p + r, return_tensors="pt")).logits[0, 0].item() for p, r in zip(prompts, responses)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 3


def test_reward_model_directory_errors(tmp_path, stories_model_dir):
    with pytest.raises(ConfigError, match="no config.json"):
        load_judge(str(tmp_path))
    _tiny_reward_model(tmp_path / "two", stories_model_dir, num_labels=2)
    with pytest.raises(ConfigError, match="num_labels=2; expected 1"):
        load_judge(str(tmp_path / "two"))
    pickled = _tiny_reward_model(tmp_path / "pickle", stories_model_dir)
    (tmp_path / "pickle" / "model.safetensors").unlink()  # only pickle weights left: refused, never unpickled
    torch.save(pickled.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="safetensors"):
        load_judge(str(tmp_path / "pickle"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_judge(str(tmp_path / "file.txt"))


# --------------------------------------------------------------------------------------------------------------
# Pairwise human labels
# --------------------------------------------------------------------------------------------------------------


def test_pairwise_labels_compare_in_either_order(tmp_path):
    rows = [
        {"prompt": "p", "response_a": "good", "response_b": "bad", "winner": "a"},
        {"prompt": "p", "response_a": "meh", "response_b": "fine", "winner": "tie"},
        {"prompt": "q", "response_a": "zz", "response_b": "aa", "winner": "b"},
        {"prompt": [{"role": "user", "content": "hi"}], "response_a": "x", "response_b": "y", "winner": "a"},
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    labels = PairwiseLabels.from_file(path)
    assert labels.compare("p", "good", "bad") == 1.0
    assert labels.compare("p", "bad", "good") == 0.0
    assert labels.compare("p", "fine", "meh") == 0.5
    assert labels.compare("q", "zz", "aa") == 0.0 and labels.compare("q", "aa", "zz") == 1.0
    assert labels.compare([{"role": "user", "content": "hi"}], "y", "x") == 0.0
    assert labels.compare("q", "good", "bad") is None  # same responses, other prompt: never labelled
    assert labels.compare("p", "good", "meh") is None


def test_repeated_labels_of_one_pair_average():
    labels = PairwiseLabels.from_rows([
        {"prompt": "p", "response_a": "x", "response_b": "y", "winner": "a"},
        {"prompt": "p", "response_a": "y", "response_b": "x", "winner": "a"},
        {"prompt": "p", "response_a": "x", "response_b": "y", "winner": "a"},
    ])
    assert labels.compare("p", "x", "y") == pytest.approx(2 / 3)


@pytest.mark.parametrize("row, field", [
    ({"prompt": "p", "response_a": "x", "response_b": "y", "winner": "c"}, "winner"),
    ({"prompt": "p", "response_a": "x", "winner": "a"}, "response_b"),
    ({"prompt": "p", "response_a": ["x"], "response_b": "y", "winner": "a"}, "response_a"),
])
def test_bad_label_rows_name_row_and_field(tmp_path, row, field):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response_a": "x", "response_b": "y", "winner": "a"}) + "\n"
                    + json.dumps(row) + "\n")
    with pytest.raises(DataError) as error:
        PairwiseLabels.from_file(path)
    assert (error.value.row, error.value.field, error.value.file) == (1, field, str(path))


# --------------------------------------------------------------------------------------------------------------
# Scored candidates -> pairs
# --------------------------------------------------------------------------------------------------------------

ROWS = [
    {"prompt_id": "0", "prompt": "p0", "responses": ["a", "b", "c", "d"]},
    {"prompt_id": "1", "prompt": "p1", "responses": ["e", "f"]},
    {"prompt_id": "2", "prompt": [{"role": "user", "content": "hi"}], "responses": ["g", "h", "i"]},
    {"prompt_id": "3", "prompt": "p3", "responses": ["only"]},
]
SCORES = [[1.0, 3.0, -2.0, 3.0], [0.5, 0.5], [0.0, 0.25, 2.0], [9.0]]


def test_best_vs_worst_takes_one_pair_per_prompt_and_skips_ties():
    pairs, stats = pairs_from_candidates(ROWS, SCORES, mode="best_vs_worst")
    assert pairs == [
        {"prompt": "p0", "chosen": "b", "rejected": "c", "score_chosen": 3.0, "score_rejected": -2.0},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "i"}],
         "rejected": [{"role": "assistant", "content": "g"}], "score_chosen": 2.0, "score_rejected": 0.0},
    ]
    assert (stats.prompts, stats.responses, stats.pairs, stats.ties_skipped, stats.too_few_responses) == (4, 10, 2, 1, 1)


def test_all_pairs_orders_each_pair_by_score_and_applies_min_gap():
    pairs, stats = pairs_from_candidates(ROWS, SCORES, mode="all_pairs", min_gap=0.3)
    got = {(pair["chosen"] if isinstance(pair["chosen"], str) else pair["chosen"][0]["content"],
            pair["rejected"] if isinstance(pair["rejected"], str) else pair["rejected"][0]["content"]) for pair in pairs}
    # by hand: every unordered pair whose gap exceeds 0.3, higher score chosen
    expected = set()
    for row, scores in zip(ROWS, SCORES):
        for i in range(len(scores)):
            for j in range(len(scores)):
                if scores[i] - scores[j] > 0.3:
                    expected.add((row["responses"][i], row["responses"][j]))
    assert got == expected and len(pairs) == len(expected) == 7
    assert stats.ties_skipped == (6 + 1 + 3) - 7


def test_pairs_from_candidates_refuses_unknown_modes():
    with pytest.raises(ConfigError) as error:
        pairs_from_candidates(ROWS, SCORES, mode="best")
    assert error.value.key == "mode"


def test_score_candidates_keeps_responses_with_their_rows():
    judge = load_judge("preftune.judges:sentiment_word_score")
    rows = [{"prompt": "p", "responses": ["happy", "sad sad", "x"]}, {"prompt": "q", "responses": ["kind"]}]
    assert score_candidates(judge, rows, batch_size=2) == [[1.0, -2.0, 0.0], [1.0]]
