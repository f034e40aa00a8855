"""The labeling store (SQLite), the resolution of judgments, agreement statistics and the export to TRL pairs."""

from __future__ import annotations

import itertools
import json
import math
import sqlite3

import pytest

from preftune.data.formats import load_preference_data
from preftune.errors import DataError
from preftune.labeling import store
from preftune.labeling.export import agreement, cohen_kappa, export_pairs, fleiss_kappa, resolve
from preftune.labeling.store import (AlreadyJudgedError, InvalidInputError, UnknownPairError, import_candidate_rows,
                                     import_candidates, opened, record_judgment, undo_last)


def candidate(prompt_id: str, responses: list[str], prompt=None, **extra) -> dict:
    return {"prompt_id": prompt_id, "prompt": prompt if prompt is not None else f"Question {prompt_id}?",
            "responses": responses, "model": "tiny", "sampling": {"temperature": 1.0}, **extra}


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "labels.sqlite"
    import_candidates(path, [candidate("p1", ["Yes.", "No.", "Maybe."]), candidate("p2", ["Blue.", "Green."])])
    return path


def texts_of(conn, pair_id: int) -> tuple[str, str]:
    """(response_a, response_b) texts of a pair, read with plain SQL."""
    return conn.execute("SELECT ra.text, rb.text FROM pairs p JOIN responses ra ON ra.id = p.response_a "
                        "JOIN responses rb ON rb.id = p.response_b WHERE p.id = ?", (pair_id,)).fetchone()


# --------------------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------------------


def test_import_creates_all_unordered_pairs_of_distinct_responses(tmp_path):
    rows = [candidate(f"p{k}", [f"answer {k}.{i}" for i in range(k)]) for k in (2, 3, 4, 5)]
    created = import_candidates(tmp_path / "s.db", rows)
    assert created == sum(math.comb(k, 2) for k in (2, 3, 4, 5))
    with opened(tmp_path / "s.db") as conn:
        for k in (2, 3, 4, 5):
            pairs = {tuple(sorted(texts_of(conn, pair_id))) for (pair_id,) in conn.execute(
                "SELECT p.id FROM pairs p JOIN prompts pr ON pr.id = p.prompt_ref WHERE pr.prompt_id = ?", (f"p{k}",))}
            expected = {tuple(sorted(pair)) for pair in itertools.combinations([f"answer {k}.{i}" for i in range(k)], 2)}
            assert pairs == expected


def test_import_is_idempotent_and_pairs_new_responses_with_stored_ones(tmp_path):
    path = tmp_path / "s.db"
    rows = [candidate("p1", ["a", "b", "c"])]
    assert import_candidates(path, rows) == 3
    assert import_candidates(path, rows) == 0
    assert import_candidates(path, [candidate("p1", ["c", "d"])]) == 3  # d with each of a, b, c
    with opened(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == math.comb(4, 2)
        assert conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0] == 1


def test_import_skips_repeated_and_empty_responses_and_counts_them(tmp_path):
    stats = import_candidate_rows(tmp_path / "s.db", [candidate("p1", ["same", "same", "  ", "", "other"])])
    assert (stats.new_responses, stats.repeated_responses, stats.empty_responses, stats.new_pairs) == (2, 1, 2, 1)


