"""The board's one HTML page: inline CSS, the structure of the five tabs, and ``/static/board.js`` (which fills
them, switches English/Chinese and draws the curves). Every visible label carries ``data-i18n`` (its key in the
script's ``LABELS``); no external files, nothing fetched from elsewhere."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>preftune board</title>
<style>
body { font-family: system-ui, "Noto Sans CJK SC", sans-serif; margin: 0 auto; max-width: 1280px; padding: 0 1rem 2rem; }
header { display: flex; gap: .6rem; align-items: center; border-bottom: 1px solid #ccc; padding: .6rem 0; }
header h1 { font-size: 1.2rem; margin: 0 1rem 0 0; }
nav button.active { background: #246; color: #fff; }
button { font-size: .95rem; padding: .35rem .8rem; cursor: pointer; }
section { display: none; padding-top: .8rem; }
section.active { display: block; }
.form { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: .6rem 1.2rem; }
.field label { display: block; font-weight: 600; font-size: .9rem; }
.field input[type=text], .field input[type=number], .field select { width: 100%; box-sizing: border-box; }
.field small { color: #666; display: block; font-size: .75rem; max-height: 3.2em; overflow: hidden; }
.error { color: #a00; font-size: .85rem; display: block; }
pre { white-space: pre-wrap; word-wrap: break-word; background: #f4f4f4; padding: .5rem; border-radius: 4px;
      font-size: .8rem; max-height: 22rem; overflow: auto; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: .8rem; }
.panel { border: 1px solid #ddd; border-radius: 4px; padding: .3rem; }
.panel h3 { font-size: .85rem; margin: .1rem .3rem; }
svg text { font-size: 10px; fill: #333; }
.bar { height: 10px; background: #eee; border-radius: 5px; overflow: hidden; width: 300px; display: inline-block; }
.bar div { height: 100%; background: #4a8; width: 0; }
.row { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin: .4rem 0; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0; }
td, th { border: 1px solid #ccc; padding: .2rem .5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.warning { background: #fff3d6; border: 1px solid #e0b040; padding: .4rem; border-radius: 4px; }
</style></head>
<body>
<header><h1>preftune board</h1>
<nav>
  <button id="tab-new" data-tab="new" data-i18n="tab.new">New run</button>
  <button id="tab-watch" data-tab="watch" data-i18n="tab.watch">Watch</button>
  <button id="tab-compare" data-tab="compare" data-i18n="tab.compare">Compare</button>
  <button id="tab-evaluate" data-tab="evaluate" data-i18n="tab.evaluate">Evaluate</button>
  <button id="tab-data" data-tab="data" data-i18n="tab.data">Data</button>
</nav>
<span style="flex:1"></span><button id="lang" data-i18n="lang.switch">中文</button>
</header>

<section id="new">
  <div class="row"><label><b data-i18n="new.name">Run name</b> <input id="run-name" type="text" maxlength="64"></label>
  <span class="error" id="err-name"></span></div>
  <div class="form" id="run-form"></div>
  <p class="error" id="err-_general"></p>
  <div class="row">
    <button id="btn-validate" data-i18n="new.check">Check</button>
    <button id="btn-start" data-i18n="new.start">Start training</button>
    <span id="start-message"></span>
  </div>
  <h3 data-i18n="new.yaml">Config (YAML)</h3>
  <pre id="yaml"></pre>
  <div class="row"><span data-i18n="new.command">Equivalent command:</span> <code id="command"></code>
  <a id="download-yaml" href="#" download="config.yaml" data-i18n="new.download">Download YAML</a></div>
</section>

<section id="watch">
  <div class="row"><label><span data-i18n="watch.run">Run</span> <select id="watch-run"></select></label>
    <b id="run-state"></b>
    <span class="bar"><div id="progress-bar"></div></span> <span id="progress"></span> <span id="eta"></span>
    <button id="btn-stop" data-i18n="watch.stop">Stop (save a checkpoint)</button>
    <button id="btn-resume" data-i18n="watch.resume">Resume</button>
    <a id="run-yaml" href="#" data-i18n="watch.yaml">config.yaml</a>
  </div>
  <p id="displacement" class="warning" hidden></p>
  <div class="charts" id="charts"></div>
  <h3 data-i18n="watch.log">Log</h3><pre id="log"></pre>
  <h3 data-i18n="watch.report">Report (preftune report)</h3>
  <button id="btn-report" data-i18n="watch.load_report">Show the report</button><pre id="report"></pre>
</section>

<section id="compare">
  <div class="row"><span data-i18n="compare.runs">Runs</span> <span id="compare-runs"></span></div>
  <div class="row"><label><span data-i18n="compare.metric">Metric</span> <select id="compare-metric"></select></label>
    <button id="btn-compare" data-i18n="compare.go">Compare</button></div>
  <div class="panel" id="compare-chart"></div>
  <h3 data-i18n="compare.final">Final metrics</h3><table id="compare-table"></table>
  <h3 data-i18n="compare.settings">Settings that differ</h3><table id="compare-settings"></table>
</section>

<section id="evaluate">
  <div class="row"><label><span data-i18n="watch.run">Run</span> <select id="eval-run"></select></label>
    <label><span data-i18n="eval.judge">Judge (optional)</span> <input id="eval-judge" type="text" size="36"></label>
    <label><span data-i18n="eval.data">Held-out pairs (optional)</span> <input id="eval-data" type="text" size="36"></label>
    <label><span data-i18n="eval.limit">Prompts (limit)</span> <input id="eval-limit" type="number" min="1" style="width:5em"></label>
    <button id="btn-eval" data-i18n="eval.go">Evaluate (preftune eval)</button> <b id="eval-state"></b></div>
  <span class="error" id="err-limit"></span>
  <table id="eval-table"></table>
  <pre id="eval-log"></pre>
  <div class="row"><span data-i18n="compare.runs">Runs</span> <span id="eval-runs"></span>
    <button id="btn-eval-points" data-i18n="eval.plot">Plot reward / KL</button></div>
  <div class="panel" id="eval-chart"></div>
</section>

<section id="data">
  <div class="row"><label><span data-i18n="data.target">Data file, dataset name or config YAML</span>
    <input id="data-target" type="text" size="60"></label>
    <button id="btn-data-check" data-i18n="data.check">Check data</button></div>
  <span class="error" id="err-target"></span>
  <pre id="data-report"></pre>
  <div class="row"><label><span data-i18n="data.store">Labeling store (SQLite)</span>
    <input id="label-db" type="text" size="60"></label>
    <button id="btn-label-open" data-i18n="data.open_labeling">Open the labeling pages</button>
    <a id="label-link" target="_blank" rel="noopener"></a></div>
  <span class="error" id="err-db"></span>
  <h3 data-i18n="sample.title">Sample responses into a labeling store (preftune sample --store)</h3>
  <div class="row"><label><span data-i18n="sample.model">Model folder</span> <input id="sample-model" type="text" size="40"></label>
    <span class="error" id="err-sample_model"></span>
    <label><span data-i18n="sample.prompts">Prompts (JSONL)</span> <input id="sample-prompts" type="text" size="40"></label>
    <span class="error" id="err-sample_prompts"></span></div>
  <div class="row"><label><span data-i18n="sample.store">Labeling store (created if missing)</span>
    <input id="sample-store" type="text" size="40"></label> <span class="error" id="err-sample_store"></span>
    <label><span data-i18n="sample.num_samples">Responses per prompt</span>
    <input id="sample-num_samples" type="number" min="2" value="2" style="width:4em"></label>
    <span class="error" id="err-sample_num_samples"></span>
    <label><span data-i18n="sample.max_new_tokens">Max new tokens</span>
    <input id="sample-max_new_tokens" type="number" min="1" value="64" style="width:5em"></label>
    <span class="error" id="err-sample_max_new_tokens"></span>
    <label><span data-i18n="eval.limit">Prompts (limit)</span> <input id="sample-limit" type="number" min="1" style="width:5em"></label>
    <span class="error" id="err-sample_limit"></span>
    <button id="btn-sample" data-i18n="sample.go">Sample</button> <b id="sample-state"></b></div>
  <pre id="sample-log"></pre>
</section>
<script src="/static/board.js"></script>
</body></html>"""
