"""The board's API through Flask's test client: the start form's validation gives the CLI's messages by field,
access rules (token off loopback, same-origin posts), run status/metrics/compare over run folders, and a real tiny
run on stories260K started, stopped (a checkpoint at the stop step) and resumed to the end."""

from __future__ import annotations

import json
import re
import os
import time
from pathlib import Path

import pytest
import yaml

from preftune.board.app import BoardServer, create_app
from preftune.board.runs import CONFIG_FILE, RunManager
from preftune.config import DPOConfig, load_config
from preftune.errors import ConfigError

from conftest import REPO_ROOT
from test_training import STORY_PAIRS

JSON = {"Accept": "application/json"}


@pytest.fixture
def runs_dir(tmp_path):
    return tmp_path / "runs"


@pytest.fixture
def client(runs_dir):
    return create_app(runs_dir).test_client()


def cli_message(tmp_path: Path, key: str, value: str) -> str:
    """The message `preftune train cfg.yaml` gives for `key: value` in cfg.yaml (the CLI's path: load_config)."""
    config = tmp_path / "cli.yaml"
    config.write_text(f"output_dir: out\n{key}: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    return caught.value.message


# --------------------------------------------------------------------------------------------------------------
# The form and its validation
# --------------------------------------------------------------------------------------------------------------


def test_schema_lists_the_form_keys_with_the_config_defaults_and_choices(client):
    fields = {field["key"]: field for field in client.get("/api/schema").json["fields"]}
    assert {"model_name_or_path", "dataset", "template", "loss_type", "beta", "learning_rate", "finetuning_type",
            "max_steps", "eval_strategy"} <= set(fields)
    assert fields["beta"]["default"] == 0.1 and fields["loss_type"]["default"] == "sigmoid"
    assert {"sigmoid", "ipo", "kto", "simpo"} <= set(fields["loss_type"]["choices"])
    assert fields["finetuning_type"]["choices"] == ["full", "lora"]
    assert fields["eval_strategy"]["choices"] == ["no", "steps", "epoch"]


@pytest.mark.parametrize("key, value", [("beta", "-1"), ("learning_rate", "fast"), ("loss_type", "dpo_plus"),
                                        ("max_length", "0"), ("eval_strategy", "sometimes")])
def test_an_invalid_value_gets_the_clis_message_beside_its_field(client, tmp_path, key, value):
    answer = client.post("/api/validate", json={"name": "r1", "settings": {key: value}}).json
    assert answer["ok"] is False
    assert answer["errors"][key] == cli_message(tmp_path, key, value)


def test_each_invalid_field_gets_its_own_message(client, tmp_path):
    answer = client.post("/api/validate", json={"name": "r1", "settings": {"beta": "0", "max_length": "-3"}}).json
    assert set(answer["errors"]) == {"beta", "max_length"}
    assert answer["errors"]["max_length"] == cli_message(tmp_path, "max_length", "-3")


def test_missing_model_folder_and_data_file_are_named_beside_their_fields(client, tmp_path):
    settings = {"model_name_or_path": str(tmp_path / "no-model"), "dataset": str(tmp_path / "missing.jsonl")}
    errors = client.post("/api/validate", json={"name": "r1", "settings": settings}).json["errors"]
    assert "no such folder" in errors["model_name_or_path"] and str(tmp_path / "no-model") in errors["model_name_or_path"]
    assert "missing.jsonl" in errors["dataset"] and "not found" in errors["dataset"]


def test_valid_form_gives_the_yaml_that_train_reads_and_the_command(client, runs_dir, stories_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS))
    settings = {"model_name_or_path": str(stories_model_dir), "dataset": str(data), "beta": "0.25",
                "finetuning_type": "lora", "max_steps": "3", "template": ""}
    answer = client.post("/api/validate", json={"name": "r1", "settings": settings}).json
    assert answer["ok"] is True, answer["errors"]
    assert answer["command"] == f"preftune train {runs_dir / 'r1' / CONFIG_FILE}"
    written = tmp_path / "shown.yaml"
    written.write_text(answer["yaml"])
    config = load_config(written)  # what `preftune train` would read
    assert (config.beta, config.finetuning_type, config.max_steps) == (0.25, "lora", 3)
    assert config.output_dir == str(runs_dir / "r1") and config.template is None


