// preftune board: fills the page from the JSON API, polls a training run's files, draws curves as SVG.
// Labels in English and Chinese (LABELS); the choice is kept in localStorage. No external files.
"use strict";

const LABELS = {
  en: {
    "lang.switch": "中文", "tab.new": "New run", "tab.watch": "Watch", "tab.compare": "Compare", "tab.data": "Data",
    "new.name": "Run name", "new.check": "Check", "new.start": "Start training", "new.yaml": "Config (YAML)",
    "new.command": "Equivalent command:", "new.download": "Download YAML", "new.ok": "The settings are valid.",
    "new.started": "Started.", "new.problems": "The settings have problems (see each field).",
    "watch.run": "Run", "watch.stop": "Stop (save a checkpoint)", "watch.resume": "Resume", "watch.yaml": "config.yaml",
    "watch.log": "Log", "watch.report": "Report (preftune report)", "watch.load_report": "Show the report",
    "watch.eta": "ETA", "watch.step": "step", "watch.displacement": "Likelihood displacement",
    "watch.spike": "grad-norm spike", "watch.eval": "eval",
    "state.running": "running", "state.stopping": "stopping (saving a checkpoint)", "state.stopped": "stopped",
    "state.finished": "finished", "state.failed": "failed", "state.created": "created",
    "compare.runs": "Runs", "compare.metric": "Metric", "compare.go": "Compare", "compare.final": "Final metrics",
    "compare.settings": "Settings that differ", "compare.run": "run", "compare.step": "step", "compare.key": "setting",
    "tab.evaluate": "Evaluate", "eval.judge": "Judge (optional)", "eval.data": "Held-out pairs (optional)",
    "eval.limit": "Prompts (limit)", "eval.go": "Evaluate (preftune eval)", "eval.plot": "Plot reward / KL",
    "eval.none": "not evaluated", "eval.running": "evaluating…", "eval.done": "evaluated", "eval.failed": "failed",
    "eval.metric": "metric", "eval.value": "value", "eval.chart": "Reward vs KL (one point per run)",
    "eval.kl": "KL(policy‖reference), nats", "eval.reward": "judge reward − reference's (or win rate)",
    "sample.title": "Sample responses into a labeling store (preftune sample --store)", "sample.model": "Model folder",
    "sample.prompts": "Prompts (JSONL)", "sample.store": "Labeling store (created if missing)",
    "sample.num_samples": "Responses per prompt", "sample.max_new_tokens": "Max new tokens", "sample.go": "Sample",
    "sample.none": "", "sample.running": "sampling…", "sample.done": "done: the pairs are in the store",
    "sample.failed": "failed (see the log)",
    "data.target": "Data file, dataset name or config YAML", "data.check": "Check data",
    "data.store": "Labeling store (SQLite)", "data.open_labeling": "Open the labeling pages",
    "panel.loss": "Loss", "panel.rewards": "Rewards (chosen / rejected / margins)", "panel.accuracies": "Accuracies",
    "panel.logps": "Log-probs (chosen / rejected)", "panel.grad_norm": "Gradient norm",
    "panel.learning_rate": "Learning rate",
    "field.model_name_or_path": "Model folder", "field.dataset": "Dataset (file or registered name)",
    "field.eval_dataset": "Eval dataset", "field.template": "Template", "field.loss_type": "Loss",
    "field.beta": "β (beta)", "field.learning_rate": "Learning rate", "field.finetuning_type": "LoRA",
    "field.lora_rank": "LoRA rank", "field.max_steps": "Max steps",
    "field.per_device_train_batch_size": "Batch size (per device)", "field.max_length": "Max length (tokens)",
    "field.logging_steps": "Log every N steps", "field.save_steps": "Checkpoint every N steps",
    "field.eval_strategy": "Evaluate", "field.eval_steps": "Evaluate every N steps",
  },
  zh: {
    "lang.switch": "English", "tab.new": "新建训练", "tab.watch": "监控", "tab.compare": "对比", "tab.data": "数据",
    "new.name": "运行名称", "new.check": "检查", "new.start": "开始训练", "new.yaml": "配置（YAML）",
    "new.command": "等价命令：", "new.download": "下载 YAML", "new.ok": "设置有效。", "new.started": "已开始。",
    "new.problems": "设置有问题（见各字段）。",
    "watch.run": "运行", "watch.stop": "停止（保存检查点）", "watch.resume": "继续训练", "watch.yaml": "config.yaml",
    "watch.log": "日志", "watch.report": "报告（preftune report）", "watch.load_report": "显示报告",
    "watch.eta": "预计剩余", "watch.step": "步", "watch.displacement": "似然位移（likelihood displacement）",
    "watch.spike": "梯度范数尖峰", "watch.eval": "评估",
    "state.running": "训练中", "state.stopping": "正在停止（保存检查点）", "state.stopped": "已停止",
    "state.finished": "已完成", "state.failed": "失败", "state.created": "已创建",
    "compare.runs": "运行", "compare.metric": "指标", "compare.go": "对比", "compare.final": "最终指标",
    "compare.settings": "不同的设置", "compare.run": "运行", "compare.step": "步", "compare.key": "设置项",
    "tab.evaluate": "评估", "eval.judge": "评判器（可选）", "eval.data": "留出偏好对（可选）",
    "eval.limit": "提示数（上限）", "eval.go": "评估（preftune eval）", "eval.plot": "绘制奖励 / KL",
    "eval.none": "未评估", "eval.running": "评估中…", "eval.done": "已评估", "eval.failed": "失败",
    "eval.metric": "指标", "eval.value": "数值", "eval.chart": "奖励与 KL（每个运行一个点）",
    "eval.kl": "KL（策略‖参考），nats", "eval.reward": "评判器奖励 − 参考模型的（或胜率）",
    "sample.title": "采样回答写入标注数据库（preftune sample --store）", "sample.model": "模型文件夹",
    "sample.prompts": "提示（JSONL）", "sample.store": "标注数据库（不存在则创建）",
    "sample.num_samples": "每个提示的回答数", "sample.max_new_tokens": "最多新 token 数", "sample.go": "采样",
    "sample.none": "", "sample.running": "采样中…", "sample.done": "完成：偏好对已写入数据库",
    "sample.failed": "失败（见日志）",
    "data.target": "数据文件、数据集名称或配置 YAML", "data.check": "检查数据",
    "data.store": "标注数据库（SQLite）", "data.open_labeling": "打开标注页面",
    "panel.loss": "损失", "panel.rewards": "奖励（chosen / rejected / margins）", "panel.accuracies": "准确率",
    "panel.logps": "对数概率（chosen / rejected）", "panel.grad_norm": "梯度范数", "panel.learning_rate": "学习率",
    "field.model_name_or_path": "模型文件夹", "field.dataset": "数据集（文件或已注册名称）",
    "field.eval_dataset": "评估数据集", "field.template": "模板", "field.loss_type": "损失函数",
    "field.beta": "β（beta）", "field.learning_rate": "学习率", "field.finetuning_type": "LoRA",
    "field.lora_rank": "LoRA 秩", "field.max_steps": "最大步数",
    "field.per_device_train_batch_size": "批大小（每设备）", "field.max_length": "最大长度（token）",
    "field.logging_steps": "每 N 步记录", "field.save_steps": "每 N 步保存检查点",
    "field.eval_strategy": "评估", "field.eval_steps": "每 N 步评估",
  },
};

