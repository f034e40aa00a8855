"""README_zh.md stays in step with README.md: the same `preftune` commands and the config keys the English
examples and prose mention.

What counts:

- A command is `preftune` + a space + a subcommand of the real command-line parser (`preftune.cli.build_parser`),
  plus the nested subcommand where there is one (`preftune data check`, `preftune label serve`). Anything else after
  `preftune` (`preftune's`, `preftune.judges:...`, Chinese text) is not a command.
- A config key is a name that `preftune.config.canonical_key` knows (a field or an alias, compared as written, so
  `pref_loss` and `loss_type` are different mentions) and that appears
  1. as `name:` at the start of a line in a ```yaml block,
  2. as `name=` after a space, `(` or `,` (or at a line start) in any fenced block (`key=value` overrides, Python
     keyword arguments), or
  3. as an inline code span outside fenced blocks (prose and tables) that is `name` alone or starts with `name:`,
     `name=` or `name ` (`finetuning_type: lora`, `nonfinite_loss: skip`).
- README.md's generated table of every config key (between `<!-- config-table:start -->` and
  `<!-- config-table:end -->`) is left out of the comparison: README_zh.md does not copy it but points to it and to
  `preftune config-keys`, and keys added to the schema (and so to the table) need no Chinese edit until the English
  prose or examples mention them. Both files must then mention the same keys: README_zh.md may be shorter, but must
  neither drop a key the English text explains nor mention one it does not.
"""

from __future__ import annotations

import argparse
import re

from conftest import REPO_ROOT

from preftune.cli import build_parser
from preftune.config import canonical_key

ENGLISH, CHINESE = REPO_ROOT / "README.md", REPO_ROOT / "README_zh.md"
TABLE = re.compile(r"<!-- config-table:start -->.*?<!-- config-table:end -->", re.DOTALL)
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def read(path) -> str:
    return path.read_text(encoding="utf-8")


def without_config_table(text: str) -> str:
    return TABLE.sub("", text)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def commands(text: str) -> set[str]:
    """The `preftune <subcommand> [<nested subcommand>]` commands in `text`."""
    top = subcommands(build_parser())
    found = set()
    for first, second in re.findall(r"\bpreftune ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", text):
        if first not in top:
            continue
        nested = subcommands(top[first])
        if nested:
            found.add(f"preftune {first} {second}" if second in nested else f"preftune {first}")
        else:
            found.add(f"preftune {first}")
    return found


def config_keys(text: str) -> set[str]:
    """The config keys mentioned in `text` by the three rules of the module docstring."""
    names = set()
    for language, body in FENCE.findall(text):
        if language == "yaml":
            names |= set(re.findall(rf"^\s*({NAME}):", body, flags=re.MULTILINE))
        names |= set(re.findall(rf"(?:^|[\s(,])({NAME})=", body, flags=re.MULTILINE))
    for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)):
        match = re.match(rf"({NAME})(?:$|[:= ])", span)
        if match:
            names.add(match.group(1))
    return {name for name in names if canonical_key(name) is not None}


def missing_message(what: str, missing: set[str], file: str, other: str) -> str:
    return f"{file} lacks {what} that {other} mentions: {', '.join(sorted(missing))}"


def test_both_readmes_link_to_each_other():
    assert "(README_zh.md)" in read(ENGLISH).split("\n## ", 1)[0], "README.md: no link to README_zh.md at the top"
    assert "(README.md)" in read(CHINESE).split("\n## ", 1)[0], "README_zh.md: no link to README.md at the top"


def test_both_readmes_list_the_same_preftune_commands():
    english, chinese = commands(read(ENGLISH)), commands(read(CHINESE))
    problems = [missing_message("commands", english - chinese, "README_zh.md", "README.md") if english - chinese else "",
                missing_message("commands", chinese - english, "README.md", "README_zh.md") if chinese - english else ""]
    assert english == chinese, "; ".join(problem for problem in problems if problem)


def test_both_readmes_mention_the_same_config_keys_outside_the_generated_table():
    english, chinese = config_keys(without_config_table(read(ENGLISH))), config_keys(read(CHINESE))
    other = "README.md (outside the generated config table)"
    problems = [missing_message("config keys", english - chinese, "README_zh.md", other) if english - chinese else "",
                missing_message("config keys", chinese - english, other, "README_zh.md") if chinese - english else ""]
    assert english == chinese, "; ".join(problem for problem in problems if problem)


def test_the_rules_find_what_they_should_and_nothing_else():
    sample = "\n".join([
        "```yaml", "pref_beta: 0.1", "not_a_key: 1", "```",
        "```bash", "preftune train cfg.yaml max_steps=10 beta=0.2", "preftune label serve --db x", "```",
        "```python", "DPOConfig(output_dir=\"out\", bf16=True, tokenizer_file=path)", "```",
        "Set `finetuning_type: lora` or `nonfinite_loss`; `sigmoid` and `fsdp full_shard` too; preftune's "
        "`preftune.judges:sentiment_word_score`; preftune 的 `preftune data check`; preftune report.",
    ])
    assert config_keys(sample) == {"pref_beta", "max_steps", "beta", "output_dir", "bf16", "finetuning_type",
                                   "nonfinite_loss", "fsdp"}
    assert commands(sample) == {"preftune train", "preftune label serve", "preftune data check", "preftune report"}