def test_start_with_invalid_settings_is_400_with_field_errors_and_creates_nothing(client, runs_dir):
    response = client.post("/api/runs", json={"name": "bad", "settings": {"beta": "-1"}})
    assert response.status_code == 400 and "beta" in response.json["errors"]
    assert not (runs_dir / "bad").exists()


def test_a_run_name_with_a_path_in_it_is_refused(client, runs_dir):
    response = client.post("/api/runs", json={"name": "../escape", "settings": {}})
    assert response.status_code == 400 and "name" in response.json["errors"]
    assert client.get("/api/runs/..%2Fescape").status_code in (400, 404)


# --------------------------------------------------------------------------------------------------------------
# Access
# --------------------------------------------------------------------------------------------------------------


def test_with_a_token_requests_without_it_get_401_and_a_wrong_one_403(runs_dir):
    client = create_app(runs_dir, token="board-secret").test_client()
    assert client.get("/api/runs", headers=JSON).status_code == 401
    assert client.get("/api/runs", headers={"X-Preftune-Token": "nope", **JSON}).status_code == 403
    assert client.post("/api/runs", json={"name": "x", "settings": {}}, headers=JSON).status_code == 401
    assert client.get("/api/runs", headers={"X-Preftune-Token": "board-secret", **JSON}).status_code == 200
    page = client.get("/")  # a browser without the token: the reason, as JSON
    assert page.status_code == 401 and "?token=" in page.json["error"]
    login = client.get("/?token=board-secret")
    assert login.status_code == 303 and "token" not in login.headers["Location"]
    assert client.get("/api/runs").status_code == 200  # the cookie now


def test_binding_beyond_loopback_needs_a_token(runs_dir):
    with pytest.raises(ConfigError, match="access token"):
        BoardServer(runs_dir, host="0.0.0.0")