let lang = localStorage.getItem("preftune-board-lang") === "zh" ? "zh" : "en";
const t = (key) => (LABELS[lang][key] ?? LABELS.en[key] ?? key);
const $ = (id) => document.getElementById(id);

function applyLanguage() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const element of document.querySelectorAll("[data-i18n]")) element.textContent = t(element.dataset.i18n);
  refreshWatch();
  if (lastEvalPoints) drawEvalPoints(lastEvalPoints);
  if (lastCompareChart) drawCompareChart(...lastCompareChart);
}

async function api(path, options = {}) {
  const init = { headers: { Accept: "application/json" }, credentials: "same-origin", ...options };
  if (options.body !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({ error: response.statusText }));
  return { ok: response.ok, status: response.status, data };
}

// ---------------------------------------------------------------------------------------------------- tabs
function showTab(name) {
  for (const section of document.querySelectorAll("section")) section.classList.toggle("active", section.id === name);
  for (const button of document.querySelectorAll("nav button")) button.classList.toggle("active", button.dataset.tab === name);
  location.hash = name;
  if (name === "watch" || name === "compare" || name === "evaluate") loadRuns();
  if (name === "data") showSample();
}

// ---------------------------------------------------------------------------------------------------- new run
let schema = [];

async function buildForm() {
  const { data } = await api("/api/schema");
  schema = data.fields;
  const form = $("run-form");
  form.textContent = "";
  for (const field of schema) {
    const box = document.createElement("div");
    box.className = "field";
    const label = document.createElement("label");
    label.htmlFor = "f-" + field.key;
    label.dataset.i18n = "field." + field.key;
    label.textContent = t("field." + field.key);
    let input;
    if (field.key === "finetuning_type") {  // LoRA on/off
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = field.default === "lora";
    } else if (field.kind === "select") {
      input = document.createElement("select");
      for (const choice of ["", ...field.choices]) {
        const option = document.createElement("option");
        option.value = choice;
        option.textContent = choice || "(default)";
        input.appendChild(option);
      }
      input.value = field.default ?? "";
    } else {
      input = document.createElement("input");
      input.type = "text";
      input.value = field.default ?? "";
    }
    input.id = "f-" + field.key;
    input.name = field.key;
    input.addEventListener("change", scheduleValidate);
    input.addEventListener("input", scheduleValidate);
    const error = document.createElement("span");
    error.className = "error";
    error.id = "err-" + field.key;
    const help = document.createElement("small");
    help.textContent = field.key + ": " + field.description;
    help.title = field.description;
    box.append(label, input, error, help);
    form.appendChild(box);
  }
  if (!$("run-name").value) $("run-name").value = "run-" + new Date().toISOString().slice(5, 19).replace(/[-:T]/g, "");
  validate();
}

