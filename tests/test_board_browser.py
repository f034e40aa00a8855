"""The board end to end in headless Chromium (Debian's /usr/bin/chromium driven by Playwright), behind a token:
start a run on stories260K from the form, see its loss curve grow while it trains, stop it (a checkpoint), resume it
to the end, start a second run, compare the two, read the displacement marker of the second run (made to displace), and
switch the labels to Chinese.

With PREFTUNE_BOARD_SCREENSHOTS=DIR the test also saves a screenshot of each page there (docs/board/*.png)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from preftune.board.app import BoardServer
from preftune.board.runs import RunManager

from test_board_app import DISPLACING, DISPLACING_STEPS, manager_environment
from test_labeling_browser import CHROMIUM, _require_browser
from test_training import STORY_PAIRS

TOKEN = "board-test-token"
SCREENSHOTS = os.environ.get("PREFTUNE_BOARD_SCREENSHOTS")


def points(page, panel: str) -> int:
    return int(page.get_attribute(f"#panel-{panel}", "data-points") or 0)


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        path = Path(SCREENSHOTS) / f"{name}.png"
        page.screenshot(path=str(path))
        try:  # a palette PNG is a third of the size
            from PIL import Image
        except ImportError:
            return
        with Image.open(path) as image:
            small = image.convert("RGB").quantize(colors=64)
        small.save(path, optimize=True)


def fill_form(page, name: str, model: Path, data: Path, max_steps: int, beta: str | None = None) -> None:
    page.fill("#run-name", name)
    page.fill("#f-model_name_or_path", str(model))
    page.fill("#f-dataset", str(data))
    page.fill("#f-max_steps", str(max_steps))
    page.fill("#f-per_device_train_batch_size", "2")
    page.fill("#f-max_length", "64")
    page.fill("#f-learning_rate", "1e-3")
    page.fill("#f-save_steps", "1000")
    if beta is not None:
        page.fill("#f-beta", beta)


@pytest.mark.slow
def test_start_watch_stop_resume_compare_and_switch_language_in_chromium(stories_model_dir, tmp_path):
    sync_playwright = _require_browser()
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS * 3))
    runs_dir = tmp_path / "runs"
    all_pairs = tmp_path / "pairs8.jsonl"  # every step sees the same 8 pairs: the run made to displace
    all_pairs.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS))
    manager = RunManager(runs_dir, env=manager_environment())
    with BoardServer(runs_dir, token=TOKEN, manager=manager) as server, sync_playwright() as playwright:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.url + "/api/runs")
        assert refused.value.code == 401

        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{server.url}/?token={TOKEN}")  # the cookie; the address loses the token
        assert "token" not in page.url

        # a wrong value: the CLI's message beside the field, nothing started
        page.wait_for_selector("#f-beta")
        page.fill("#f-beta", "-1")
        page.click("#btn-validate")
        page.wait_for_function("document.getElementById('err-beta').textContent.includes('expected float > 0')")

        fill_form(page, "first", stories_model_dir, data, max_steps=150, beta="0.1")
        page.click("#btn-validate")
        page.wait_for_function("document.getElementById('yaml').textContent.includes('max_steps: 150')")
        assert page.inner_text("#err-beta") == ""
        assert page.inner_text("#command") == f"preftune train {runs_dir / 'first' / 'config.yaml'}"
        screenshot(page, "new-run")
        page.click("#btn-start")
        page.wait_for_selector("#watch.active")

        # the curve grows while it trains
        page.wait_for_function("Number(document.getElementById('panel-loss')?.dataset.points || 0) >= 2",
                               timeout=240_000)
        seen = points(page, "loss")
        page.wait_for_function(f"Number(document.getElementById('panel-loss').dataset.points) > {seen}",
                               timeout=60_000)
        assert page.get_attribute("#run-state", "data-state") == "running"
        assert page.get_attribute("#run-state", "data-run") == "first"
        screenshot(page, "watch")
        page.click("#btn-stop")
        page.wait_for_selector("#run-state[data-run=first][data-state=stopped]", timeout=120_000)
        stopped_at = points(page, "loss")
        assert 2 <= stopped_at < 150
        assert (runs_dir / "first" / f"checkpoint-{stopped_at}").is_dir()

        page.click("#btn-resume")
        page.wait_for_selector("#run-state[data-run=first][data-state=finished]", timeout=300_000)
        page.wait_for_function("Number(document.getElementById('panel-loss').dataset.points) === 150")
        page.wait_for_function("document.getElementById('report').textContent.includes('What to try next')")

        # a second run from the form, then both compared
        page.click("#tab-new")
        fill_form(page, "second", stories_model_dir, all_pairs, max_steps=DISPLACING_STEPS, beta=DISPLACING["beta"])
        for key in ("per_device_train_batch_size", "learning_rate"):  # settings that make it displace
            page.fill(f"#f-{key}", DISPLACING[key])
        page.click("#btn-start")
        page.wait_for_selector("#watch.active")
        page.wait_for_selector("#run-state[data-run=second][data-state=finished]", timeout=240_000)
        page.click("#tab-compare")
        page.wait_for_selector(".compare-run[value=second]")
        page.check(".compare-run[value=first]")
        page.check(".compare-run[value=second]")
        page.select_option("#compare-metric", "loss")
        assert page.locator(".compare-run:checked").count() == 2
        page.click("#btn-compare")
        try:
            page.wait_for_function("document.getElementById('compare-chart').dataset.runs === '2'")
        except Exception:
            screenshot(page, "compare-failed")
            raise AssertionError(f"compare chart: runs={page.get_attribute('#compare-chart', 'data-runs')}, "
                                 f"checked={page.locator('.compare-run:checked').count()}, "
                                 f"html={page.inner_html('#compare-runs')}") from None
        rows = page.locator("#compare-settings tr").all_inner_texts()
        table = {cells[0]: dict(zip(rows[0].split("\t")[1:], cells[1:])) for cells in (row.split("\t") for row in rows)}
        assert table["beta"] == {"first": "0.1", "second": "0.5"}, rows
        assert any(row.startswith("max_steps") for row in rows)
        assert page.locator("#compare-table tr").count() == 3  # header + 2 runs
        screenshot(page, "compare")

        # the displacement marker of the real run made to displace, and none on the healthy first one
        page.click("#tab-watch")
        page.select_option("#watch-run", "second")
        page.wait_for_selector("#panel-logps .displacement-marker")
        assert page.is_visible("#displacement") and "likelihood displacement" in page.inner_text("#displacement")
        screenshot(page, "displacement")
        page.select_option("#watch-run", "first")
        page.wait_for_function("document.getElementById('panel-logps')?.dataset.displacement === '0'")

        # every label in Chinese on a click, back in English on another
        page.click("#lang")
        assert page.inner_text("#tab-new") == "新建训练" and page.inner_text("#btn-stop") == "停止（保存检查点）"
        page.click("#tab-new")
        assert page.inner_text("label[for=f-model_name_or_path]") == "模型文件夹"
        page.fill("#run-name", "third")
        page.click("#btn-validate")
        page.wait_for_function("document.getElementById('start-message').textContent === '设置有效。'")
        screenshot(page, "new-run-zh")
        page.click("#lang")
        assert page.inner_text("#tab-new") == "New run"
        browser.close()