def test_board_command_refuses_a_public_host_without_token(runs_dir, capsys, monkeypatch):
    from preftune.cli import main

    monkeypatch.delenv("PREFTUNE_BOARD_TOKEN", raising=False)
    assert main(["board", "--runs", str(runs_dir), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "access token" in capsys.readouterr().err


def test_cross_site_posts_are_refused_and_start_nothing(client, runs_dir):
    response = client.post("/api/runs", json={"name": "x", "settings": {}},
                           headers={"Origin": "http://evil.example", **JSON})
    assert response.status_code == 403 and not (runs_dir / "x").exists()
    fetch = client.post("/api/validate", json={"name": "x", "settings": {}}, headers={"Sec-Fetch-Site": "cross-site"})
    assert fetch.status_code == 403


# --------------------------------------------------------------------------------------------------------------
# Reading run folders: metrics, markers, compare, report
# --------------------------------------------------------------------------------------------------------------


def fake_run(runs_dir: Path, name: str, settings: dict, records: list[dict]) -> Path:
    folder = runs_dir / name
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump({**settings, "output_dir": str(folder)}))
    (folder / "log_history.json").write_text(json.dumps(records))
    return folder


def displacing_records(steps: int = 30) -> list[dict]:
    """Both log-probs falling 0.5 nats a step while the margin grows: likelihood displacement by construction."""
    return [{"step": s, "loss": 0.69 - 0.01 * s, "logps/chosen": -20.0 - 0.5 * s, "logps/rejected": -21.0 - 0.8 * s,
             "rewards/margins": 0.03 * s, "rewards/accuracies": 1.0, "grad_norm": 1.0, "learning_rate": 1e-5}
            for s in range(1, steps + 1)]


def healthy_records(steps: int = 30) -> list[dict]:
    return [{"step": s, "loss": 0.69 - 0.005 * s, "logps/chosen": -20.0 + 0.1 * s, "logps/rejected": -21.0 - 0.3 * s,
             "rewards/margins": 0.02 * s, "rewards/accuracies": 0.9, "grad_norm": 50.0 if s == 20 else 1.0,
             "learning_rate": 1e-5} for s in range(1, steps + 1)]


def test_metrics_carry_the_displacement_span_for_a_displacing_run_only(client, runs_dir):
    fake_run(runs_dir, "falls", {"beta": 0.1}, displacing_records())
    fake_run(runs_dir, "healthy", {"beta": 0.1}, healthy_records())
    falls = client.get("/api/runs/falls/metrics").json
    healthy = client.get("/api/runs/healthy/metrics").json
    assert falls["displacement"] is not None and 1 <= falls["displacement"]["start_step"] < 30
    assert falls["displacement"]["end_step"] == 30
    assert healthy["displacement"] is None
    assert [spike["step"] for spike in healthy["grad_norm_spikes"]] == [20]  # 50 > 5 x the median 1.0
    assert [record["step"] for record in falls["train"]] == list(range(1, 31))


def test_compare_gives_final_metrics_and_only_the_settings_that_differ(client, runs_dir):
    fake_run(runs_dir, "a", {"beta": 0.1, "learning_rate": 1e-5, "max_steps": 30}, healthy_records())
    fake_run(runs_dir, "b", {"beta": 0.3, "learning_rate": 1e-5, "max_steps": 30, "loss_type": "ipo"},
             displacing_records(20) + [{"step": 20, "eval_loss": 0.4, "eval_rewards/accuracies": 0.75}])
    answer = client.get("/api/compare?runs=a,b").json
    assert answer["differing_settings"] == {"beta": {"a": 0.1, "b": 0.3}, "loss_type": {"a": "sigmoid", "b": "ipo"}}
    runs = {run["name"]: run for run in answer["runs"]}
    assert runs["a"]["train"]["loss"] == pytest.approx(0.69 - 0.005 * 30) and runs["a"]["eval"] == {}
    assert runs["b"]["step"] == 20 and runs["b"]["eval"]["eval_rewards/accuracies"] == 0.75
    assert DPOConfig.model_fields["loss_type"].default == "sigmoid"  # what "a" left out


def test_report_of_a_run_is_the_report_commands_text(client, runs_dir, capsys):
    from preftune.cli import main

    folder = fake_run(runs_dir, "falls", {"beta": 0.1}, displacing_records())
    text = client.get("/api/runs/falls/report").json["text"]
    assert main(["report", str(folder)]) == 0
    assert text.strip() == capsys.readouterr().out.strip()
    assert "displacement" in text.lower()


def test_a_run_still_training_from_an_earlier_board_is_seen_stopped_and_blocks_a_second(client, runs_dir):
    import signal
    import subprocess
    import sys

    folder = fake_run(runs_dir, "earlier", {"max_steps": 30}, healthy_records(5))
    # stands in for `preftune train runs/earlier/config.yaml` left running by a board that was closed
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(folder / CONFIG_FILE)])
    try:
        (folder / "board.json").write_text(json.dumps({"pid": process.pid, "returncode": None}))
        wait_for(lambda: str(folder).encode() in Path(f"/proc/{process.pid}/cmdline").read_bytes(), 10, "exec")
        assert client.get("/api/runs/earlier").json["state"] == "running"
        second = client.post("/api/runs", json={"name": "next", "settings": {}})
        assert second.status_code == 409 and "earlier" in second.json["error"]
        assert client.post("/api/runs/earlier/stop").status_code == 200
        assert process.wait(timeout=20) != 0 and process.returncode in (1, -signal.SIGINT)  # KeyboardInterrupt
        assert client.get("/api/runs/earlier").json["state"] == "stopped"  # 5 of 30 steps logged
    finally:
        process.kill()


