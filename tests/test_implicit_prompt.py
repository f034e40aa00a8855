"""Implicit prompts in text rows ({"chosen": prompt + response, "rejected": prompt + response}): where the prompt
ends, for spaced text (unchanged: a whitespace boundary), Chinese and Japanese (a character boundary), and mixed
Chinese/English text (a Latin word is never cut), compared with TRL 1.16's extract_prompt and property-tested.

Where preftune and TRL differ, on purpose (TRL cuts at the first differing character and gives back one space):
- a Latin word shared in part ("four" / "five", "Python" / "Pascal"): TRL cuts inside it ("A: f" + "our");
  preftune backs off to the word's start ("A:" + " four"; "我喜欢" + "Python").
- whitespace before the cut: TRL moves one " " into the responses; preftune moves all of it (newlines, tabs, the
  ideographic space U+3000 included), so the prompt never ends in whitespace.
- one text a prefix of the other, or nothing shared: TRL returns a short or empty prompt; preftune refuses the row.
On Chinese or Japanese text with no space or Latin letter at the cut, the two agree (tested below).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from preftune.data.formats import canonicalize_records, implicit_prompt_end
from preftune.errors import DataError

# Alphabets by class, written out here (not taken from preftune) so the boundary rule is checked independently.
LATIN = "abcdeftxyzé019.,!?-'"
SPACES = " \n\t\u3000"  # U+3000: the ideographic (fullwidth) space
UNSPACED = "天空是蓝色的你好世界北京上海日本の東京ですカタカナ、。，！？：（）「」《》ＡＢ１２ㄅㄆ𠀀𠀁"
COMBINING = "\u0301\u20dd\ufe0f\u200d"  # acute accent, enclosing circle, variation selector 16, zero-width joiner
ZWJ = "\u200d"
HAN = "天空是蓝色的你好世界北京上海东西南"


def split(chosen: str, rejected: str | list[str]) -> dict:
    row = canonicalize_records([{"chosen": chosen, "rejected": rejected}], source="mem").dataset[0]
    return {key: row[key] for key in ("prompt", "chosen", "rejected")}


def spec_boundary(before: str, after: str) -> bool:
    """The rule, stated on the alphabets above: cut at whitespace or at the text's end; never before a combining
    mark or joiner, nor after a joiner; next to a Chinese/Japanese character or CJK punctuation any cut is fine;
    never inside Latin."""
    if after == "" or after in SPACES or before in SPACES:
        return True
    if after in COMBINING or before == ZWJ:
        return False
    return before in UNSPACED or after in UNSPACED


def old_prompt_end(texts: list[str]) -> int:
    """preftune's rule before Chinese support (whitespace only), kept as the oracle for spaced text."""
    shared = os.path.commonprefix(texts)
    end = len(shared)
    if not all(end == len(text) or text[end].isspace() for text in texts):
        while end > 0 and not shared[end - 1].isspace():
            end -= 1
    while end > 0 and shared[end - 1].isspace():
        end -= 1
    return end


# ---------------------------------------------------------------- examples

@pytest.mark.parametrize("chosen, rejected, prompt", [
    ("天空是蓝色的。", "天空是绿色的。", "天空是"),
    ("中国的首都是北京。", "中国的首都是上海。", "中国的首都是"),
    ("问题：天空是什么颜色？\n回答：蓝色", "问题：天空是什么颜色？\n回答：绿色", "问题：天空是什么颜色？\n回答："),
    ("日本の首都は東京です", "日本の首都は大阪です", "日本の首都は"),
    ("カタカナで書く", "カタカナで読む", "カタカナで"),
    ("请回答：Ａ", "请回答：Ｂ", "请回答："),  # fullwidth letters are characters of their own
])
def test_chinese_and_japanese_prompts_end_at_the_last_shared_character_as_in_trl(chosen, rejected, prompt):
    from trl.data_utils import extract_prompt

    expected = {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}
    assert split(chosen, rejected) == expected == extract_prompt({"chosen": chosen, "rejected": rejected})


@pytest.mark.parametrize("chosen, rejected, prompt", [
    ("我喜欢Python编程", "我喜欢Pascal编程", "我喜欢"),  # TRL: "我喜欢P" + "ython编程"
    ("用Python写", "用Perl写", "用"),
    ("Python很好", "Python很棒", "Python很"),
    ("答案是 four", "答案是 five", "答案是"),  # TRL: "答案是 f" + "our"
    ("The answer is 天", "The answer is 地", "The answer is"),  # the space goes to the responses, as in TRL
    ("题目：\u3000蓝", "题目：\u3000绿", "题目："),  # the ideographic space goes to the responses (TRL keeps it)
    ("在2024年", "在2025年", "在"),  # digits are a word: "202" is not cut off
])
def test_mixed_chinese_english_never_cuts_a_latin_word(chosen, rejected, prompt):
    assert split(chosen, rejected) == {"prompt": prompt, "chosen": chosen[len(prompt):],
                                       "rejected": rejected[len(prompt):]}


