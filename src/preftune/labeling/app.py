"""The labeling web app (Flask, served by waitress): annotators judge pairs of responses in a browser.

Routes (HTML for browsers; a request with `Accept: application/json` gets JSON instead of a page or redirect):
    GET  /                  pick a name (stored in a cookie)
    POST /annotator         form: annotator -> cookie, redirect to /label
    GET  /label[?pair=ID]   the annotator's next pair (or pair ID, e.g. after an undo), progress, buttons
    POST /judge             form: pair_id, annotator, choice (left|right|tie|both_bad|skip), note (optional)
                            -> one committed judgment (201 JSON / 303 to /label); 400 malformed, 404 unknown pair,
                            409 already judged by this annotator
    POST /undo              form: annotator -> withdraw their last judgment (303 to that pair / JSON undone_pair)
    GET  /api/progress?annotator=NAME   {"done", "total"}

Access: with a token, every request must carry it: header `X-Preftune-Token: T` or `Authorization: Bearer T`, or the
cookie set by opening any page once with `?token=T`; none gives 401, a wrong one 403. POSTs whose Origin is another
site are refused (403) whether or not there is a token. Binding a non-loopback address requires a token
(`check_bind`). Each server thread has its own SQLite connection, never shared.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import Flask, Response, current_app, jsonify, redirect, render_template_string, request
from werkzeug.exceptions import HTTPException

from preftune.errors import ConfigError
from preftune.labeling import pages
from preftune.labeling.store import (MAX_ANNOTATOR_CHARS, MAX_NOTE_CHARS, AlreadyJudgedError, InvalidInputError,
                                     LabelingError, UnknownPairError, check_annotator, connect, has_judged,
                                     next_pair_id, opened, pair_view, parse_pair_id, progress, record_judgment,
                                     store_status, undo_last)

logger = logging.getLogger(__name__)

TOKEN_HEADER = "X-Preftune-Token"
TOKEN_COOKIE = "preftune_token"
ANNOTATOR_COOKIE = "preftune_annotator"
MAX_REQUEST_BYTES = 64 * 1024
ERROR_STATUS = {InvalidInputError: 400, UnknownPairError: 404, AlreadyJudgedError: 409}


def create_app(db_path: str | Path, *, token: str | None = None) -> Flask:
    """The Flask app over the store at `db_path` (which must exist); with `token`, every request must carry it."""
    with opened(db_path):
        pass  # fail now (DataError) on a missing or unreadable store, not on the first request
    app = Flask("preftune.labeling")
    app.config.update(PREFTUNE_DB=str(db_path), PREFTUNE_TOKEN=token or None, MAX_CONTENT_LENGTH=MAX_REQUEST_BYTES)
    app.before_request(check_access)
    app.extensions["preftune_connections"] = threading.local()
    app.register_error_handler(LabelingError, _labeling_error)
    app.register_error_handler(HTTPException, _http_error)
    app.add_url_rule("/", view_func=_index, methods=["GET"])
    app.add_url_rule("/annotator", view_func=_set_annotator, methods=["POST"])
    app.add_url_rule("/label", view_func=_label, methods=["GET"])
    app.add_url_rule("/judge", view_func=_judge, methods=["POST"])
    app.add_url_rule("/undo", view_func=_undo, methods=["POST"])
    app.add_url_rule("/api/progress", view_func=_progress, methods=["GET"])
    return app


# --------------------------------------------------------------------------------------------------------------
# Per-request plumbing: database connection, access control, errors
# --------------------------------------------------------------------------------------------------------------


def _db() -> sqlite3.Connection:
    """This thread's connection to the store, opened on first use and kept for the thread's later requests
    (closing the last connection of a WAL database checkpoints it, ~10 ms; waitress reuses its worker threads)."""
    local = current_app.extensions["preftune_connections"]
    if getattr(local, "conn", None) is None:
        local.conn = connect(current_app.config["PREFTUNE_DB"])
    return local.conn


def check_access() -> Response | None:
    """Refuse cross-site POSTs, then (with a token: `app.config["PREFTUNE_TOKEN"]`) requests without the right
    token; `?token=` logs in. A `before_request` hook, shared with the board (`preftune.board.app`)."""
    if request.method == "POST" and not _same_origin():
        return _error_response(403, "cross-site request refused")
    expected = current_app.config["PREFTUNE_TOKEN"]
    if expected is None:
        return None
    login = request.args.get("token")
    if login is not None:
        if not _token_matches(login, expected):
            return _error_response(403, "wrong access token")
        response = redirect(_url_without_token(), code=303)
        response.set_cookie(TOKEN_COOKIE, login, httponly=True, samesite="Strict")
        return response
    supplied = request.headers.get(TOKEN_HEADER) or _bearer_token() or request.cookies.get(TOKEN_COOKIE)
    if not supplied:
        return _error_response(401, "this server needs an access token: open it once with ?token=... or send the "
                                    f"{TOKEN_HEADER} header")
    if not _token_matches(supplied, expected):
        return _error_response(403, "wrong access token")
    return None


def _same_origin() -> bool:
    """False when the browser says the request comes from another site (Origin or Sec-Fetch-Site)."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


def _bearer_token() -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _token_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def _url_without_token() -> str:
    query = urlencode([(key, value) for key, value in request.args.items(multi=True) if key != "token"])
    return request.path + (f"?{query}" if query else "")


def _wants_json() -> bool:
    return request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json"


