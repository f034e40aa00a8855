"""The HTML of the labeling app: Jinja templates (autoescaped by Flask's render_template_string), inline CSS and
a little JavaScript for keyboard shortcuts. No build step, no external files."""

LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>preftune label</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 1rem 2rem; }
header { display: flex; gap: 1rem; align-items: baseline; border-bottom: 1px solid #ccc; padding: .6rem 0; }
pre { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, monospace; margin: .3rem 0; }
.prompt { background: #f4f4f4; padding: .5rem 1rem; margin: 1rem 0; border-radius: 6px; }
.turn b { text-transform: uppercase; font-size: .75rem; color: #555; }
.responses { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.response { border: 1px solid #bbb; border-radius: 6px; padding: .5rem 1rem; }
.response h2 { font-size: 1rem; margin: .2rem 0; }
.buttons { display: flex; flex-wrap: wrap; gap: .5rem; margin: 1rem 0; }
button { font-size: 1rem; padding: .5rem 1rem; cursor: pointer; }
textarea { width: 100%; box-sizing: border-box; margin-top: 1rem; }
.error { color: #a00; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .3rem; font-size: .85rem; }
</style></head>
<body>{% block body %}{% endblock %}</body></html>"""

UNDO_FORM = """<form id="undo" method="post" action="/undo">
  <input type="hidden" name="annotator" value="{{ annotator }}">
  <button id="btn-undo">Undo my last judgment <kbd>u</kbd></button>
</form>"""

# Keys: 1/a left, 2/b right, t tie, x both bad, s skip, u undo. Ignored while typing a note; each form submits once.
SCRIPT = """<script>
const shortcuts = {"1": "btn-left", "a": "btn-left", "2": "btn-right", "b": "btn-right", "t": "btn-tie",
                   "x": "btn-both_bad", "s": "btn-skip", "u": "btn-undo"};
document.addEventListener("keydown", (event) => {
  const typing = ["TEXTAREA", "INPUT"].includes(event.target.tagName);
  if (typing && event.key === "Escape") { event.target.blur(); return; }
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  const button = document.getElementById(shortcuts[event.key.toLowerCase()]);
  if (button) { event.preventDefault(); button.click(); }
});
for (const form of document.querySelectorAll("form")) {
  form.addEventListener("submit", (event) => {
    if (document.body.dataset.sent) { event.preventDefault(); return; }
    document.body.dataset.sent = "1";
  });
}
</script>"""

INDEX = """{% extends layout %}{% block body %}
<header><h1>preftune label</h1></header>
<p>{{ total }} pairs to judge{% if annotators %}; annotators so far:
{% for name, done in annotators.items() %}{{ name }} ({{ done }}){% if not loop.last %}, {% endif %}{% endfor %}{% endif %}.</p>
<form method="post" action="/annotator">
  <label>Your name <input name="annotator" id="annotator" required maxlength="{{ max_name }}" value="{{ current or '' }}"
  autofocus></label>
  <button id="start">Start labeling</button>
</form>
{% endblock %}"""

LABEL = """{% extends layout %}{% block body %}
<header><b>preftune label</b><span>annotator <b id="who">{{ annotator }}</b></span>
<span id="progress">{{ done }} / {{ total }} done</span><a href="/">change name</a></header>
<div class="prompt" id="prompt">
{% if pair.prompt is string %}<pre>{{ pair.prompt }}</pre>
{% else %}{% for message in pair.prompt %}<div class="turn"><b>{{ message.role }}</b><pre>{{ message.content }}</pre></div>
{% endfor %}{% endif %}</div>
<form id="judge" method="post" action="/judge">
  <input type="hidden" name="pair_id" value="{{ pair.pair_id }}">
  <input type="hidden" name="annotator" value="{{ annotator }}">
  <div class="responses">
    <div class="response" id="left"><h2>A</h2><pre>{{ pair.left_text }}</pre></div>
    <div class="response" id="right"><h2>B</h2><pre>{{ pair.right_text }}</pre></div>
  </div>
  <textarea name="note" id="note" rows="2" maxlength="{{ max_note }}"
   placeholder="optional note (Esc leaves the note, then the keys work again)"></textarea>
  <div class="buttons">
    <button name="choice" value="left" id="btn-left">A is better <kbd>1</kbd>/<kbd>a</kbd></button>
    <button name="choice" value="right" id="btn-right">B is better <kbd>2</kbd>/<kbd>b</kbd></button>
    <button name="choice" value="tie" id="btn-tie">Tie <kbd>t</kbd></button>
    <button name="choice" value="both_bad" id="btn-both_bad">Both bad <kbd>x</kbd></button>
    <button name="choice" value="skip" id="btn-skip">Skip <kbd>s</kbd></button>
  </div>
</form>
""" + UNDO_FORM + SCRIPT + "{% endblock %}"

DONE = """{% extends layout %}{% block body %}
<header><b>preftune label</b><span>annotator <b id="who">{{ annotator }}</b></span>
<span id="progress">{{ done }} / {{ total }} done</span><a href="/">change name</a></header>
<p id="done">All {{ total }} pairs are judged. Thank you!</p>
""" + UNDO_FORM + SCRIPT + "{% endblock %}"


ERROR = """{% extends layout %}{% block body %}
<header><b>preftune label</b></header>
<p class="error" id="error">{{ status }}: {{ message }}</p><p><a href="/label">back to labeling</a></p>
{% endblock %}"""