def test_spaced_text_keeps_the_whitespace_rule():
    assert split("Q: 2+2? A: four", "Q: 2+2? A: five") == {"prompt": "Q: 2+2? A:", "chosen": " four",
                                                          "rejected": " five"}
    assert split("Привет, мир", "Привет, друг") == {"prompt": "Привет,", "chosen": " мир", "rejected": " друг"}
    # Korean writes spaces between words, so a Hangul word is not cut either.
    assert split("하늘은 파란색", "하늘은 파랑") == {"prompt": "하늘은", "chosen": " 파란색", "rejected": " 파랑"}


def test_a_cut_never_separates_a_character_from_its_combining_mark_or_joiner():
    # "天\ufe0f" (variation selector) and "é" written as e + U+0301 stay whole.
    assert split("你好天\ufe0f地", "你好天\ufe0f人")["prompt"] == "你好天\ufe0f"
    assert split("你好天\ufe0f", "你好天")["prompt"] == "你好"
    assert split("中文cafe\u0301好", "中文cafe\u0301坏")["prompt"] == "中文cafe\u0301"
    assert split("你好天\u200d地", "你好天\u200d人")["prompt"] == "你好"


def test_chinese_rows_with_nothing_shared_are_refused_naming_the_row():
    with pytest.raises(DataError, match="no prompt can be extracted") as caught:
        canonicalize_records([{"chosen": "北京", "rejected": "上海"}], source="数据.jsonl")
    assert (caught.value.file, caught.value.row, caught.value.field) == ("数据.jsonl", 0, "prompt")


def test_several_rejected_chinese_responses_share_one_prompt():
    assert split("天空是蓝色的", ["天空是绿色的", "天空是灰色的"]) == {
        "prompt": "天空是", "chosen": "蓝色的", "rejected": ["绿色的", "灰色的"]}


# ---------------------------------------------------------------- properties

def texts(alphabet: str, min_size: int = 0, max_size: int = 12):
    return st.text(alphabet=alphabet, min_size=min_size, max_size=max_size)


ANY = LATIN + SPACES + UNSPACED + COMBINING
rows = st.tuples(texts(ANY), texts(ANY, 1), st.lists(texts(ANY, 1), min_size=1, max_size=3))


@settings(max_examples=200, deadline=None)
@given(rows)
def test_the_prompt_is_the_longest_shared_prefix_ending_at_a_boundary(row):
    prefix, chosen_tail, rejected_tails = row
    full = [prefix + chosen_tail, *(prefix + tail for tail in rejected_tails)]
    shared = os.path.commonprefix(full)
    end = implicit_prompt_end(full)
    candidates = [cut for cut in range(1, len(shared) + 1) if shared[cut - 1] not in SPACES
                  and all(spec_boundary(shared[cut - 1], text[cut:cut + 1]) for text in full)]
    assert end == max(candidates, default=0)


@settings(max_examples=200, deadline=None)
@given(texts(ANY, 1), texts(LATIN + UNSPACED + COMBINING, 1), st.lists(texts(LATIN + UNSPACED + COMBINING, 1),
                                                                       min_size=1, max_size=3))
def test_prompt_and_responses_reassemble_each_text_exactly(prefix, chosen_tail, rejected_tails):
    chosen, rejected = prefix + chosen_tail, [prefix + tail for tail in rejected_tails]
    # Each text goes on past the shared part with no whitespace (tails have none), so no response is empty.
    assume(len(os.path.commonprefix([chosen, *rejected])) < min(map(len, [chosen, *rejected])))
    try:
        row = split(chosen, rejected if len(rejected) > 1 else rejected[0])
    except DataError as error:
        assert "no prompt can be extracted" in str(error)
        assert implicit_prompt_end([chosen, *rejected]) == 0
        return
    responses = row["rejected"] if len(rejected) > 1 else [row["rejected"]]
    assert row["prompt"] and row["prompt"][-1] not in SPACES
    assert row["prompt"] + row["chosen"] == chosen
    assert [row["prompt"] + response for response in responses] == rejected


SPACED = "abcdefxyzAB019.,!?-'é" + " \n\t"


@settings(max_examples=200, deadline=None)
@given(texts(SPACED), st.lists(texts(SPACED), min_size=2, max_size=4))
def test_text_without_chinese_or_japanese_splits_exactly_as_before(prefix, tails):
    full = [prefix + tail for tail in tails]
    assert implicit_prompt_end(full) == old_prompt_end(full)


@settings(max_examples=200, deadline=None)
@given(texts(HAN, 1), texts(HAN, 1), texts(HAN, 1))
def test_pure_chinese_rows_split_exactly_as_trl_extract_prompt(prefix, chosen_tail, rejected_tail):
    from trl.data_utils import extract_prompt

    assume(chosen_tail[0] != rejected_tail[0])  # TRL mishandles one text being a prefix of the other
    example = {"chosen": prefix + chosen_tail, "rejected": prefix + rejected_tail}
    assert split(**example) == extract_prompt(example)