// The form's values; a value equal to the config's default is left out (the YAML stays short), except core keys.
function formSettings() {
  const settings = {};
  const lora = $("f-finetuning_type").checked;
  for (const field of schema) {
    const input = $("f-" + field.key);
    const value = field.key === "finetuning_type" ? (lora ? "lora" : "full") : input.value.trim();
    if (value === "" || (field.key === "lora_rank" && !lora)) continue;
    if (!field.core && field.schema_default !== null && value === String(field.schema_default)) continue;
    settings[field.key] = value;
  }
  return settings;
}

function showErrors(errors) {
  for (const element of document.querySelectorAll("[id^=err-]")) element.textContent = "";
  for (const [key, message] of Object.entries(errors || {})) {
    const element = $("err-" + key) || $("err-_general");
    element.textContent = (element.textContent ? element.textContent + " " : "") + message;
  }
}

let validateTimer = null;
let validateTicket = 0;
function scheduleValidate() { clearTimeout(validateTimer); validateTimer = setTimeout(validate, 400); }

// Answers can come back out of order (the server has several threads): only the latest request's answer is shown.
async function validate() {
  const ticket = ++validateTicket;
  const { data } = await api("/api/validate", { body: { name: $("run-name").value, settings: formSettings() } });
  if (ticket !== validateTicket) return data;
  showErrors(data.errors || (data.error ? { _general: data.error } : {}));
  if (data.yaml !== undefined) {
    $("yaml").textContent = data.yaml;
    $("command").textContent = data.command;
    const link = $("download-yaml");
    URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(new Blob([data.yaml], { type: "application/x-yaml" }));
    link.download = ($("run-name").value || "config") + ".yaml";
  }
  setMessage(data.ok ? "new.ok" : "new.problems");
  return data;
}

function setMessage(key) {  // a label that follows the language switch
  $("start-message").dataset.i18n = key;
  $("start-message").textContent = t(key);
}

async function startRun() {
  const name = $("run-name").value;
  const { ok, data } = await api("/api/runs", { body: { name, settings: formSettings() } });
  if (!ok) {
    showErrors(Object.keys(data.errors || {}).length ? data.errors : { _general: data.error });
    delete $("start-message").dataset.i18n;
    $("start-message").textContent = data.error || "";
    return;
  }
  setMessage("new.started");
  watchRun(name, data);
  $("run-name").value = "";
  showTab("watch");
}

// ---------------------------------------------------------------------------------------------------- watch
let watched = null;
let runs = [];
let logOffset = 0;
let lastMetrics = null;
let lastStatus = null;

async function loadRuns() {
  const { data } = await api("/api/runs");
  runs = data.runs || [];
  const select = $("watch-run");
  const keep = watched || select.value;
  select.textContent = "";
  for (const run of runs) {
    const option = document.createElement("option");
    option.value = run.name;
    option.textContent = run.name;
    select.appendChild(option);
  }
  if (keep && runs.some((run) => run.name === keep)) select.value = keep;
  if (select.value !== watched) watchRun(select.value || null);
  buildCompareChoices();
  buildEvalChoices();
  pollWatched();
}