def test_import_keeps_conversational_prompts(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    import_candidates(tmp_path / "s.db", [candidate("c1", ["Hello.", "Hey."], prompt=messages)])
    with opened(tmp_path / "s.db") as conn:
        assert store.all_pairs(conn)[0].prompt == messages


@pytest.mark.parametrize(("row", "field"), [
    ({"prompt": "x", "responses": ["a", "b"]}, "prompt_id"),
    ({"prompt_id": "p", "prompt": "", "responses": ["a", "b"]}, "prompt"),
    ({"prompt_id": "p", "prompt": [{"role": "user"}], "responses": ["a", "b"]}, "prompt"),
    ({"prompt_id": "p", "prompt": 3, "responses": ["a", "b"]}, "prompt"),
    ({"prompt_id": "p", "prompt": "x", "responses": "ab"}, "responses"),
    ({"prompt_id": "p", "prompt": "x", "responses": ["a", 2]}, "responses"),
    ({"prompt_id": "p", "prompt": "x", "responses": ["a", "\ud800"]}, "responses"),
    ({"prompt_id": "p", "prompt": "x", "responses": ["a", "b"], "model": 7}, "model"),
    ({"prompt_id": "p", "prompt": "x", "responses": ["a", "b"], "sampling": [1]}, "sampling"),
])
def test_malformed_candidate_row_names_row_and_field_and_imports_nothing(tmp_path, row, field):
    path = tmp_path / "s.db"
    with pytest.raises(DataError) as raised:
        import_candidates(path, [candidate("ok", ["a", "b"]), row], source="cands.jsonl")
    assert (raised.value.file, raised.value.row, raised.value.field) == ("cands.jsonl", 1, field)
    assert not path.exists() or import_candidates(path, []) == 0 and _count(path, "pairs") == 0


def test_known_prompt_id_with_another_prompt_is_refused_and_rolled_back(db):
    before = _count(db, "responses")
    with pytest.raises(DataError, match="different prompt"):
        import_candidates(db, [candidate("p3", ["x", "y"]), candidate("p1", ["z"], prompt="Another question?")])
    assert _count(db, "responses") == before and _count(db, "prompts") == 2


def test_read_candidates_file_reports_the_bad_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(candidate("p1", ["a", "b"])) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError) as raised:
        store.read_candidates_file(path)
    assert raised.value.row == 2