def test_status_of_an_unknown_run_is_404(client):
    assert client.get("/api/runs/nothing-here").status_code == 404


# --------------------------------------------------------------------------------------------------------------
# A real run: start, one at a time, stop (checkpoint), resume to the end
# --------------------------------------------------------------------------------------------------------------


def wait_for(condition, timeout: float = 240.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def tiny_run_settings(model_dir: Path, data: Path, max_steps: int, **extra) -> dict:
    return {"model_name_or_path": str(model_dir), "dataset": str(data), "max_steps": str(max_steps),
            "per_device_train_batch_size": "2", "max_length": "64", "learning_rate": "1e-3", "logging_steps": "1",
            "save_steps": "1000", "disable_tqdm": "true", "plot_loss": "false", **extra}


def manager_environment() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_start_stop_resume_a_tiny_run_keeps_every_step_once(runs_dir, stories_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS * 3))
    manager = RunManager(runs_dir, env=manager_environment())
    client = create_app(runs_dir, manager=manager).test_client()
    started = client.post("/api/runs", json={"name": "tiny", "settings": tiny_run_settings(stories_model_dir, data, 40)})
    assert started.status_code == 201, started.json
    assert started.json["state"] == "running"
    second = client.post("/api/runs", json={"name": "other", "settings": tiny_run_settings(stories_model_dir, data, 2)})
    assert second.status_code == 409 and "one run at a time" in second.json["error"]

    wait_for(lambda: client.get("/api/runs/tiny").json["logged"] >= 2, what="two logged steps")
    stopped = client.post("/api/runs/tiny/stop")
    assert stopped.status_code == 200 and stopped.json["state"] in ("stopping", "stopped")
    status = wait_for(lambda: (s := client.get("/api/runs/tiny").json)["state"] == "stopped" and s, what="the stop")
    assert 2 <= status["step"] < 40, "stopped too late: the run had finished"
    assert status["checkpoints"] == [f"checkpoint-{status['step']}"]  # saved at the step it stopped
    log = client.get("/api/runs/tiny/log").json["text"]
    assert f"stopped at step {status['step']} of 40" in log

    resumed = client.post("/api/runs/tiny/resume")
    assert resumed.status_code == 200 and resumed.json["state"] == "running"
    final = wait_for(lambda: (s := client.get("/api/runs/tiny").json)["state"] in ("finished", "failed") and s,
                     what="the end of the resumed run")
    assert final["state"] == "finished" and final["step"] == 40, client.get("/api/runs/tiny/log").json["text"][-2000:]
    steps = [record["step"] for record in client.get("/api/runs/tiny/metrics").json["train"]]
    assert steps == list(range(1, 41))  # every step once across stop and resume
    assert client.get("/api/runs/tiny/config.yaml").headers["Content-Disposition"].startswith("attachment")
    assert "What to try next" in client.get("/api/runs/tiny/report").json["text"]


# --------------------------------------------------------------------------------------------------------------
# Data page: data check, labeling pages for a store
# --------------------------------------------------------------------------------------------------------------