// Show run `name` from now on (its status when known): nothing of the previous run stays on screen.
function watchRun(name, status = null) {
  watched = name;
  lastStatus = status;
  lastMetrics = null;
  logOffset = 0;
  reportTicket++;
  for (const id of ["log", "report", "charts", "run-state", "progress", "eta"]) $(id).textContent = "";
  $("run-state").dataset.state = "";
  $("run-state").dataset.run = "";
  $("run-state").dataset.step = "";
  refreshWatch();
}

// One poll at a time (a poll asked for meanwhile runs after it): overlapping polls could answer out of order, show
// an older state after a newer one, and append the same stretch of log twice.
let polling = false;
let pollAgain = false;
async function pollWatched() {
  if (polling) { pollAgain = true; return; }
  polling = true;
  try {
    await pollOnce();
  } finally {
    polling = false;
  }
  if (pollAgain) { pollAgain = false; pollWatched(); }
}

let statusTicket = 0;  // bumped by stop and resume: a poll that began before them shows nothing

async function pollOnce() {
  if (!watched) return;
  const name = watched;
  const ticket = statusTicket;
  // the status first, then the files: the curves are never older than the state shown (a run seen "stopped" has
  // all its steps on the plot)
  const status = await api(`/api/runs/${encodeURIComponent(name)}`);
  const [metrics, log] = await Promise.all([
    api(`/api/runs/${encodeURIComponent(name)}/metrics`),
    api(`/api/runs/${encodeURIComponent(name)}/log?offset=${logOffset}`),
  ]);
  if (name !== watched || ticket !== statusTicket) return;
  if (status.ok) lastStatus = status.data;
  if (metrics.ok) lastMetrics = metrics.data;
  if (log.ok && log.data.text) {
    logOffset = log.data.offset;
    appendLog(log.data.text);
  }
  refreshWatch();
  if (lastStatus && lastStatus.finished && !$("report").textContent && !["running", "stopping"].includes(lastStatus.state)) loadReport();
}

// tqdm redraws its line with \r: keep the last version of each line
function lastDrawn(text) {
  return text.split("\n").map((line) => line.split("\r").filter((part) => part).pop() || "");
}

function appendLog(text) {
  const element = $("log");
  element.textContent = lastDrawn(element.textContent + text).slice(-400).join("\n");
  element.scrollTop = element.scrollHeight;
}

function refreshWatch() {
  const status = lastStatus;
  if (!status) return;
  $("run-state").textContent = t("state." + status.state);
  $("run-state").dataset.state = status.state;
  $("run-state").dataset.run = status.name;
  $("run-state").dataset.step = String(status.step);
  $("progress").textContent = status.max_steps ? `${t("watch.step")} ${status.step} / ${status.max_steps}` : `${t("watch.step")} ${status.step}`;
  $("progress-bar").style.width = `${Math.round(100 * (status.progress || 0))}%`;
  $("eta").textContent = status.eta_seconds != null ? `${t("watch.eta")} ${formatSeconds(status.eta_seconds)}` : "";
  $("btn-stop").disabled = status.state !== "running";
  $("btn-resume").disabled = ["running", "stopping"].includes(status.state) || !status.checkpoints.length;
  $("run-yaml").href = `/api/runs/${encodeURIComponent(status.name)}/config.yaml`;
  if (lastMetrics) drawWatchCharts(lastMetrics);
}