def _count(path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # table names are test constants


# --------------------------------------------------------------------------------------------------------------
# Schema, WAL, migrations
# --------------------------------------------------------------------------------------------------------------


def test_store_is_in_wal_mode_at_the_current_schema_version(db):
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == store.SCHEMA_VERSION == 1


def test_migration_step_upgrades_and_keeps_the_data(db):
    def add_reviewer_column(conn):
        conn.execute("ALTER TABLE judgments ADD COLUMN reviewer TEXT")

    with opened(db) as conn:
        record_judgment(conn, "ann", 1, "left")
        assert store.migrate(conn, (*store.MIGRATIONS, add_reviewer_column)) == 2
        assert store.schema_version(conn) == 2
        assert conn.execute("SELECT annotator, reviewer FROM judgments").fetchall() == [("ann", None)]
        assert store.migrate(conn, (*store.MIGRATIONS, add_reviewer_column)) == 2  # nothing left to do


def test_failing_migration_leaves_the_store_unchanged(db):
    def half_done(conn):
        conn.execute("CREATE TABLE reviews (id INTEGER PRIMARY KEY)")
        raise RuntimeError("step failed")

    with opened(db) as conn:
        with pytest.raises(RuntimeError):
            store.migrate(conn, (*store.MIGRATIONS, half_done))
        assert store.schema_version(conn) == 1
        assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'reviews'").fetchone() is None


def test_store_from_a_newer_version_is_refused(db):
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version = 9")
    with pytest.raises(DataError, match="newer"):
        store.connect(db)


def test_missing_store_and_non_sqlite_file_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no labeling store"):
        store.connect(tmp_path / "absent.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(DataError, match="cannot open"):
        store.connect(junk)


# --------------------------------------------------------------------------------------------------------------
# Judgments
# --------------------------------------------------------------------------------------------------------------


def test_left_and_right_clicks_store_the_response_that_was_shown_there(db):
    with opened(db) as conn:
        for annotator in ("ann", "bob", "cy"):
            for pair_id, shown in ((1, "left"), (2, "right"), (3, "left"), (4, "right")):
                view = store.pair_view(conn, pair_id, annotator)
                record_judgment(conn, annotator, pair_id, shown)
                picked = view.left_text if shown == "left" else view.right_text
                choice, shown_left = conn.execute("SELECT choice, shown_left FROM judgments WHERE annotator = ? AND "
                                                  "pair_id = ?", (annotator, pair_id)).fetchone()
                assert texts_of(conn, pair_id)["ab".index(choice)] == picked
                assert texts_of(conn, pair_id)["ab".index(shown_left)] == view.left_text


def test_shown_order_is_stable_and_randomised_across_pairs_and_annotators(tmp_path):
    path = tmp_path / "s.db"
    import_candidates(path, [candidate(f"p{i}", ["first", "second"]) for i in range(200)])
    with opened(path) as conn:
        orders = {(who, pair): store.pair_view(conn, pair, who).shown_left for who in ("x", "y") for pair in
                  range(1, 201)}
        assert all(store.pair_view(conn, pair, who).shown_left == side for (who, pair), side in orders.items())
    a_left = sum(side == "a" for side in orders.values())
    assert 120 < a_left < 280  # 400 fair coin flips: mean 200, sd 10; outside is an 8-sd event
    assert any(orders[("x", pair)] != orders[("y", pair)] for pair in range(1, 201))


def test_sql_looking_note_is_stored_verbatim(db):
    note = "'); DROP TABLE judgments; -- \" OR 1=1; SELECT * FROM prompts"
    with opened(db) as conn:
        record_judgment(conn, "ann", 1, "tie", note)
        assert conn.execute("SELECT note, choice FROM judgments").fetchall() == [(note, "tie")]
        assert conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0] == 2


def test_second_judgment_of_a_pair_is_refused_until_undone(db):
    with opened(db) as conn:
        record_judgment(conn, "ann", 1, "left")
        with pytest.raises(AlreadyJudgedError):
            record_judgment(conn, "ann", 1, "right")
        record_judgment(conn, "bob", 1, "right")  # another annotator may
        assert undo_last(conn, "ann") == 1
        record_judgment(conn, "ann", 1, "skip")
        rows = conn.execute("SELECT annotator, choice, undone_at IS NOT NULL FROM judgments ORDER BY id").fetchall()
    assert [(annotator, undone) for annotator, _, undone in rows] == [("ann", 1), ("bob", 0), ("ann", 0)]
    assert rows[2][1] == "skip"


@pytest.mark.parametrize(("annotator", "pair_id", "choice", "note", "error"), [
    ("ann", 99, "left", "", UnknownPairError),
    ("ann", 1, "A", "", InvalidInputError),
    ("ann", 1, "", "", InvalidInputError),
    ("", 1, "left", "", InvalidInputError),
    ("x" * 65, 1, "left", "", InvalidInputError),
    ("bad\nname", 1, "left", "", InvalidInputError),
    ("ann", 1, "left", "n" * 5001, InvalidInputError),
])
def test_invalid_judgments_raise_and_store_nothing(db, annotator, pair_id, choice, note, error):
    with opened(db) as conn:
        with pytest.raises(error):
            record_judgment(conn, annotator, pair_id, choice, note)
        assert conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 0


def test_undo_walks_back_one_annotators_judgments_only(db):
    with opened(db) as conn:
        record_judgment(conn, "ann", 2, "left")
        record_judgment(conn, "bob", 3, "left")
        record_judgment(conn, "ann", 4, "right")
        assert [undo_last(conn, "ann"), undo_last(conn, "ann"), undo_last(conn, "ann")] == [4, 2, None]
        assert store.progress(conn, "ann") == (0, 4)
        assert store.progress(conn, "bob") == (1, 4)


def test_next_pair_prefers_pairs_fewest_people_judged_and_ends_with_none(db):
    with opened(db) as conn:
        assert store.next_pair_id(conn, "ann") == 1
        record_judgment(conn, "bob", 1, "left")
        record_judgment(conn, "bob", 2, "left")
        assert store.next_pair_id(conn, "ann") == 3
        for pair_id in (3, 4, 1, 2):
            assert store.next_pair_id(conn, "ann") == pair_id
            record_judgment(conn, "ann", pair_id, "skip")
        assert store.next_pair_id(conn, "ann") is None
        assert store.progress(conn, "ann") == (4, 4)


# --------------------------------------------------------------------------------------------------------------
# Resolution and agreement (pure functions, against hand-computed values)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("choices", "outcome"), [
    ([], "unlabelled"),
    (["skip", "skip"], "skip"),
    (["a"], "a"),
    (["a", "skip", "skip"], "a"),
    (["a", "b"], "no_majority"),
    (["a", "a", "b"], "a"),
    (["b", "tie", "b", "a"], "b"),
    (["tie", "tie", "a"], "tie"),
    (["both_bad"], "both_bad"),
    (["a", "b", "tie"], "no_majority"),
])
def test_resolution_by_majority_of_non_skip_labels(choices, outcome):
    assert resolve(choices) == outcome