def _error_response(status: int, message: str) -> Response:
    if _wants_json() or current_app.config.get("PREFTUNE_JSON_ERRORS"):  # the board answers JSON only
        response = jsonify(error=message)
    else:
        response = Response(render_template_string(pages.ERROR, layout=_layout(), status=status, message=message))
    response.status_code = status
    return response


def _labeling_error(error: LabelingError) -> Response:
    return _error_response(ERROR_STATUS.get(type(error), 400), str(error))


def _http_error(error: HTTPException) -> Response:
    return _error_response(error.code or 500, error.description or error.name)


def _layout():
    return current_app.jinja_env.from_string(pages.LAYOUT)


def _render(template: str, status: int = 200, **context: Any) -> Response:
    response = Response(render_template_string(template, layout=_layout(), **context))
    response.status_code = status
    return response


# --------------------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------------------


def _index() -> Response:
    status = store_status(_db())
    return _render(pages.INDEX, total=status.pairs, annotators=status.annotators, max_name=MAX_ANNOTATOR_CHARS,
                   current=request.cookies.get(ANNOTATOR_COOKIE))


def _set_annotator() -> Response:
    name = check_annotator(request.form.get("annotator"))
    response = redirect("/label", code=303)
    response.set_cookie(ANNOTATOR_COOKIE, name, samesite="Strict", max_age=365 * 24 * 3600)
    return response


def _current_annotator() -> str | None:
    name = request.args.get("annotator") or request.cookies.get(ANNOTATOR_COOKIE)
    return check_annotator(name) if name else None


def _label() -> Response:
    annotator = _current_annotator()
    if annotator is None:
        return redirect("/", code=303)
    conn = _db()
    requested = request.args.get("pair")
    pair_id = parse_pair_id(requested) if requested is not None else next_pair_id(conn, annotator)
    if requested is not None and has_judged(conn, annotator, pair_id):
        return redirect("/label", code=303)  # e.g. reloading the page of a pair judged meanwhile
    done, total = progress(conn, annotator)
    if pair_id is None:
        return _render(pages.DONE, annotator=annotator, done=done, total=total)
    return _render(pages.LABEL, annotator=annotator, done=done, total=total, pair=pair_view(conn, pair_id, annotator),
                   max_note=MAX_NOTE_CHARS)


def _judge() -> Response:
    form = request.form
    missing = [name for name in ("pair_id", "annotator", "choice") if name not in form]
    if missing:
        raise InvalidInputError(f"missing form field(s): {', '.join(missing)}; expected pair_id, annotator, choice "
                                "and optionally note, form-encoded")
    pair_id = parse_pair_id(form["pair_id"])
    judgment_id = record_judgment(_db(), form["annotator"], pair_id, form["choice"], form.get("note", ""))
    if _wants_json():
        response = jsonify(judgment_id=judgment_id, pair_id=pair_id)
        response.status_code = 201
        return response
    return redirect("/label", code=303)


def _undo() -> Response:
    annotator = check_annotator(request.form.get("annotator"))
    pair_id = undo_last(_db(), annotator)
    if _wants_json():
        return jsonify(undone_pair=pair_id)
    return redirect(f"/label?pair={pair_id}" if pair_id is not None else "/label", code=303)


def _progress() -> Response:
    annotator = check_annotator(request.args.get("annotator"))
    done, total = progress(_db(), annotator)
    return jsonify(annotator=annotator, done=done, total=total)


# --------------------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, *, what: str = "the labeling app",
               token_env: str = "PREFTUNE_LABEL_TOKEN") -> None:
    """Refuse (ConfigError) to bind a non-loopback host without an access token."""
    if not is_loopback(host) and not token:
        raise ConfigError(f"binding {host} makes {what} reachable from other machines; give an access token "
                          f"(--token or {token_env}), or bind 127.0.0.1", key="host")


class AppServer:
    """A Flask app on a waitress server (a pool of `threads` worker threads), run in a background thread; the
    labeling app's (`LabelServer`) and the board's. The caller has checked the binding (`check_bind`).

    `port=0` takes a free port; `.url` is the address once started. Use as a context manager, or start()/stop().
    """

    def __init__(self, app: Flask, *, host: str = "127.0.0.1", port: int = 0, threads: int = 8):
        from waitress.server import create_server

        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth is N" under load is normal
        self.app = app
        self._map: dict = {}
        self._server = create_server(self.app, map=self._map, host=host, port=port, threads=threads,
                                     clear_untrusted_proxy_headers=True)
        self.host = host
        listening = getattr(self._server, "effective_listen", None)  # several sockets (e.g. localhost: IPv4 and 6)
        self.port = int(listening[0][1] if listening else self._server.effective_port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (Ctrl-C) or stop()."""
        try:
            self._server.run()
        finally:
            self._server.task_dispatcher.shutdown()

    def start(self) -> AppServer:
        self._thread = threading.Thread(target=self.serve_forever, name="preftune-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection, finish the running requests, end the thread."""
        from waitress import wasyncore

        self._server.task_dispatcher.shutdown()
        wasyncore.close_all(self._map)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class LabelServer(AppServer):
    """The labeling app over the store at `db_path` on a waitress server (`AppServer`); refuses a non-loopback
    `host` without a `token`."""

    def __init__(self, db_path: str | Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 threads: int = 8):
        check_bind(host, token)
        super().__init__(create_app(db_path, token=token), host=host, port=port, threads=threads)
