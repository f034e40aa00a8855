"""The board end to end in headless Chromium (Debian's /usr/bin/chromium driven by Playwright), behind a token:
start a run on stories260K from the form, see its loss curve grow while it trains, stop it (a checkpoint), resume it
to the end, start a second run, compare the two, read the displacement marker of the second run (made to displace), and
switch the labels to Chinese. A second test: evaluate two finished runs (the numbers shown are those of `preftune
eval`'s eval_results.json), plot their reward/KL points, check data files (a bad row named, as `preftune data check`
names it), sample the tiny model's responses into a labeling store and open its labeling pages.

With PREFTUNE_BOARD_SCREENSHOTS=DIR the tests also save a screenshot of each page there (docs/board/*.png)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
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


def screenshot(page, name: str, full_page: bool = False) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        path = Path(SCREENSHOTS) / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        try:  # a palette PNG is a third of the size
            from PIL import Image
        except ImportError:
            return
        with Image.open(path) as image:
            small = palette_image(image.convert("RGB"))
        small.save(path, optimize=True)


def palette_image(image):
    """The screenshot in 64 colours: a median cut of it, except that pixels of the page's flat colours (white, the
    log's grey, board.js's COLORS) keep them exactly. A median cut alone greys a chart's few dots and the log's box."""
    import numpy as np
    from PIL import Image

    script = (Path(__file__).parents[1] / "src/preftune/board/static/board.js").read_text(encoding="utf-8")
    colours = ["#ffffff", "#f4f4f4", *re.findall(r"#[0-9a-f]{6}", re.search(r"const COLORS = \[(.*?)\]", script).group(1))]
    exact = [[int(colour[i:i + 2], 16) for i in (1, 3, 5)] for colour in colours]
    cut = image.quantize(colors=64 - len(exact))
    pixels, indices = np.asarray(image), np.array(cut)
    for k, rgb in enumerate(exact):
        indices[(pixels == rgb).all(axis=2)] = 64 - len(exact) + k
    small = Image.fromarray(indices.astype(np.uint8), "P")
    small.putpalette(cut.getpalette()[:3 * (64 - len(exact))] + [channel for rgb in exact for channel in rgb])
    return small


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
        stopped_at = int(page.get_attribute("#run-state", "data-step"))
        page.wait_for_function(f"Number(document.getElementById('panel-loss').dataset.points) === {stopped_at}")
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
        # the drawn comparison too: its table headers and the chart's axis label
        assert page.locator("#compare-table th").first.text_content() == "运行"
        assert page.locator("#compare-settings th").first.text_content() == "设置项"
        assert "步" in page.locator("#compare-chart svg").text_content()
        page.click("#tab-new")
        assert page.inner_text("label[for=f-model_name_or_path]") == "模型文件夹"
        page.fill("#run-name", "third")
        page.click("#btn-validate")
        page.wait_for_function("document.getElementById('start-message').textContent === '设置有效。'")
        screenshot(page, "new-run-zh")
        page.click("#lang")
        assert page.inner_text("#tab-new") == "New run"
        browser.close()


def table_rows(page, selector: str) -> dict[str, str]:
    """A two-column table on the page as {first cell: second cell}, the header row left out."""
    rows = [row.split("\t") for row in page.locator(f"{selector} tr").all_inner_texts()]
    return {cells[0]: cells[1] for cells in rows[1:]}


def shows(text: str, value: float) -> bool:
    """Whether `text` is `value` as the page writes numbers: 4 significant digits, or 3 in exponent form."""
    return float(text) == pytest.approx(value, rel=5.01e-3 if "e" in text else 5.01e-4, abs=0)


EVAL_RUN_STEPS = 4
JUDGE = "preftune.judges:sentiment_word_score"


def evaluate_in_page(page, run: str) -> None:
    """Pick `run` on the Evaluate tab, click Evaluate (the judge/pairs/limit fields as they are) and wait for the
    result; fail with `preftune eval`'s log if it failed."""
    page.wait_for_selector(f"#eval-run option[value={run}]", state="attached")
    page.select_option("#eval-run", run)
    page.wait_for_selector(f"#eval-state[data-run={run}][data-state=none]")  # this run's state is shown
    page.click("#btn-eval")
    page.wait_for_selector(f"#eval-state[data-run={run}]:is([data-state=done], [data-state=failed])", timeout=240_000)
    assert page.get_attribute("#eval-state", "data-state") == "done", page.text_content("#eval-log")


