"""The labeling web app over HTTP: pages, judgments, undo, access token, bad input, and 20 concurrent annotators
against the real (waitress) server on loopback."""

from __future__ import annotations

import http.client
import json
import random
import sqlite3
import threading
import urllib.parse

import pytest

from preftune.cli import main
from preftune.errors import ConfigError
from preftune.labeling import store
from preftune.labeling.app import LabelServer, check_bind, create_app, is_loopback
from preftune.labeling.store import import_candidates, opened

JSON = {"Accept": "application/json"}


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "labels.sqlite"
    import_candidates(path, [
        {"prompt_id": "p1", "prompt": "Say hi <b>politely</b>", "responses": ["Hello!", "<script>alert(1)</script>"]},
        {"prompt_id": "p2", "prompt": [{"role": "user", "content": "Sky colour?"}], "responses": ["Blue.", "Green."]},
    ])
    return path


@pytest.fixture
def client(db):
    return create_app(db).test_client()


def judgments(db) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT pair_id, annotator, choice, note, undone_at IS NOT NULL FROM judgments "
                            "ORDER BY id").fetchall()


# --------------------------------------------------------------------------------------------------------------
# Pages and the judge/undo round trip
# --------------------------------------------------------------------------------------------------------------


def test_label_page_shows_the_pair_escaped_with_progress(client):
    client.post("/annotator", data={"annotator": "ann"})
    page = client.get("/label").get_data(as_text=True)
    assert "Say hi &lt;b&gt;politely&lt;/b&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert "0 / 2 done" in page and 'name="pair_id" value="1"' in page


def test_label_without_a_name_redirects_to_the_name_form(client):
    response = client.get("/label")
    assert response.status_code == 303 and response.headers["Location"].endswith("/")


def test_judge_redirects_to_the_next_pair_and_undo_brings_the_pair_back(client, db):
    client.post("/annotator", data={"annotator": "ann"})
    response = client.post("/judge", data={"pair_id": "1", "annotator": "ann", "choice": "left", "note": "ok"})
    assert response.status_code == 303 and response.headers["Location"].endswith("/label")
    page = client.get("/label").get_data(as_text=True)
    assert 'name="pair_id" value="2"' in page and "1 / 2 done" in page and "Sky colour?" in page
    undo = client.post("/undo", data={"annotator": "ann"})
    assert undo.headers["Location"].endswith("/label?pair=1")
    assert judgments(db)[0][4] == 1  # kept, marked undone
    assert "0 / 2 done" in client.get("/label?pair=1").get_data(as_text=True)


def test_done_page_after_every_pair(client):
    for pair_id in (1, 2):
        client.post("/judge", data={"pair_id": pair_id, "annotator": "ann", "choice": "skip"})
    page = client.get("/label?annotator=ann").get_data(as_text=True)
    assert 'id="done"' in page and "2 / 2 done" in page


def test_progress_api_counts_this_annotators_judgments(client):
    client.post("/judge", data={"pair_id": 2, "annotator": "ann", "choice": "tie"}, headers=JSON)
    assert client.get("/api/progress?annotator=ann").get_json() == {"annotator": "ann", "done": 1, "total": 2}
    assert client.get("/api/progress?annotator=bob").get_json()["done"] == 0


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clean 4xx and nothing stored wrongly
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "content_type", "status"), [
    ({"annotator": "ann", "choice": "left"}, None, 400),  # no pair_id
    ({"pair_id": "1", "choice": "left"}, None, 400),  # no annotator
    ({"pair_id": "1", "annotator": "ann"}, None, 400),  # no choice
    ({"pair_id": "one", "annotator": "ann", "choice": "left"}, None, 400),
    ({"pair_id": "-1", "annotator": "ann", "choice": "left"}, None, 400),
    ({"pair_id": "1 OR 1=1", "annotator": "ann", "choice": "left"}, None, 400),
    ({"pair_id": "99", "annotator": "ann", "choice": "left"}, None, 404),
    ({"pair_id": "1", "annotator": "ann", "choice": "a; DROP TABLE pairs"}, None, 400),
    ({"pair_id": "1", "annotator": " ", "choice": "left"}, None, 400),
    ({"pair_id": "1", "annotator": "ann", "choice": "left", "note": "n" * 5001}, None, 400),
    ('{"pair_id": 1, "annotator": "ann", "choice": "left"}', "application/json", 400),
    (b"\xff\xfe\x00garbage=%%%&&&", "application/x-www-form-urlencoded", 400),
    ("pair_id=1&annotator=ann&choice=left&note=" + "x" * 70_000, "application/x-www-form-urlencoded", 413),
])
def test_malformed_judgment_posts_get_a_4xx_and_store_nothing(client, db, body, content_type, status):
    kwargs = {"data": body} if content_type is None else {"data": body, "content_type": content_type}
    response = client.post("/judge", headers=JSON, **kwargs)
    assert response.status_code == status
    assert "error" in response.get_json()
    assert judgments(db) == []


