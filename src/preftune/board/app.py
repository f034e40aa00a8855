"""The board's web app (Flask, served by waitress like the labeling app, with its access rules).

Routes (the page is one HTML file and one script, ``static/board.js``; everything else is JSON):
    GET  /                              the page (tabs: new run, watch, compare, data)
    GET  /static/board.js               the script (draws the curves as SVG; no external files)
    GET  /api/schema                    the start form's fields (from the config schema)
    POST /api/validate                  {"name", "settings": {key: value}} -> {"ok", "errors", "yaml", "command"}
    GET  /api/runs                      every run's status
    POST /api/runs                      {"name", "settings"} -> 201 and the run's status; 400 with "errors" by field,
                                        409 when a run is training or the name is taken
    GET  /api/runs/NAME                 status: state, step, max_steps, progress, eta_seconds, checkpoints
    GET  /api/runs/NAME/metrics         log records (train, eval), displacement finding, grad-norm spikes
    GET  /api/runs/NAME/log?offset=N    the log from byte N
    GET  /api/runs/NAME/config.yaml     the run's config (a download)
    GET  /api/runs/NAME/report          `preftune report`'s text
    POST /api/runs/NAME/stop            SIGINT: the run saves a checkpoint after the current step and ends
    POST /api/runs/NAME/resume          `preftune train config.yaml resume_from_checkpoint=latest`
    GET  /api/compare?runs=A,B          final metrics of each run and the settings that differ
    POST /api/runs/NAME/eval            {"judge", "data", "limit"} (all optional): `preftune eval` on a finished run,
                                        as a subprocess, results into the run's eval/
    GET  /api/runs/NAME/eval            state (none, running, done, failed), eval_results.json, the eval log
    GET  /api/evals?runs=A,B            one reward/KL point per run (KL, reward difference, win rate, pair metrics)
    POST /api/data/check                {"target"} -> `preftune data check`'s report (JSON and table text)
    POST /api/sample                    {"model", "prompts", "store", "num_samples", "max_new_tokens", "limit"}:
                                        `preftune sample --store` as a subprocess (one at a time)
    GET  /api/sample                    its state (none, running, done, failed), store, candidates file and log
    POST /api/label/open                {"db"} -> {"url"}: the labeling app over that store, on another port of the
                                        same address with the same token (started once per store, kept open)

Access as in the labeling app (``preftune.labeling.app.check_access``): with a token every request carries it
(header, bearer, or the cookie set by opening the page once with ``?token=``); cross-site POSTs are refused; binding
a non-loopback address requires a token.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from preftune.board import pages
from preftune.board.runs import BoardError, RunManager, SampleJob, form_fields
from preftune.errors import PreftuneError
from preftune.labeling.app import AppServer, check_access, check_bind

MAX_REQUEST_BYTES = 256 * 1024
TOKEN_ENV = "PREFTUNE_BOARD_TOKEN"


def create_app(runs_dir: str | Path, *, token: str | None = None, manager: RunManager | None = None) -> Flask:
    """The board over the runs in ``runs_dir`` (created if missing); with ``token``, every request must carry it."""
    app = Flask("preftune.board")
    app.config.update(PREFTUNE_TOKEN=token or None, PREFTUNE_JSON_ERRORS=True, MAX_CONTENT_LENGTH=MAX_REQUEST_BYTES)
    app.extensions["preftune_runs"] = manager or RunManager(runs_dir)
    app.extensions["preftune_sample"] = SampleJob(app.extensions["preftune_runs"].python,
                                                  app.extensions["preftune_runs"].env)
    app.extensions["preftune_label_servers"] = {}  # store path -> LabelServer
    app.extensions["preftune_bind"] = "127.0.0.1"  # the address label servers bind (BoardServer sets its own)
    app.before_request(check_access)
    app.register_error_handler(BoardError, _board_error)
    app.register_error_handler(PreftuneError, _library_error)
    app.register_error_handler(HTTPException, _http_error)
    rules = [
        ("/", _index, "GET"), ("/static/board.js", _script, "GET"), ("/api/schema", _schema, "GET"),
        ("/api/validate", _validate, "POST"), ("/api/runs", _list_runs, "GET"), ("/api/runs", _start, "POST"),
        ("/api/runs/<name>", _status, "GET"), ("/api/runs/<name>/metrics", _metrics, "GET"),
        ("/api/runs/<name>/log", _log, "GET"), ("/api/runs/<name>/config.yaml", _config_file, "GET"),
        ("/api/runs/<name>/report", _report, "GET"), ("/api/runs/<name>/stop", _stop, "POST"),
        ("/api/runs/<name>/resume", _resume, "POST"), ("/api/compare", _compare, "GET"),
        ("/api/runs/<name>/eval", _evaluate, "POST"), ("/api/runs/<name>/eval", _evaluation, "GET"),
        ("/api/evals", _eval_points, "GET"), ("/api/data/check", _data_check, "POST"),
        ("/api/sample", _sample, "POST"), ("/api/sample", _sample_status, "GET"),
        ("/api/label/open", _open_labeling, "POST"),
    ]
    for rule, view, method in rules:
        app.add_url_rule(rule, endpoint=f"{view.__name__}_{method}", view_func=view, methods=[method])
    return app


def _runs() -> RunManager:
    return current_app.extensions["preftune_runs"]


def _board_error(error: BoardError) -> Response:
    response = jsonify(error=str(error), errors=error.errors)
    response.status_code = error.status
    return response


def _library_error(error: PreftuneError) -> Response:
    response = jsonify(error=str(error), errors={})
    response.status_code = 400
    return response


def _http_error(error: HTTPException) -> Response:
    response = jsonify(error=error.description or error.name, errors={})
    response.status_code = error.code or 500
    return response


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BoardError("expected a JSON object (Content-Type: application/json)")
    return data


def _settings_of(data: dict[str, Any]) -> dict[str, Any]:
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise BoardError("'settings' must be an object of key: value")
    return settings


# --------------------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------------------


def _index() -> Response:
    return Response(pages.PAGE, mimetype="text/html")


def _script() -> Response:
    script = resources.files("preftune.board").joinpath("static/board.js").read_text(encoding="utf-8")
    return Response(script, mimetype="text/javascript")


def _schema() -> Response:
    return jsonify(fields=[field.to_dict() for field in form_fields()])


def _validate() -> Response:
    data = _body()
    return jsonify(_runs().validate(str(data.get("name", "")), _settings_of(data)).to_dict())


def _list_runs() -> Response:
    runs = _runs()
    return jsonify(runs=[runs.status(name) for name in runs.names()])


def _start() -> Response:
    data = _body()
    name = str(data.get("name", ""))
    _runs().start(name, _settings_of(data))
    response = jsonify(_runs().status(name))
    response.status_code = 201
    return response


def _status(name: str) -> Response:
    return jsonify(_runs().status(name))


def _metrics(name: str) -> Response:
    return jsonify(_runs().metrics(name))


def _log(name: str) -> Response:
    try:
        offset = int(request.args.get("offset", "0"))
    except ValueError:
        raise BoardError("offset: expected a whole number of bytes") from None
    return jsonify(_runs().log(name, offset))


def _config_file(name: str) -> Response:
    path = _runs().run_dir(name) / "config.yaml"
    if not path.is_file():
        raise BoardError(f"no run named {name!r}", 404)
    return Response(path.read_text(encoding="utf-8"), mimetype="application/x-yaml",
                    headers={"Content-Disposition": f'attachment; filename="{name}.yaml"'})


def _report(name: str) -> Response:
    return jsonify(text=_runs().report(name))


def _stop(name: str) -> Response:
    return jsonify(_runs().stop(name))


def _resume(name: str) -> Response:
    return jsonify(_runs().resume(name))


def _run_names() -> list[str]:
    """The ``runs`` query argument: one or more run names, comma-separated."""
    names = [name for name in request.args.get("runs", "").split(",") if name]
    if not names:
        raise BoardError("runs: expected one or more run names, comma-separated")
    return names


def _compare() -> Response:
    return jsonify(_runs().compare(_run_names()))


def _evaluate(name: str) -> Response:
    data = _body()
    limit = data.get("limit")
    if limit not in (None, ""):
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise BoardError("limit: expected a whole number of prompts", 400, {"limit": "expected a whole number"}) from None
        if limit < 1:
            raise BoardError("limit: expected at least 1 prompt", 400, {"limit": "expected at least 1"})
    text = {key: str(data.get(key) or "").strip() or None for key in ("judge", "data")}
    response = jsonify(_runs().evaluate(name, judge=text["judge"], data=text["data"], limit=limit or None))
    response.status_code = 202
    return response


def _evaluation(name: str) -> Response:
    return jsonify(_runs().evaluation(name))


def _eval_points() -> Response:
    return jsonify(points=_runs().eval_points(_run_names()))


def _data_check() -> Response:
    """`preftune data check TARGET` (a data file, a registered name or a config): its report per split."""
    from preftune.data.validate import check_target

    target = str(_body().get("target", "")).strip()
    if not target:
        raise BoardError("target: expected a data file, a dataset name or a config YAML", 400,
                         {"target": "expected a data file, a dataset name or a config YAML"})
    checked = check_target(target)
    return jsonify(reports={split: item.report.to_dict() for split, item in checked.items()},
                   text="\n\n".join(f"[{split}] {item.report.format_table()}" for split, item in checked.items()))


def _whole(data: dict[str, Any], key: str, default: int | None, field: str) -> int | None:
    value = data.get(key)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise BoardError(f"{key}: expected a whole number >= 1", 400, {field: "expected a whole number >= 1"})
    return number


def _sample() -> Response:
    """`preftune sample --model M --prompts P --out STORE.candidates.jsonl --store STORE` as a subprocess."""
    data = _body()
    text = {key: str(data.get(key) or "").strip() for key in ("model", "prompts", "store")}
    job = current_app.extensions["preftune_sample"]
    response = jsonify(job.start(
        model=text["model"], prompts=text["prompts"], store=text["store"],
        num_samples=_whole(data, "num_samples", 2, "sample_num_samples"),
        max_new_tokens=_whole(data, "max_new_tokens", 64, "sample_max_new_tokens"),
        limit=_whole(data, "limit", None, "sample_limit"),
    ))
    response.status_code = 202
    return response


def _sample_status() -> Response:
    return jsonify(current_app.extensions["preftune_sample"].status())


def _open_labeling() -> Response:
    """Start (once per store) the labeling app over a store (`preftune label serve`), on a free port of the board's
    address with the board's token; answer its address. The store must exist (`preftune label import`)."""
    from preftune.labeling.app import LabelServer

    db = str(_body().get("db", "")).strip()
    if not db:
        raise BoardError("db: expected the path of a labeling store", 400, {"db": "expected the path of a labeling store"})
    path = str(Path(db).resolve())
    servers = current_app.extensions["preftune_label_servers"]
    if path not in servers:
        if not Path(path).is_file():
            raise BoardError(f"no labeling store at {db} (create one with preftune label import)", 400,
                             {"db": f"no labeling store at {db} (create one with preftune label import)"})
        servers[path] = LabelServer(path, host=current_app.extensions["preftune_bind"], port=0,
                                    token=current_app.config["PREFTUNE_TOKEN"]).start()
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    return jsonify(url=f"http://{host}:{servers[path].port}/", db=path)


# --------------------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------------------


class BoardServer(AppServer):
    """The board on a waitress server (``labeling.app.AppServer``); refuses a non-loopback ``host`` without a
    ``token``. ``stop()`` also stops a training run gracefully."""

    def __init__(self, runs_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 threads: int = 8, manager: RunManager | None = None):
        check_bind(host, token, what="the board", token_env=TOKEN_ENV)
        super().__init__(create_app(runs_dir, token=token, manager=manager), host=host, port=port, threads=threads)
        self.app.extensions["preftune_bind"] = host

    @property
    def runs(self) -> RunManager:
        return self.app.extensions["preftune_runs"]

    def stop(self) -> None:
        super().stop()
        for server in self.app.extensions["preftune_label_servers"].values():
            server.stop()
        self.app.extensions["preftune_sample"].shutdown()
        self.runs.shutdown()