@pytest.mark.slow
def test_evaluate_a_finished_run_then_check_data_sample_and_open_labeling_in_chromium(stories_model_dir, tmp_path,
                                                                                      capsys):
    from preftune.cli import main

    sync_playwright = _require_browser()
    pairs = tmp_path / "pairs8.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS))
    runs_dir = tmp_path / "runs"
    manager = RunManager(runs_dir, env=manager_environment())
    with BoardServer(runs_dir, token=TOKEN, manager=manager) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.goto(f"{server.url}/?token={TOKEN}")
        page.wait_for_selector("#f-beta")

        # two finished runs of a few steps, started from the form; the second (a higher learning rate) moves further
        fill_form(page, "short", stories_model_dir, pairs, max_steps=EVAL_RUN_STEPS)
        page.click("#btn-start")
        page.wait_for_selector("#run-state[data-run=short][data-state=finished]", timeout=240_000)
        page.click("#tab-new")
        fill_form(page, "hot", stories_model_dir, pairs, max_steps=EVAL_RUN_STEPS, beta=DISPLACING["beta"])
        for key in ("per_device_train_batch_size", "learning_rate"):
            page.fill(f"#f-{key}", DISPLACING[key])
        page.click("#btn-start")
        page.wait_for_selector("#watch.active")

        # Evaluate the first while the second trains: `preftune eval` with held-out pairs and a judge; the table
        # shows its eval_results.json
        page.click("#tab-evaluate")
        page.fill("#eval-data", str(pairs))
        page.fill("#eval-judge", JUDGE)
        page.fill("#eval-limit", "2")
        evaluate_in_page(page, "short")
        results = json.loads((runs_dir / "short" / "eval" / "eval_results.json").read_text())
        pair_metrics, generation = results["pairs"], results["generation"]
        assert pair_metrics["count"] == len(STORY_PAIRS) and generation["prompts"] == 2
        expected = {**pair_metrics, **{f"reward/{side}": generation["reward"][side]["mean"]
                                       for side in ("policy", "reference", "difference")},
                    "kl": generation["kl"]["mean"]}
        shown = table_rows(page, "#eval-table")
        if generation.get("win_rate"):
            expected["win_rate"] = generation["win_rate"]["rate"]
            lower, upper = shown["win_rate 95%"].strip("[]").split(", ")
            assert shows(lower, generation["win_rate"]["lower"]) and shows(upper, generation["win_rate"]["upper"])
        assert {"eval_rewards/accuracies", "eval_rewards/margins", "reward/difference", "kl"} <= set(shown)
        assert set(expected) <= set(shown), (shown, expected)
        wrong = {key: (shown[key], value) for key, value in expected.items() if not shows(shown[key], value)}
        assert not wrong, wrong
        assert page.text_content("#eval-log").startswith("$ preftune eval ")

        # then the second, once trained; both reward/KL points on one plot: x the KL, y the judge's reward difference
        page.click("#tab-watch")
        page.wait_for_selector("#run-state[data-run=hot][data-state=finished]", timeout=240_000)
        page.click("#tab-evaluate")
        evaluate_in_page(page, "hot")
        page.check(".eval-point-run[value=short]")
        page.check(".eval-point-run[value=hot]")
        page.click("#btn-eval-points")
        page.wait_for_selector("#eval-chart[data-points='2']")
        titles = page.locator("#eval-chart circle.eval-point title").all_text_contents()
        dots = {title.split(": (")[0]: title.split(": (")[1].rstrip(")").split(", ") for title in titles}
        assert sorted(dots) == ["hot", "short"], titles
        for name, (x, y) in dots.items():
            generation = json.loads((runs_dir / name / "eval" / "eval_results.json").read_text())["generation"]
            assert shows(x, generation["kl"]["mean"]) and shows(y, generation["reward"]["difference"]["mean"]), name
        screenshot(page, "evaluate", full_page=True)
        page.click("#lang")  # the labels drawn by the script follow the switch too
        assert page.inner_text("#eval-state") == "已评估" and page.inner_text("#eval-table th") == "指标"
        assert "奖励与 KL" in page.inner_text("#eval-chart h3")
        screenshot(page, "evaluate-zh", full_page=True)
        page.click("#lang")
        assert page.inner_text("#eval-state") == "evaluated"

        # Data: a good file's summary, a bad row named in the report, a file that cannot be read in one line
        page.click("#tab-data")
        good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
        good.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS))
        bad_row = {"prompt": STORY_PAIRS[0]["prompt"], "chosen": STORY_PAIRS[0]["chosen"], "rejected": "  "}
        bad.write_text("".join(json.dumps(row) + "\n" for row in [STORY_PAIRS[1], bad_row, STORY_PAIRS[2]]))
        cli_reports = {}
        for path in (good, bad):
            page.fill("#data-target", str(path))
            page.click("#btn-data-check")
            page.wait_for_function(f"document.getElementById('data-report').textContent.includes({json.dumps(str(path) + ':')})")
            assert main(["data", "check", str(path)]) == 0
            cli_reports[path] = capsys.readouterr().out.rstrip("\n")
            assert page.text_content("#data-report") == cli_reports[path]  # the CLI's report, word for word
        assert f"{len(STORY_PAIRS)} rows read, {len(STORY_PAIRS)} ok, 0 with problems" in cli_reports[good]
        report = cli_reports[bad]
        assert "3 rows read, 2 ok, 1 with problems" in report
        assert f"e.g. file {bad}, row 1, field 'rejected': is empty" in report  # rows count from 0: the second
        missing = tmp_path / "missing.jsonl"
        page.fill("#data-target", str(missing))
        page.click("#btn-data-check")
        page.wait_for_function("document.getElementById('err-target').textContent !== ''")
        error = page.inner_text("#err-target")
        assert str(missing) in error and "file not found" in error and "\n" not in error
        assert page.text_content("#data-report") == ""

        # Sample responses of the tiny model into a new store, then open its labeling pages
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in STORY_PAIRS[:2]))
        store = tmp_path / "labels.db"
        page.fill("#sample-model", str(stories_model_dir))
        page.fill("#sample-prompts", str(prompts))
        page.fill("#sample-store", str(store))
        page.fill("#sample-num_samples", "3")
        page.fill("#sample-max_new_tokens", "8")
        page.click("#btn-sample")
        page.wait_for_function("['done', 'failed'].includes(document.getElementById('sample-state').dataset.state)",
                               timeout=180_000)
        assert page.get_attribute("#sample-state", "data-state") == "done", page.text_content("#sample-log")
        assert "imported into" in page.text_content("#sample-log")
        assert page.input_value("#label-db") == str(store.resolve())
        page.fill("#data-target", str(bad))  # the report beside the sampling in the screenshot
        page.click("#btn-data-check")
        page.wait_for_function(f"document.getElementById('data-report').textContent.includes({json.dumps(str(bad) + ':')})")
        page.click("#btn-label-open")
        page.wait_for_selector("#label-link[href^='http']")
        screenshot(page, "data")
        with sqlite3.connect(store) as conn:
            stored_pairs = conn.execute("select count(*) from pairs").fetchone()[0]
        assert stored_pairs > 0
        with context.expect_page() as opened:
            page.click("#label-link")  # a new tab, on the labeling server's port; the board's token cookie is sent
        labeling = opened.value
        labeling.wait_for_selector("#annotator")
        labeling.fill("#annotator", "alice")
        with labeling.expect_navigation():
            labeling.click("#start")
        assert labeling.inner_text("#progress") == f"0 / {stored_pairs} done"
        browser.close()