def test_malformed_post_from_a_browser_gets_an_html_error_page(client, db):
    response = client.post("/judge", data={"pair_id": "99", "annotator": "ann", "choice": "left"})
    assert response.status_code == 404 and 'id="error"' in response.get_data(as_text=True)


def test_second_judgment_of_the_same_pair_is_a_conflict(client, db):
    first = client.post("/judge", data={"pair_id": "1", "annotator": "ann", "choice": "left"}, headers=JSON)
    again = client.post("/judge", data={"pair_id": "1", "annotator": "ann", "choice": "right"}, headers=JSON)
    assert (first.status_code, again.status_code) == (201, 409)
    assert len(judgments(db)) == 1


def test_sql_looking_note_is_stored_verbatim_over_http(client, db):
    note = "x'); DELETE FROM judgments; DROP TABLE pairs; --"
    response = client.post("/judge", data={"pair_id": "2", "annotator": "Robert'); --", "choice": "both_bad",
                                           "note": note}, headers=JSON)
    assert response.status_code == 201
    assert judgments(db) == [(2, "Robert'); --", "both_bad", note, 0)]
    with opened(db) as conn:
        assert len(store.all_pairs(conn)) == 2


def test_cross_site_post_is_refused(client, db):
    response = client.post("/judge", data={"pair_id": "1", "annotator": "ann", "choice": "left"},
                           headers={"Origin": "http://evil.example", **JSON})
    assert response.status_code == 403 and judgments(db) == []
    same = client.post("/judge", data={"pair_id": "1", "annotator": "ann", "choice": "left"},
                       headers={"Origin": "http://localhost", **JSON})
    assert same.status_code == 201


# --------------------------------------------------------------------------------------------------------------
# Access token and binding
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def token_client(db):
    return create_app(db, token="s3cret-token").test_client()


def test_without_the_token_requests_get_401_and_with_a_wrong_one_403(token_client, db):
    post = {"pair_id": "1", "annotator": "ann", "choice": "left"}
    assert token_client.get("/").status_code == 401
    assert token_client.post("/judge", data=post, headers=JSON).status_code == 401
    assert token_client.post("/judge", data=post, headers={"X-Preftune-Token": "wrong", **JSON}).status_code == 403
    assert token_client.get("/?token=wrong").status_code == 403
    assert token_client.post("/judge", data=post, headers={"Authorization": "Bearer nope", **JSON}).status_code == 403
    assert judgments(db) == []


def test_token_in_a_header_or_bearer_is_accepted(token_client, db):
    first = token_client.post("/judge", data={"pair_id": "1", "annotator": "ann", "choice": "left"},
                              headers={"X-Preftune-Token": "s3cret-token", **JSON})
    second = token_client.post("/judge", data={"pair_id": "2", "annotator": "ann", "choice": "left"},
                               headers={"Authorization": "Bearer s3cret-token", **JSON})
    assert (first.status_code, second.status_code) == (201, 201)


def test_token_login_sets_a_cookie_and_strips_the_token_from_the_address(token_client):
    login = token_client.get("/label?annotator=ann&token=s3cret-token")
    assert login.status_code == 303 and login.headers["Location"] == "/label?annotator=ann"
    assert "HttpOnly" in login.headers["Set-Cookie"]
    assert token_client.get("/label?annotator=ann").status_code == 200


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                                ("::", False), ("example.com", False)])
def test_binding_beyond_loopback_needs_a_token(host, loopback):
    assert is_loopback(host) is loopback
    if loopback:
        check_bind(host, None)
    else:
        with pytest.raises(ConfigError, match="access token"):
            check_bind(host, None)
    check_bind(host, "a-token")


