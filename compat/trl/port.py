"""Write a ported copy of one of TRL's test modules that runs offline, against TRL or against preftune.

    python compat/trl/port.py SRC DST [--engine trl|preftune] [--assets DIR]

SRC is TRL's test file (e.g. tests/test_dpo_trainer.py from a TRL checkout); DST the path of the ported module,
whose folder becomes a test package. TRL's code is never stored in this repository: the harness reads it at run
time and writes the ported copy to a scratch folder.

The ported module is TRL's file with exactly these substitutions (each one listed, with its line, in the ported
module's docstring):

1. engine: with ``--engine preftune`` the line ``from trl import DPOConfig, DPOTrainer`` becomes
   ``from preftune import DPOConfig, DPOTrainer`` (with ``--engine trl`` it stays). Other ``trl`` imports (the
   data collators of trl.trainer.dpo_trainer) stay: they are TRL's own components, outside preftune's promise.
2. hub ids: every quoted ``"trl-internal-testing/NAME"`` becomes ``"ASSETS/trl-internal-testing/NAME"``, the
   local stand-in written by build_assets.py.
3. a module docstring is put first (this list, for the ported file); TRL's lines therefore move down by the
   docstring's length, which the docstring states.

Nothing else in the file changes. Next to it, port.py writes our own ``testing_utils.py`` (so that
``from .testing_utils import ...`` resolves), ``conftest.py`` (TRL's markers; skips tests needing an asset that
is not built), ``missing_assets.json``, ``__init__.py`` and a ``pytest.ini``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_assets import DEFAULT_ASSETS, NOT_BUILT, ORG  # noqa: E402

ENGINE_IMPORTS = {
    "trl": "from trl import DPOConfig, DPOTrainer",
    "preftune": "from preftune import DPOConfig, DPOTrainer",
}
HUB_ID = re.compile(r"""(["'])(""" + re.escape(ORG) + r"""/[A-Za-z0-9_.\-]+)\1""")
SUPPORT_FILES = ("testing_utils.py", "conftest.py")
PYTEST_INI = "[pytest]\n# written by compat/trl/port.py: the ported module is run on its own, with no other settings\n"


@dataclass
class Substitution:
    line: int  # 1-based line in TRL's file
    before: str
    after: str


@dataclass
class PortReport:
    """What port() changed: every substitution, and the local paths that are missing (not built)."""

    substitutions: list[Substitution] = field(default_factory=list)
    missing_assets: dict[str, str] = field(default_factory=dict)  # local path -> reason


def _substitute_engine(lines: list[str], engine: str, report: PortReport) -> None:
    matches = [i for i, line in enumerate(lines) if line.rstrip("\n") == ENGINE_IMPORTS["trl"]]
    if len(matches) != 1:
        raise SystemExit(f"port: expected exactly one line {ENGINE_IMPORTS['trl']!r} in the test file, found {len(matches)}")
    if engine != "trl":
        index = matches[0]
        lines[index] = ENGINE_IMPORTS[engine] + "\n"
        report.substitutions.append(Substitution(index + 1, ENGINE_IMPORTS["trl"], ENGINE_IMPORTS[engine]))


def _substitute_hub_ids(lines: list[str], assets: Path, report: PortReport) -> None:
    for index, line in enumerate(lines):
        def local(match: re.Match) -> str:
            hub_id = match.group(2)
            path = assets / hub_id
            name = hub_id.split("/", 1)[1]
            if not path.exists():
                report.missing_assets[str(path)] = NOT_BUILT.get(name, "not built by compat/trl/build_assets.py")
            report.substitutions.append(Substitution(index + 1, hub_id, str(path)))
            return f"{match.group(1)}{path}{match.group(1)}"

        lines[index] = HUB_ID.sub(local, line)


def _docstring(src: Path, engine: str, report: PortReport, offset: int) -> str:
    by_change: dict[tuple[str, str], list[int]] = {}
    for s in report.substitutions:
        by_change.setdefault((s.before, s.after), []).append(s.line)
    rows = [
        f"    {before!r} -> {after!r}\n        (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))})"
        for (before, after), lines in by_change.items()
    ]
    missing = [f"    {path} ({reason})" for path, reason in sorted(report.missing_assets.items())]
    text = [
        f"Ported by compat/trl/port.py from {src} for engine {engine!r}.",
        "",
        "TRL's test module, unchanged except for these substitutions (line numbers are TRL's; every line of",
        f"TRL's file is {offset} lines further down here, below this docstring):",
        *(rows or ["    (none)"]),
        "",
        "Local paths substituted for hub ids but not built (conftest.py skips the tests naming them):",
        *(missing or ["    (none)"]),
    ]
    return '"""' + "\n".join(text).replace('"""', r"\"\"\"") + '\n"""\n'


def port(src: Path, dst: Path, engine: str, assets: Path) -> PortReport:
    """Write the ported module `dst` (and its support files beside it) from TRL's test module `src`."""
    if engine not in ENGINE_IMPORTS:
        raise SystemExit(f"port: unknown engine {engine!r}; expected one of {sorted(ENGINE_IMPORTS)}")
    lines = src.read_text().splitlines(keepends=True)
    report = PortReport()
    _substitute_engine(lines, engine, report)
    _substitute_hub_ids(lines, assets.resolve(), report)
    report.substitutions.sort(key=lambda s: s.line)
    # The docstring's own length decides the offset it states; its line count does not depend on the digits.
    offset = _docstring(src, engine, report, 0).count("\n")
    header = _docstring(src, engine, report, offset)

    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(header + "".join(lines))
    for name in SUPPORT_FILES:
        shutil.copyfile(HERE / "support" / name, dst.parent / name)
    (dst.parent / "missing_assets.json").write_text(json.dumps(report.missing_assets, indent=2, sort_keys=True) + "\n")
    (dst.parent / "__init__.py").write_text("")
    (dst.parent / "pytest.ini").write_text(PYTEST_INI)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="TRL's test module, e.g. tests/test_dpo_trainer.py")
    parser.add_argument("dst", type=Path, help="path of the ported module (its folder becomes a test package)")
    parser.add_argument("--engine", choices=sorted(ENGINE_IMPORTS), default="preftune")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS, help="folder written by build_assets.py")
    args = parser.parse_args(argv)
    report = port(args.src, args.dst, args.engine, args.assets)
    print(f"port: wrote {args.dst} ({len(report.substitutions)} substitutions, "
          f"{len(report.missing_assets)} assets not built)")  # fmt: skip


if __name__ == "__main__":
    main()