def test_data_check_answers_the_reports_of_preftune_data_check(client, tmp_path, capsys):
    from preftune.cli import main

    data = tmp_path / "pairs.jsonl"
    rows = [*STORY_PAIRS[:3], {"prompt": "Hi", "chosen": "", "rejected": "Go away."}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    answer = client.post("/api/data/check", json={"target": str(data)})
    assert answer.status_code == 200
    assert main(["data", "check", str(data), "--json"]) == 0
    assert answer.json["reports"] == json.loads(capsys.readouterr().out)
    assert answer.json["reports"]["train"]["rows_with_problems"] == 1
    missing = client.post("/api/data/check", json={"target": str(tmp_path / "none.jsonl")})
    assert missing.status_code == 400 and "none.jsonl" in missing.json["error"]


def test_labeling_pages_open_for_a_store_with_the_boards_token(runs_dir, tmp_path):
    import urllib.error
    import urllib.request

    from preftune.labeling.store import import_candidates

    db = tmp_path / "labels.sqlite"
    import_candidates(db, [{"prompt_id": "p", "prompt": "Hi", "responses": ["Hello!", "Go away.", "Hey."]}])
    with BoardServer(runs_dir, token="tok") as server:
        def post(body):
            request = urllib.request.Request(server.url + "/api/label/open", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json", "X-Preftune-Token": "tok"})
            try:
                with urllib.request.urlopen(request) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        status, answer = post({"db": str(db)})
        assert status == 200 and answer["url"].startswith("http://127.0.0.1:")
        assert post({"db": str(db)})[1]["url"] == answer["url"]  # the same server, not a second one
        progress = urllib.request.Request(answer["url"] + "api/progress?annotator=ann",
                                          headers={"X-Preftune-Token": "tok", **JSON})
        with urllib.request.urlopen(progress) as response:
            assert json.loads(response.read()) == {"annotator": "ann", "done": 0, "total": 3}  # 3 responses: 3 pairs
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(answer["url"] + "api/progress?annotator=ann")
        assert refused.value.code == 401
        status, answer = post({"db": str(tmp_path / "none.sqlite")})
        assert status == 400 and "no labeling store" in answer["errors"]["db"]


# ---- evaluate -------------------------------------------------------------------------------------------------


def eval_results(kl: float, difference: float, rate: float, margin: float) -> dict:
    """An eval_results.json as `preftune eval --judge` writes it (the fields the board reads)."""
    return {"model": "m", "loss_type": "sigmoid", "beta": 0.1,
            "pairs": {"eval_loss": 0.6, "eval_rewards/margins": margin, "eval_rewards/accuracies": 0.75, "count": 4},
            "generation": {"prompts": 2, "num_samples": 2, "judge": "length",
                           "reward": {"difference": {"mean": difference, "stderr": 0.1, "n": 2}},
                           "win_rate": {"rate": rate, "lower": 0.1, "upper": 0.9, "n": 2},
                           "kl": {"mean": kl, "stderr": 0.01, "n": 4, "exact_sampling": True}}}


def test_eval_points_give_each_evaluated_runs_kl_reward_and_win_rate(client, runs_dir):
    for name, numbers in (("a", (0.5, 1.5, 0.75, 0.2)), ("b", (2.0, 3.0, 1.0, 0.9))):
        folder = fake_run(runs_dir, name, {"beta": 0.1}, healthy_records(4))
        (folder / "eval").mkdir()
        (folder / "eval" / "eval_results.json").write_text(json.dumps(eval_results(*numbers)))
    fake_run(runs_dir, "never-evaluated", {"beta": 0.1}, healthy_records(4))
    points = {p["name"]: p for p in client.get("/api/evals?runs=a,b,never-evaluated").json["points"]}
    assert (points["a"]["kl"], points["a"]["reward_difference"], points["a"]["win_rate"]) == (0.5, 1.5, 0.75)
    assert (points["b"]["kl"], points["b"]["eval_margin"], points["b"]["eval_accuracy"]) == (2.0, 0.9, 0.75)
    assert points["never-evaluated"]["kl"] is None and points["never-evaluated"]["win_rate"] is None
    assert client.get("/api/runs/a/eval").json["state"] == "done"
    assert client.get("/api/runs/never-evaluated/eval").json["state"] == "none"


def test_eval_is_refused_before_the_run_has_finished_and_with_a_bad_limit(client, runs_dir):
    folder = fake_run(runs_dir, "half", {"beta": 0.1}, healthy_records(4))
    refused = client.post("/api/runs/half/eval", json={})
    assert refused.status_code == 409 and "has not finished" in refused.json["error"]
    (folder / "summary.json").write_text("{}")
    bad = client.post("/api/runs/half/eval", json={"limit": "many"})
    assert bad.status_code == 400 and "limit" in bad.json["errors"]
    assert client.post("/api/runs/nobody/eval", json={}).status_code == 404
    assert not (folder / "eval").exists()


def test_eval_runs_preftune_eval_and_shows_its_one_line_error_when_the_model_is_missing(runs_dir):
    folder = fake_run(runs_dir, "no-model", {"beta": 0.1}, healthy_records(4))
    (folder / "summary.json").write_text("{}")
    client = create_app(runs_dir, manager=RunManager(runs_dir, env=manager_environment())).test_client()
    started = client.post("/api/runs/no-model/eval", json={"judge": "", "limit": "2"})
    assert started.status_code == 202 and started.json["state"] == "running"
    done = wait_for(lambda: (e := client.get("/api/runs/no-model/eval").json)["state"] != "running" and e,
                    timeout=120, what="preftune eval to end")
    assert done["state"] == "failed"
    assert "no trained model in output_dir" in done["log"]  # preftune eval's own ConfigError message
    assert "Traceback" not in done["log"]
    assert done["log"].startswith(f"$ preftune eval {folder / CONFIG_FILE} --output-dir {folder / 'eval'} --limit 2")


def label_keys(script: str, language: str) -> set[str]:
    """The keys of LABELS[language] in board.js (read as text: a block from `  language: {` to its `  },`)."""
    block = re.search(rf"\n  {language}: \{{(.*?)\n  \}},", script, re.S).group(1)
    return set(re.findall(r'"([a-z_]+\.[a-z_]+)":', block))


def test_every_label_on_the_page_including_evaluate_and_sample_has_english_and_chinese(client):
    page = client.get("/").get_data(as_text=True)
    script = client.get("/static/board.js").get_data(as_text=True)
    used = set(re.findall(r'data-i18n="([^"]+)"', page)) | set(re.findall(r't\("([a-z_]+\.[a-z_]+)"\)', script))
    assert {"tab.evaluate", "eval.go", "eval.judge", "eval.chart", "sample.go", "sample.store"} <= used
    assert used <= label_keys(script, "en"), used - label_keys(script, "en")
    assert used <= label_keys(script, "zh"), used - label_keys(script, "zh")
    states = {f"{kind}.{state}" for kind in ("eval", "sample") for state in ("none", "running", "done", "failed")}
    assert states <= label_keys(script, "en") & label_keys(script, "zh")


# Settings under which a tiny real run on stories260K displaces (both log-probs fall, the chosen by > 1 nat): one
# batch holding all 8 pairs at every step (no batch-to-batch noise) and a learning rate high enough that the
# rejected log-prob is driven down and drags the chosen one with it. Measured (25 steps): the span covers steps
# 1-25, chosen -35.1 -> -47.2 nats, rejected -> -103.9; ~13 s of training on one CPU thread. (beta 0.1 displaces
# too, but the chosen falls by only ~1.8 nats, close to the detector's 1-nat floor.)
DISPLACING = {"per_device_train_batch_size": "8", "learning_rate": "3e-3", "beta": "0.5"}
DISPLACING_STEPS = 25


@pytest.mark.slow
def test_a_real_tiny_run_made_to_displace_carries_the_displacement_marker_and_evaluates(runs_dir, stories_model_dir, tmp_path):
    data = tmp_path / "pairs8.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS))
    manager = RunManager(runs_dir, env=manager_environment())
    client = create_app(runs_dir, manager=manager).test_client()
    settings = tiny_run_settings(stories_model_dir, data, DISPLACING_STEPS, **DISPLACING)
    assert client.post("/api/runs", json={"name": "displaced", "settings": settings}).status_code == 201
    wait_for(lambda: client.get("/api/runs/displaced").json["state"] == "finished", what="the displacing run")
    metrics = client.get("/api/runs/displaced/metrics").json
    train = metrics["train"]
    assert [record["step"] for record in train] == list(range(1, DISPLACING_STEPS + 1))
    finding = metrics["displacement"]
    assert finding is not None, [(r["logps/chosen"], r["logps/rejected"]) for r in train]
    # independently of the detector: over the marked span both log-probs fell, the chosen one by more than 1 nat
    span = {record["step"]: record for record in train if finding["start_step"] <= record["step"] <= finding["end_step"]}
    first, last = span[min(span)], span[max(span)]
    assert last["logps/chosen"] < first["logps/chosen"] - 1.0
    assert last["logps/rejected"] < first["logps/rejected"]

    # then `preftune eval` of the finished run from the board: held-out pairs and a judge; its point on the plot
    judge = "preftune.judges:sentiment_word_score"
    started = client.post("/api/runs/displaced/eval", json={"data": str(data), "judge": judge, "limit": 2})
    assert started.status_code == 202, started.json
    done = wait_for(lambda: (e := client.get("/api/runs/displaced/eval").json)["state"] != "running" and e,
                    timeout=240, what="preftune eval")
    assert done["state"] == "done", done["log"]
    results = done["results"]
    assert results["pairs"]["count"] == len(STORY_PAIRS) and results["generation"]["prompts"] == 2
    assert results == json.loads((runs_dir / "displaced" / "eval" / "eval_results.json").read_text())
    point = client.get("/api/evals?runs=displaced").json["points"][0]
    generation = results["generation"]
    assert (point["kl"], point["win_rate"], point["reward_difference"]) == (
        generation["kl"]["mean"], generation["win_rate"]["rate"], generation["reward"]["difference"]["mean"])


# ---- sample into a labeling store ------------------------------------------------------------------------------


def test_sample_names_each_missing_path_beside_its_field_and_starts_nothing(client, tmp_path):
    answer = client.post("/api/sample", json={"model": str(tmp_path / "nope"), "prompts": "", "store": ""})
    assert answer.status_code == 400
    assert set(answer.json["errors"]) == {"sample_model", "sample_prompts", "sample_store"}
    assert "no model folder" in answer.json["errors"]["sample_model"]
    bad = client.post("/api/sample", json={"model": str(tmp_path), "prompts": __file__, "store": "s.db", "limit": "0"})
    assert bad.status_code == 400 and "sample_limit" in bad.json["errors"]
    assert client.get("/api/sample").json["state"] == "none"


@pytest.mark.slow
def test_sample_from_the_board_fills_a_labeling_store_with_the_models_responses(runs_dir, stories_model_dir, tmp_path):
    import sqlite3

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in STORY_PAIRS[:2]))
    store = tmp_path / "labels.db"
    client = create_app(runs_dir, manager=RunManager(runs_dir, env=manager_environment())).test_client()
    body = {"model": str(stories_model_dir), "prompts": str(prompts), "store": str(store), "num_samples": 3,
            "max_new_tokens": 8}
    assert client.post("/api/sample", json=body).status_code == 202
    assert client.post("/api/sample", json=body).status_code == 409  # one at a time
    done = wait_for(lambda: (s := client.get("/api/sample").json)["state"] != "running" and s, timeout=180,
                    what="preftune sample")
    assert done["state"] == "done", done["log"]
    rows = [json.loads(line) for line in Path(done["candidates"]).read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in STORY_PAIRS[:2]]
    assert all(len(row["responses"]) == 3 for row in rows)
    # the store holds, per prompt, one pair for every two distinct responses the sampler wrote (read with sqlite)
    with sqlite3.connect(store) as conn:
        pairs = conn.execute("select count(*) from pairs").fetchone()[0]
    distinct = [len(set(row["responses"])) for row in rows]
    assert pairs == sum(n * (n - 1) // 2 for n in distinct) > 0
    assert "imported into" in done["log"]