def test_serve_command_refuses_a_public_host_without_token(db, capsys, monkeypatch):
    monkeypatch.delenv("PREFTUNE_LABEL_TOKEN", raising=False)
    assert main(["label", "serve", "--db", str(db), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "access token" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------


def test_cli_import_status_export(tmp_path, capsys):
    candidates = tmp_path / "candidates.jsonl"
    rows = [{"prompt_id": "q1", "prompt": "Hi?", "responses": ["Hello.", "Hey.", "Yo."], "model": "m",
             "sampling": {"temperature": 0.7}}]
    candidates.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    db = tmp_path / "s.db"
    assert main(["label", "import", "--db", str(db), str(candidates)]) == 0
    assert "3 new pairs" in capsys.readouterr().out
    assert main(["label", "import", "--db", str(db), str(candidates)]) == 0
    assert "0 new pairs" in capsys.readouterr().out
    with opened(db) as conn:
        store.record_judgment(conn, "ann", 1, "left")
        store.record_judgment(conn, "ann", 2, "tie")
    assert main(["label", "status", "--db", str(db), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["pairs"], status["judgments_active"], status["annotators"]) == (3, 2, {"ann": 2})
    out = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", str(db), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["written"], report["excluded"]["tie"], report["excluded"]["unlabelled"]) == (1, 1, 1)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["label", "status", "--db", str(tmp_path / "missing.db")]) == 2
    assert "no labeling store" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": "q", "prompt": "x", "responses": "oops"}\n', encoding="utf-8")
    assert main(["label", "import", "--db", str(tmp_path / "s.db"), str(bad)]) == 2
    assert "row 0, field 'responses'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Concurrency against the real server
# --------------------------------------------------------------------------------------------------------------


def test_real_server_round_trip_and_wrong_token_over_loopback(db):
    with LabelServer(db, token="tok-123") as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = urllib.parse.urlencode({"pair_id": 1, "annotator": "ann", "choice": "right"})
        headers = {"Content-Type": "application/x-www-form-urlencoded", **JSON}
        connection.request("POST", "/judge", body, {**headers, "X-Preftune-Token": "bad"})
        wrong = connection.getresponse()
        wrong.read()
        connection.request("POST", "/judge", body, {**headers, "X-Preftune-Token": "tok-123"})
        right = connection.getresponse()
        assert (wrong.status, right.status) == (403, 201)
        assert json.loads(right.read())["pair_id"] == 1
        connection.close()
    (stored,) = judgments(db)
    assert stored[:2] == (1, "ann") and stored[2] in ("a", "b")


def test_racing_double_submits_of_one_judgment_store_it_once(db):
    statuses: list[int] = []
    start = threading.Barrier(10)

    def submit() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = urllib.parse.urlencode({"pair_id": 2, "annotator": "ann", "choice": "left"})
        start.wait()
        connection.request("POST", "/judge", body, {"Content-Type": "application/x-www-form-urlencoded", **JSON})
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
        connection.close()

    with LabelServer(db) as server:
        threads = [threading.Thread(target=submit) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(statuses) == [201] + [409] * 9
    assert len(judgments(db)) == 1


@pytest.mark.slow
def test_twenty_annotators_posting_500_judgments_each_store_exactly_10000_rows(tmp_path):
    annotators, per_annotator = 20, 500
    db = tmp_path / "load.sqlite"
    import_candidates(db, [{"prompt_id": f"p{i}", "prompt": f"Prompt {i}", "responses": [f"r{i}.{j}" for j in range(4)]}
                           for i in range(100)])  # 600 pairs
    statuses: list[int] = []
    failures: list[BaseException] = []
    start = threading.Barrier(annotators)

    def annotate(number: int) -> None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            pair_ids = random.Random(number).sample(range(1, 601), per_annotator)
            start.wait()
            for pair_id in pair_ids:
                choice = ("left", "right", "tie", "both_bad", "skip")[pair_id % 5]
                body = urllib.parse.urlencode({"pair_id": pair_id, "annotator": f"annotator-{number}",
                                               "choice": choice, "note": f"{number}/{pair_id}"})
                connection.request("POST", "/judge", body,
                                   {"Content-Type": "application/x-www-form-urlencoded", **JSON})
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
            connection.close()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    with LabelServer(db, threads=8) as server:
        workers = [threading.Thread(target=annotate, args=(number,)) for number in range(annotators)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert failures == [] and statuses == [201] * (annotators * per_annotator)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT annotator, pair_id, choice, note FROM judgments").fetchall()
    assert len(rows) == annotators * per_annotator
    expected = {(f"annotator-{number}", pair_id) for number in range(annotators)
                for pair_id in random.Random(number).sample(range(1, 601), per_annotator)}
    assert {(annotator, pair_id) for annotator, pair_id, _, _ in rows} == expected
    assert all(note == f"{annotator.split('-')[1]}/{pair_id}" for annotator, pair_id, _, note in rows)
    assert all((choice in ("a", "b")) == (pair_id % 5 in (0, 1)) for _, pair_id, choice, _ in rows)
