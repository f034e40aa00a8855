"""End to end in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): pick a name, label pairs with
clicks and keys, undo, reload, close the browser, export; the exported pairs are exactly what was clicked."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from preftune.data.formats import load_preference_data
from preftune.labeling import store
from preftune.labeling.app import LabelServer
from preftune.labeling.export import export_pairs

CHROMIUM = os.environ.get("PREFTUNE_CHROMIUM", "/usr/bin/chromium")


def _require_browser():
    """Playwright's sync API, or skip (fail under CI=true) when it or Chromium is missing."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "the playwright package is not installed (pip install playwright)"
    if problem is None and not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        problem = f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set PREFTUNE_CHROMIUM)"
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return sync_playwright


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "labels.sqlite"
    store.import_candidates(path, [
        {"prompt_id": "greet", "prompt": "Greet the user.", "responses": ["Hello!", "Go away.", "Hi, how can I help?"]},
        {"prompt_id": "sky", "prompt": "What colour is the sky?", "responses": ["Blue.", "Plaid."]},
        {"prompt_id": "chat", "prompt": [{"role": "user", "content": "2 + 2?"}], "responses": ["4", "22"]},
        {"prompt_id": "sum", "prompt": "Summarise: cats sleep a lot.", "responses": ["Cats nap.", "Dogs bark."]},
    ])  # 3 + 1 + 1 + 1 = 6 pairs
    return path


def shown(page) -> tuple[int, str, str]:
    """(pair id, left text, right text) of the pair on screen."""
    return (int(page.input_value("input[name=pair_id]")), page.inner_text("#left pre"), page.inner_text("#right pre"))


@pytest.mark.slow
def test_label_with_clicks_and_keys_undo_reload_then_export_matches_the_clicks(db, tmp_path):
    sync_playwright = _require_browser()
    winners: dict[int, str] = {}  # pair id -> text the annotator preferred (pairs resolved as chosen/rejected)
    with LabelServer(db) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#annotator", "alice")
        with page.expect_navigation():
            page.click("#start")
        assert page.inner_text("#progress") == "0 / 6 done"

        pair, left, right = shown(page)
        with page.expect_navigation():
            page.click("#btn-left")  # a click
        winners[pair] = left

        pair, left, right = shown(page)
        with page.expect_navigation():
            page.keyboard.press("2")  # right by key
        winners[pair] = right

        pair, left, right = shown(page)
        page.fill("#note", "both fine; t typed here is not a shortcut")
        page.keyboard.press("Escape")  # leave the note so the keys work again
        with page.expect_navigation():
            page.keyboard.press("t")
        tie_pair = pair

        pair, left, right = shown(page)
        with page.expect_navigation():
            page.keyboard.press("b")  # right ...
        with page.expect_navigation():
            page.keyboard.press("u")  # ... undone: the same pair comes back, in the same order
        assert shown(page) == (pair, left, right)
        assert page.inner_text("#progress") == "3 / 6 done"
        with page.expect_navigation():
            page.keyboard.press("1")  # left instead
        winners[pair] = left

        page.reload()  # nothing lost, same next pair
        assert page.inner_text("#progress") == "4 / 6 done"
        pair, left, right = shown(page)
        with page.expect_navigation():
            page.keyboard.press("s")
        skipped_pair = pair

        pair, left, right = shown(page)
        with page.expect_navigation():
            page.click("#btn-both_bad")
        assert page.is_visible("#done") and page.inner_text("#progress") == "6 / 6 done"
        browser.close()

    out = tmp_path / "pairs.jsonl"
    report = export_pairs(db, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {row["pair_id"]: _text(row["chosen"]) for row in rows} == winners
    with store.opened(db) as conn:
        pairs = {item.pair_id: item for item in store.all_pairs(conn)}
        notes = conn.execute("SELECT pair_id, note FROM judgments WHERE note != ''").fetchall()
        undone = conn.execute("SELECT COUNT(*) FROM judgments WHERE undone_at IS NOT NULL").fetchone()[0]
    for row in rows:
        both = {pairs[row["pair_id"]].response_a, pairs[row["pair_id"]].response_b}
        assert {_text(row["chosen"]), _text(row["rejected"])} == both
    assert report.excluded == {"tie": 1, "both_bad": 1, "no_majority": 0, "skip": 1, "unlabelled": 0}
    assert notes == [(tie_pair, "both fine; t typed here is not a shortcut")] and undone == 1
    assert skipped_pair not in winners and tie_pair not in winners
    assert len(load_preference_data(str(out)).dataset) == 3


def _text(response) -> str:
    return response if isinstance(response, str) else response[0]["content"]
