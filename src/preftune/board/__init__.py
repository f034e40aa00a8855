"""`preftune board`: a local web app over the whole preference loop: start a run from a form (checked by the
config schema), watch its curves while it trains, stop and resume it, compare runs, check data.

``runs`` (the form, its validation, the run manager: `preftune train` as a subprocess), ``app`` (the Flask app and
its waitress server, with the labeling app's access rules), ``pages`` and ``static/board.js`` (the page), ``cli``.
"""