function formatSeconds(seconds) {
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m${s % 60}s` : `${s}s`;
}

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
const PANELS = [
  { id: "loss", keys: ["loss"], evals: ["eval_loss"] },
  { id: "rewards", keys: ["rewards/chosen", "rewards/rejected", "rewards/margins"], evals: ["eval_rewards/margins"] },
  { id: "accuracies", keys: ["rewards/accuracies"], evals: ["eval_rewards/accuracies"] },
  { id: "logps", keys: ["logps/chosen", "logps/rejected"], evals: ["eval_logps/chosen", "eval_logps/rejected"], displacement: true },
  { id: "grad_norm", keys: ["grad_norm"], spikes: true },
  { id: "learning_rate", keys: ["learning_rate"] },
];

function series(records, key) {
  return records.filter((r) => typeof r[key] === "number" && Number.isFinite(r[key])).map((r) => [r.step, r[key]]);
}

function drawWatchCharts(metrics) {
  const container = $("charts");
  const finding = metrics.displacement;
  const banner = $("displacement");
  banner.hidden = !finding;
  if (finding) banner.textContent = lang === "zh" ? `⚠ ${t("watch.displacement")}：${finding.message}` : `⚠ ${finding.message}`;
  for (const panel of PANELS) {
    let box = $("panel-" + panel.id);
    if (!box) {
      box = document.createElement("div");
      box.className = "panel";
      box.id = "panel-" + panel.id;
      container.appendChild(box);
    }
    const lines = panel.keys.map((key, i) => ({ name: key, color: COLORS[i], points: series(metrics.train, key) }));
    const dots = (panel.evals || []).map((key, i) => ({ name: key, color: COLORS[i + 3], points: series(metrics.eval, key), dots: true }));
    const spans = panel.displacement && finding ? [{ from: finding.start_step, to: finding.end_step, label: t("watch.displacement") }] : [];
    const marks = panel.spikes ? metrics.grad_norm_spikes.map((s) => [s.step, s.grad_norm]) : [];
    box.dataset.points = String(lines[0].points.length);
    box.dataset.displacement = spans.length ? "1" : "0";
    drawChart(box, t("panel." + panel.id), [...lines, ...dots.filter((d) => d.points.length)], spans, marks);
  }
}

const SVG = "http://www.w3.org/2000/svg";
function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function formatNumber(value) {
  const a = Math.abs(value);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? value.toExponential(2) : String(Number(value.toPrecision(4)));
}

// lines: [{name, color, points: [[x, y]], dots, named (each dot labelled with the name)}], spans: [{from, to, label}] shaded, marks: [[x, y]] red circles
function drawChart(box, title, lines, spans = [], marks = [], wide = false, xLabel = t("watch.step")) {
  const W = wide ? 900 : 420, H = wide ? 300 : 210, L = 56, R = 10, T = 8, B = 34;
  box.textContent = "";
  const heading = document.createElement("h3");
  heading.textContent = title;
  box.appendChild(heading);
  const svg = svgElement("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img" });
  const all = lines.flatMap((line) => line.points).concat(marks);
  if (!all.length) { box.appendChild(svg); return; }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  for (const span of spans) { x0 = Math.min(x0, span.from); x1 = Math.max(x1, span.to); }
  if (x1 === x0) { x0 -= Math.abs(x0) * 0.1 || 1; x1 += Math.abs(x1) * 0.1 || 1; }  // one point: in the middle
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  if (lines.every((line) => line.dots)) {  // points only: a margin so none sits on the frame
    [x0, x1] = [x0 - 0.08 * (x1 - x0), x1 + 0.08 * (x1 - x0)];
    [y0, y1] = [y0 - 0.08 * (y1 - y0), y1 + 0.08 * (y1 - y0)];
  }
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.appendChild(svgElement("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#bbb" }));
  for (const span of spans) {
    const g = svgElement("g", { class: "displacement-marker" });
    g.appendChild(svgElement("rect", { x: X(span.from), y: T, width: Math.max(2, X(span.to) - X(span.from)), height: H - T - B, fill: "#f5a623", opacity: 0.25 }));
    g.appendChild(svgElement("text", { x: X(span.from) + 3, y: T + 12 }, "⚠ " + span.label));
    g.appendChild(svgElement("title", {}, span.label));
    svg.appendChild(g);
  }
  for (const [value, y] of [[y1, T + 4], [y0, H - B]]) svg.appendChild(svgElement("text", { x: L - 4, y: y + 3, "text-anchor": "end" }, formatNumber(value)));
  for (const [value, anchor] of [[x0, "start"], [x1, "end"]]) svg.appendChild(svgElement("text", { x: X(value), y: H - B + 12, "text-anchor": anchor }, formatNumber(value)));
  svg.appendChild(svgElement("text", { x: (L + W - R) / 2, y: H - B + 12, "text-anchor": "middle" }, xLabel));
  lines.forEach((line) => {
    if (!line.points.length) return;
    if (line.dots || line.points.length === 1) {
      for (const [x, y] of line.points) {
        const dot = svgElement("circle", { cx: X(x), cy: Y(y), r: line.named ? 5 : 3, fill: line.color, class: line.dots ? "eval-point" : "point" });
        dot.appendChild(svgElement("title", {}, `${line.name}: (${formatNumber(x)}, ${formatNumber(y)})`));
        svg.appendChild(dot);
        if (line.named) svg.appendChild(svgElement("text", { x: X(x) + 6, y: Y(y) - 6 }, line.name));
      }
    } else {
      svg.appendChild(svgElement("polyline", { points: line.points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" "), fill: "none", stroke: line.color, "stroke-width": 1.5, class: "curve" }));
    }
  });
  for (const [x, y] of marks) {
    const circle = svgElement("circle", { cx: X(x), cy: Y(y), r: 5, fill: "none", stroke: "#d00", "stroke-width": 2, class: "spike-marker" });
    circle.appendChild(svgElement("title", {}, `${t("watch.spike")} (${t("watch.step")} ${x})`));
    svg.appendChild(circle);
  }
  let legendX = L;
  for (const line of lines) {
    svg.appendChild(svgElement("rect", { x: legendX, y: H - 12, width: 10, height: 4, fill: line.color }));
    const label = svgElement("text", { x: legendX + 13, y: H - 8 }, line.name);
    svg.appendChild(label);
    legendX += 18 + 5.6 * line.name.length;
  }
  box.appendChild(svg);
}

async function stopRun() {
  if (!watched) return;
  const { data } = await api(`/api/runs/${encodeURIComponent(watched)}/stop`, { body: {} });
  statusTicket++;
  if (data.state) { lastStatus = data; refreshWatch(); }
}

async function resumeRun() {
  if (!watched) return;
  const { ok, data } = await api(`/api/runs/${encodeURIComponent(watched)}/resume`, { body: {} });
  statusTicket++;
  if (ok) { lastStatus = data; reportTicket++; $("report").textContent = ""; refreshWatch(); } else alert(data.error);
}

let reportTicket = 0;  // bumped when the report shown goes out of date (another run, a resume): drops answers in flight

async function loadReport() {
  if (!watched) return;
  const ticket = reportTicket;
  const { data } = await api(`/api/runs/${encodeURIComponent(watched)}/report`);
  if (ticket === reportTicket) $("report").textContent = data.text || data.error || "";
}

// ---------------------------------------------------------------------------------------------------- compare
const COMPARE_METRICS = ["loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
  "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"];

// One checkbox per run in ``box`` (class ``className``), rebuilt only when the runs changed, keeping the ticks.
// Returns whether it rebuilt them.
function syncRunCheckboxes(box, className) {
  const shown = [...box.querySelectorAll("input")].map((input) => input.value);
  if (shown.join("\n") === runs.map((run) => run.name).join("\n")) return false;
  const checked = new Set([...box.querySelectorAll("input:checked")].map((input) => input.value));
  box.textContent = "";
  for (const run of runs) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = run.name;
    input.className = className;
    input.checked = checked.has(run.name);
    label.append(input, " " + run.name + " ");
    box.appendChild(label);
  }
  return true;
}

function buildCompareChoices() {
  if (!syncRunCheckboxes($("compare-runs"), "compare-run")) return;
  const select = $("compare-metric");
  if (!select.options.length) {
    for (const key of COMPARE_METRICS) {
      const option = document.createElement("option");
      option.value = option.textContent = key;
      select.appendChild(option);
    }
  }
}

let compareTicket = 0;
let lastCompareChart = null;  // [metric, lines] of the drawn comparison, redrawn when the language changes

function drawCompareChart(metric, lines) {
  drawChart($("compare-chart"), metric, lines, [], [], true);
}

async function compare() {
  const names = [...document.querySelectorAll(".compare-run:checked")].map((input) => input.value);
  if (!names.length) return;
  const ticket = ++compareTicket;
  const metric = $("compare-metric").value;
  delete $("compare-chart").dataset.runs;
  const [metrics, differences] = await Promise.all([
    Promise.all(names.map((name) => api(`/api/runs/${encodeURIComponent(name)}/metrics`))),
    api(`/api/compare?runs=${names.map(encodeURIComponent).join(",")}`),
  ]);
  if (ticket !== compareTicket) return;  // a later click is drawing
  const lines = names.map((name, i) => {
    const data = metrics[i].data;
    const records = metric.startsWith("eval_") ? data.eval || [] : data.train || [];
    return { name, color: COLORS[i % COLORS.length], points: series(records, metric), dots: metric.startsWith("eval_") };
  });
  lastCompareChart = [metric, lines];
  drawCompareChart(metric, lines);
  const data = differences.data;
  const keys = ["loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"];
  const evalKeys = ["eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"];
  const table = $("compare-table");
  table.textContent = "";
  const header = addRow(table, [t("compare.run"), t("compare.step"), ...keys, ...evalKeys], true);
  setLabel(header.cells[0], "compare.run");
  setLabel(header.cells[1], "compare.step");
  for (const run of data.runs) {
    addRow(table, [run.name, run.step, ...keys.map((k) => run.train[k]), ...evalKeys.map((k) => run.eval[k])]);
  }
  const settings = $("compare-settings");
  settings.textContent = "";
  setLabel(addRow(settings, [t("compare.key"), ...names], true).cells[0], "compare.key");
  for (const [key, values] of Object.entries(data.differing_settings)) addRow(settings, [key, ...names.map((n) => values[n])]);
  // set last: tests (and users' scripts) wait on it to know the chart and both tables are drawn
  $("compare-chart").dataset.runs = String(lines.filter((line) => line.points.length).length);
}

function addRow(table, cells, header = false) {
  const row = document.createElement("tr");
  for (const cell of cells) {
    const element = document.createElement(header ? "th" : "td");
    element.textContent = typeof cell === "number" ? formatNumber(cell) : cell == null ? "" : typeof cell === "object" ? JSON.stringify(cell) : String(cell);
    row.appendChild(element);
  }
  table.appendChild(row);
  return row;
}

function setLabel(element, key) {  // a label that follows the language switch
  element.dataset.i18n = key;
  element.textContent = t(key);
}

// ---------------------------------------------------------------------------------------------------- evaluate
let evalTimer = null;
let evalTicket = 0;
let lastEvalPoints = null;  // the reward/KL plot's points, redrawn when the language changes
let evalPointsTicket = 0;

function buildEvalChoices() {
  const select = $("eval-run");
  const keep = select.value;
  if ([...select.options].map((o) => o.value).join("\n") !== runs.map((run) => run.name).join("\n")) {
    select.textContent = "";
    for (const run of runs) {
      const option = document.createElement("option");
      option.value = option.textContent = run.name;
      select.appendChild(option);
    }
    if (keep && runs.some((run) => run.name === keep)) select.value = keep;
  }
  syncRunCheckboxes($("eval-runs"), "eval-point-run");
  showEvaluation();
}

async function startEvaluation() {
  const name = $("eval-run").value;
  if (!name) return;
  const body = { judge: $("eval-judge").value, data: $("eval-data").value, limit: $("eval-limit").value };
  const { ok, data } = await api(`/api/runs/${encodeURIComponent(name)}/eval`, { body });
  showErrors(ok ? {} : (Object.keys(data.errors || {}).length ? data.errors : { limit: data.error }));
  showEvaluation();
}

// The chosen run's evaluation: state, results as a table, log; polled while `preftune eval` runs.
// Only the latest call's answer is shown, and only it polls on. data-state is set last: the table and log are drawn.
async function showEvaluation() {
  clearTimeout(evalTimer);
  const ticket = ++evalTicket;
  const name = $("eval-run").value;
  if (!name) return;
  const { ok, data } = await api(`/api/runs/${encodeURIComponent(name)}/eval`);
  if (!ok || ticket !== evalTicket || $("eval-run").value !== name) return;
  setLabel($("eval-state"), `eval.${data.state}`);
  $("eval-log").textContent = lastDrawn(data.log).join("\n");
  const table = $("eval-table");
  table.textContent = "";
  const results = data.results || {};
  const rows = [];
  for (const [key, value] of Object.entries(results.pairs || {})) rows.push([key, value]);
  const generation = results.generation || {};
  const reward = generation.reward || {};
  for (const side of ["policy", "reference", "difference"]) if (reward[side]) rows.push([`reward/${side}`, reward[side].mean]);
  if (generation.win_rate) rows.push(["win_rate", generation.win_rate.rate], ["win_rate 95%", `[${formatNumber(generation.win_rate.lower)}, ${formatNumber(generation.win_rate.upper)}]`]);
  if (generation.kl) rows.push(["kl", generation.kl.mean]);
  if (rows.length) {
    const header = addRow(table, [t("eval.metric"), t("eval.value")], true);
    setLabel(header.cells[0], "eval.metric");
    setLabel(header.cells[1], "eval.value");
    for (const row of rows) addRow(table, row);
  }
  $("eval-state").dataset.run = name;
  $("eval-state").dataset.state = data.state;
  if (data.state === "running") evalTimer = setTimeout(showEvaluation, 1000);
}

// One point per chosen run: KL on x; the judge's reward difference on y (its win rate for a pairwise judge).
async function plotEvalPoints() {
  const names = [...document.querySelectorAll(".eval-point-run:checked")].map((input) => input.value);
  if (!names.length) return;
  const ticket = ++evalPointsTicket;
  delete $("eval-chart").dataset.points;
  const { data } = await api(`/api/evals?runs=${names.map(encodeURIComponent).join(",")}`);
  if (ticket !== evalPointsTicket) return;
  lastEvalPoints = data.points;
  drawEvalPoints(data.points);
}

function drawEvalPoints(points) {
  const lines = points.map((point, i) => {
    const y = point.reward_difference ?? point.win_rate;
    return { name: point.name, color: COLORS[i % COLORS.length], dots: true, named: true,
             points: point.kl != null && y != null ? [[point.kl, y]] : [] };
  });
  const box = $("eval-chart");
  drawChart(box, `${t("eval.chart")}: y ${t("eval.reward")}`, lines, [], [], true, t("eval.kl"));
  box.dataset.points = String(lines.filter((line) => line.points.length).length);  // last: the chart is drawn
}

// ---------------------------------------------------------------------------------------------------- data
let checkTicket = 0;

async function checkData() {
  const ticket = ++checkTicket;
  const { ok, data } = await api("/api/data/check", { body: { target: $("data-target").value } });
  if (ticket !== checkTicket) return;
  showErrors(ok ? {} : (Object.keys(data.errors || {}).length ? data.errors : { target: data.error }));
  $("data-report").textContent = ok ? data.text : "";
}

async function openLabeling() {
  const { ok, data } = await api("/api/label/open", { body: { db: $("label-db").value } });
  showErrors(ok ? {} : (Object.keys(data.errors || {}).length ? data.errors : { db: data.error }));
  $("label-link").textContent = ok ? data.url : "";
  $("label-link").href = ok ? data.url : "#";
}

let sampleTimer = null;
let sampleTicket = 0;

async function startSample() {
  const body = { model: $("sample-model").value, prompts: $("sample-prompts").value, store: $("sample-store").value,
                 num_samples: $("sample-num_samples").value, max_new_tokens: $("sample-max_new_tokens").value,
                 limit: $("sample-limit").value };
  const { ok, data } = await api("/api/sample", { body });
  showErrors(ok ? {} : (Object.keys(data.errors || {}).length ? data.errors : { sample_store: data.error }));
  showSample();
}

// `preftune sample`'s state and log; polled while it runs. The store then opens with "Open the labeling pages".
async function showSample() {
  clearTimeout(sampleTimer);
  const ticket = ++sampleTicket;
  const { data } = await api("/api/sample");
  if (ticket !== sampleTicket) return;
  setLabel($("sample-state"), `sample.${data.state}`);
  $("sample-log").textContent = lastDrawn(data.log).join("\n");
  if (data.state === "done" && data.store && !$("label-db").value) $("label-db").value = data.store;
  $("sample-state").dataset.state = data.state;  // last: the log and the store field are filled
  if (data.state === "running") sampleTimer = setTimeout(showSample, 1000);
}

// ---------------------------------------------------------------------------------------------------- wiring
for (const button of document.querySelectorAll("nav button")) button.addEventListener("click", () => showTab(button.dataset.tab));
$("lang").addEventListener("click", () => { lang = lang === "en" ? "zh" : "en"; localStorage.setItem("preftune-board-lang", lang); applyLanguage(); });
$("btn-validate").addEventListener("click", validate);
$("btn-start").addEventListener("click", startRun);
$("run-name").addEventListener("input", scheduleValidate);
$("watch-run").addEventListener("change", () => { watchRun($("watch-run").value); pollWatched(); });
$("btn-stop").addEventListener("click", stopRun);
$("btn-resume").addEventListener("click", resumeRun);
$("btn-report").addEventListener("click", loadReport);
$("btn-compare").addEventListener("click", compare);
$("btn-eval").addEventListener("click", startEvaluation);
$("eval-run").addEventListener("change", showEvaluation);
$("btn-eval-points").addEventListener("click", plotEvalPoints);
$("btn-data-check").addEventListener("click", checkData);
$("btn-label-open").addEventListener("click", openLabeling);
$("btn-sample").addEventListener("click", startSample);

setInterval(() => { if ($("watch").classList.contains("active")) pollWatched(); }, 1000);
applyLanguage();
buildForm();
showTab(["new", "watch", "compare", "evaluate", "data"].includes(location.hash.slice(1)) ? location.hash.slice(1) : "new");