def test_fleiss_kappa_matches_the_worked_example_of_fleiss_1971_on_wikipedia():
    # 10 subjects, 14 raters, 5 categories: P-bar = 0.378, P_e = 0.213, kappa = 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_with_a_varying_number_of_raters():
    # item 1: 3 raters (a, a, b) -> P = (4 + 1 - 3) / 6 = 1/3; item 2: 2 raters (b, b) -> P = 1
    # P-bar = 2/3; p_a = 2/5, p_b = 3/5 -> P_e = 13/25; kappa = (2/3 - 13/25) / (12/25) = 11/36
    assert fleiss_kappa([[2, 1], [0, 2]]) == pytest.approx(11 / 36)
    assert fleiss_kappa([[2, 0], [3, 0]]) is None  # every rating the same: undefined


def test_cohen_kappa_matches_a_hand_computed_two_by_two_table():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4
    first = ["y"] * 25 + ["n"] * 25
    second = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None


def test_agreement_of_two_annotators_equals_cohen_and_fleiss_definitions():
    labels = {1: {"x": "a", "y": "a"}, 2: {"x": "a", "y": "b"}, 3: {"x": "b", "y": "b"}, 4: {"x": "tie", "y": "b"},
              5: {"x": "a"}}
    result = agreement(labels)
    # shared items 1-4; observed 2/4. Cohen: x = (a 2, b 1, tie 1), y = (a 1, b 3): p_e = (2*1 + 1*3) / 16 = 5/16,
    # kappa = (1/2 - 5/16) / (11/16) = 3/11. Fleiss: p_a = 3/8, p_b = 4/8, p_tie = 1/8 -> P_e = 26/64,
    # kappa = (1/2 - 26/64) / (38/64) = 6/38.
    assert (result.items, result.observed, result.unanimous) == (4, 0.5, 0.5)
    assert result.cohen_kappa["x | y"]["kappa"] == pytest.approx(3 / 11)
    assert result.fleiss_kappa == pytest.approx(6 / 38)


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


def test_export_writes_majority_winners_as_trl_pairs_and_counts_the_rest(db, tmp_path):
    with opened(db) as conn:
        pairs = {pair.pair_id: pair for pair in store.all_pairs(conn)}

        def judge(annotator, pair_id, winner):  # winner: the response text that should win, or a non-a/b choice
            view = store.pair_view(conn, pair_id, annotator)
            shown = {view.left_text: "left", view.right_text: "right"}.get(winner, winner)
            record_judgment(conn, annotator, pair_id, shown)

        p1, p2, p3, p4 = (pairs[i] for i in (1, 2, 3, 4))
        judge("x", 1, p1.response_b); judge("y", 1, p1.response_b); judge("z", 1, p1.response_a)  # b wins 2:1
        judge("x", 2, p2.response_a); judge("y", 2, p2.response_b)  # no majority
        judge("x", 3, "tie"); judge("y", 3, "skip")  # tie
        judge("x", 4, p4.response_a); judge("y", 4, "skip"); judge("z", 4, "both_bad"); judge("w", 4, p4.response_a)
    out = tmp_path / "pairs.jsonl"
    report = export_pairs(db, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(row["prompt"], row["chosen"], row["rejected"]) for row in rows] == [
        (p1.prompt, p1.response_b, p1.response_a), (p4.prompt, p4.response_a, p4.response_b)]
    assert [(row["votes_for"], row["votes_total"]) for row in rows] == [(2, 3), (2, 3)]
    assert report.excluded == {"tie": 1, "both_bad": 0, "no_majority": 1, "skip": 0, "unlabelled": 0}
    assert report.judgments_by_choice["skip"] == 2 and sum(report.judgments_by_choice.values()) == 11
    loaded = load_preference_data(str(out))
    assert loaded.dataset["chosen"] == [p1.response_b, p4.response_a] and not loaded.is_conversational


def test_export_of_conversational_prompts_reads_as_conversational_data(tmp_path):
    path = tmp_path / "s.db"
    messages = [{"role": "user", "content": "Hi?"}]
    import_candidates(path, [candidate("c", ["Hello.", "Go."], prompt=messages), candidate("t", ["Yes.", "No."])])
    with opened(path) as conn:
        record_judgment(conn, "x", 1, "left")
        record_judgment(conn, "x", 2, "right")
    export_pairs(path, tmp_path / "out.jsonl")
    loaded = load_preference_data(str(tmp_path / "out.jsonl"))
    assert loaded.is_conversational and len(loaded.dataset) == 2
    assert loaded.dataset["prompt"][1] == [{"role": "user", "content": "Question t?"}]
    assert {turns[0]["content"] for turns in loaded.dataset["chosen"]} <= {"Hello.", "Go.", "Yes.", "No."}
