// difftune web UI: config and dataset forms built from /api/schema, dataset browser, job controls,
// live progress over server-sent events, loss plot (SVG) and validation gallery. No build step.
"use strict";

// Off loopback the server's login form has set an HttpOnly cookie: the browser sends it with every
// request of this page, so no token appears in the page, its script or any URL.
const $ = (id) => document.getElementById(id);
let schema = null;
let loadedConfig = {};
let datasets = [];
let totalSteps = null;
const lossPoints = new Map();

// -- helpers -----------------------------------------------------------------------------------
async function api(method, url, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  return { ok: response.ok, status: response.status, data };
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showErrors(listId, payload) {
  const list = $(listId);
  list.replaceChildren();
  document.querySelectorAll(".field.invalid").forEach((f) => f.classList.remove("invalid"));
  let details = payload && payload.detail;
  if (!details) return;
  if (!Array.isArray(details)) details = [{ key: "", message: String(details) }];
  for (const error of details) {
    const where = payload.file ? payload.file + (error.key ? ": " + error.key : "") : error.key;
    list.append(el("li", {}, (where ? where + ": " : "") + error.message));
    const field = document.querySelector(`[data-key="${CSS.escape(error.key || "")}"]`);
    if (field) field.closest(".field").classList.add("invalid");
  }
}

// The loader's warnings (what `difftune train` would start with), each naming its file; text only.
function showWarnings(listId, warnings) {
  $(listId).replaceChildren(...(warnings || []).map((text) => el("li", {}, "warning: " + text)));
}

function normalizeKeys(raw) {
  const out = {};
  for (const [key, value] of Object.entries(raw || {})) {
    const name = key.replace(/^-+/, "");
    out[(schema.aliases && schema.aliases[name]) || name] = value;
  }
  return out;
}

// -- generic form fields -------------------------------------------------------------------------
function fieldInput(desc, value, key) {
  let input;
  if (desc.type === "choice") {
    input = el("select");
    input.append(el("option", { value: "" }, desc.default == null ? "(none)" : `(default: ${desc.default})`));
    for (const choice of desc.choices || []) input.append(el("option", { value: String(choice) }, String(choice)));
    input.value = value == null ? "" : String(value);
  } else if (desc.type === "boolean") {
    input = el("select");
    input.append(el("option", { value: "" }, `(default: ${desc.default})`),
      el("option", { value: "true" }, "true"), el("option", { value: "false" }, "false"));
    input.value = value == null ? "" : String(value === true || value === "true");
  } else if (desc.type === "json" || desc.type === "object") {
    input = el("textarea", { rows: "2" });
    input.value = value == null ? "" : (typeof value === "string" ? value : JSON.stringify(value));
  } else {
    input = el("input", { type: desc.type === "string" ? "text" : "number" });
    if (desc.type !== "string") input.step = desc.type === "integer" ? "1" : "any";
    if (desc.default != null) input.placeholder = String(desc.default);
    input.value = value == null ? "" : String(value);
  }
  input.dataset.key = key;
  input.name = key;
  const help = el("span", { class: "help" }, desc.description || "");
  return el("label", { class: "field" }, el("span", { class: "name" }, desc.name + (desc.required ? " *" : "")),
    input, help, el("span", { class: "allowed" }, allowedText(desc)));
}

// "default 4 · ≥ 1" / "default sdpa · one of diffusers, sdpa, ..." from the schema's field.
function allowedText(desc) {
  const parts = [];
  const show = (v) => (typeof v === "string" ? v : JSON.stringify(v));
  if (desc.required) parts.push("required");
  else if (desc.default != null && desc.default !== "") parts.push("default " + show(desc.default));
  else parts.push("default: none");
  if (desc.choices && desc.choices.length) parts.push("one of " + desc.choices.map(show).join(", "));
  const bounds = [];
  if (desc.ge != null) bounds.push("≥ " + desc.ge);
  if (desc.gt != null) bounds.push("> " + desc.gt);
  if (desc.le != null) bounds.push("≤ " + desc.le);
  if (desc.lt != null) bounds.push("< " + desc.lt);
  if (bounds.length) parts.push(bounds.join(" and "));
  if (desc.type === "boolean") parts.push("true or false");
  return parts.join(" · ");
}

// The value an input holds: {set: false} when empty (the key is left out, so the default applies).
function readInput(desc, input) {
  const raw = input.value.trim();
  if (raw === "") return { set: false };
  if (desc.type === "boolean") return { set: true, value: raw === "true" };
  if (desc.type === "integer") return { set: true, value: Number.isInteger(Number(raw)) ? Number(raw) : raw };
  if (desc.type === "number") return { set: true, value: Number.isFinite(Number(raw)) ? Number(raw) : raw };
  if (desc.type === "json" || desc.type === "object") {
    try { return { set: true, value: JSON.parse(raw) }; } catch (e) { return { set: true, value: raw }; }
  }
  if (desc.type === "choice") {
    const numeric = (desc.choices || []).find((c) => String(c) === raw);
    return { set: true, value: numeric === undefined ? raw : numeric };
  }
  return { set: true, value: raw };
}

// -- config form -------------------------------------------------------------------------------------
const CONFIG_GROUPS = ["model", "data", "training", "memory", "validation"];

function updateFlavours() {
  const family = document.querySelector('#config-form [data-key="model_family"]').value;
  const select = document.querySelector('#config-form [data-key="model_flavour"]');
  const current = select.value || loadedConfig.model_flavour || "";
  const flavours = (schema.groups.model.find((f) => f.name === "model_flavour").choices_by_family || {})[family] || [];
  select.replaceChildren(el("option", { value: "" }, "(family default)"));
  for (const flavour of flavours) select.append(el("option", { value: flavour }, flavour));
  if (current && !flavours.includes(current)) select.append(el("option", { value: current }, current));
  select.value = flavours.includes(current) || current ? current : "";
}

function buildConfigForm() {
  const form = $("config-form");
  form.replaceChildren();
  for (const group of CONFIG_GROUPS) {
    const box = el("fieldset", { class: "group" }, el("legend", {}, group));
    for (const desc of schema.groups[group]) {
      const shown = desc.name === "model_flavour" ? { ...desc, type: "choice", choices: [] } : desc;
      box.append(fieldInput(shown, loadedConfig[desc.name], desc.name));
    }
    form.append(box);
  }
  form.querySelector('[data-key="model_family"]').addEventListener("change", updateFlavours);
  updateFlavours();
}

function readConfigForm() {
  const config = {};
  for (const [key, value] of Object.entries(loadedConfig)) config[key] = value;
  for (const group of CONFIG_GROUPS) {
    for (const desc of schema.groups[group]) {
      const result = readInput(desc, document.querySelector(`#config-form [data-key="${desc.name}"]`));
      if (result.set) config[desc.name] = result.value;
      else delete config[desc.name];
    }
  }
  return config;
}

async function loadConfig() {
  const result = await api("GET", "/api/config");
  if (!result.ok) { showErrors("config-errors", result.data); return; }
  loadedConfig = normalizeKeys(result.data.config);
  buildConfigForm();
  $("config-status").textContent = result.data.exists ? "" : "no config yet: fill in and save";
  showWarnings("config-warnings", result.data.warnings);
}

async function saveConfig() {
  const result = await api("PUT", "/api/config", readConfigForm());
  if (result.ok) {
    loadedConfig = result.data.config;
    showErrors("config-errors", null);
    $("config-status").textContent = "saved " + result.data.file;
    showWarnings("config-warnings", result.data.warnings);
  } else {
    $("config-status").textContent = "not saved";
    showErrors("config-errors", result.data);
    showWarnings("config-warnings", null);
  }
}

// -- datasets ---------------------------------------------------------------------------------------
const MAIN_DATASET_KEYS = ["id", "dataset_type", "instance_data_dir", "caption_strategy", "instance_prompt",
  "resolution", "resolution_type", "crop", "crop_aspect", "repeats", "cache_dir_vae", "cache_dir", "default", "disabled"];

function datasetCard(entry, index) {
  const main = el("div", { class: "fields" });
  const more = el("div", { class: "fields" });
  for (const desc of schema.groups.datasets) {
    const target = MAIN_DATASET_KEYS.includes(desc.name) ? main : more;
    target.append(fieldInput(desc, entry[desc.name], `${index}.${desc.name}`));
  }
  const remove = el("button", { type: "button", onclick: () => { datasets = readDatasets(); datasets.splice(index, 1); renderDatasets(); } }, "Remove");
  return el("fieldset", { class: "group dataset", "data-index": String(index) },
    el("legend", {}, entry.id || "new dataset"), main, el("details", {}, el("summary", {}, "more settings"), more), remove);
}

function renderDatasets() {
  $("dataset-list").replaceChildren(...datasets.map(datasetCard));
  const select = $("browser-dataset");
  const previous = select.value;
  select.replaceChildren(...datasets.filter((d) => d.instance_data_dir).map((d) => el("option", { value: d.id }, d.id)));
  if (previous) select.value = previous;
}

function readDatasets() {
  return datasets.map((entry, index) => {
    const out = {};
    for (const desc of schema.groups.datasets) {
      const result = readInput(desc, document.querySelector(`[data-key="${CSS.escape(index + "." + desc.name)}"]`));
      if (result.set) out[desc.name] = result.value;
    }
    return out;
  });
}

async function loadDatasets() {
  const result = await api("GET", "/api/datasets");
  if (!result.ok) { showErrors("datasets-errors", result.data); return; }
  datasets = Array.isArray(result.data.datasets) ? result.data.datasets : [];
  renderDatasets();
}

async function saveDatasets() {
  const result = await api("PUT", "/api/datasets", readDatasets());
  if (result.ok) {
    datasets = result.data.datasets;
    renderDatasets();
    showErrors("datasets-errors", null);
    $("datasets-status").textContent = "saved " + result.data.file;
    showWarnings("datasets-warnings", result.data.warnings);
  } else {
    $("datasets-status").textContent = "not saved";
    showErrors("datasets-errors", result.data);
    showWarnings("datasets-warnings", null);
  }
}

// -- dataset browser ----------------------------------------------------------------------------------
async function browse(path) {
  const id = $("browser-dataset").value;
  $("browser-error").textContent = "";
  if (!id) return;
  const base = `/api/datasets/${encodeURIComponent(id)}`;
  const result = await api("GET", `${base}/files?path=${encodeURIComponent(path)}`);
  if (!result.ok) { $("browser-error").textContent = result.data ? result.data.detail : "error " + result.status; return; }
  const listing = result.data;
  const crumbs = [el("a", { href: "#", onclick: (e) => { e.preventDefault(); browse(""); } }, id)];
  let sofar = "";
  for (const part of listing.path ? listing.path.split("/") : []) {
    sofar = sofar ? sofar + "/" + part : part;
    const target = sofar;
    crumbs.push(" / ", el("a", { href: "#", onclick: (e) => { e.preventDefault(); browse(target); } }, part));
  }
  $("browser-path").replaceChildren(...crumbs);
  $("browser-dirs").replaceChildren(...listing.dirs.map((d) =>
    el("li", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); browse(d.path); } }, d.name + "/"))));
  $("browser-files").replaceChildren(...listing.files.filter((f) => f.kind !== "text").map((f) => {
    const url = `${base}/file?path=${encodeURIComponent(f.path)}`;
    // other files come back as downloads (the server never serves them as a page)
    const preview = f.kind === "image"
      ? el("img", { src: `${base}/thumbnail?path=${encodeURIComponent(f.path)}&size=160`, alt: f.name, loading: "lazy" })
      : f.kind === "video"
        ? el("a", { href: url, target: "_blank", rel: "noopener noreferrer" }, "▶ video")
        : el("a", { href: url, download: f.name }, "download");
    return el("figure", {}, preview, el("figcaption", {}, f.name + (f.caption ? " — " + f.caption : "")));
  }));
}

// -- training --------------------------------------------------------------------------------------
// What the tab shows is the current run only, and only the event stream changes it: the stream's reset
// (a new job, or a new connection) clears it, then the stream replays the run from its first line. A
// reply to the page's own requests may come after lines the stream already delivered, so no reply
// clears the run or sets the job's state.
let lastError = null; // the message of the run's error event
let drawTimer = null;
let lossLoading = false;
let runNumber = 0; // counts resets: a loss series asked for before the last reset is dropped
let jobStateName = "idle";
let logLines = 2000; // the server's reset says how many log lines it replays: the page keeps as many
let actionPending = false;

function clearRun() {
  runNumber += 1;
  totalSteps = null;
  lastError = null;
  lossPoints.clear();
  drawLoss();
  for (const id of ["stat-step", "stat-loss", "stat-lr", "stat-rate", "stat-eta", "stat-phase"]) $(id).textContent = "–";
  $("stat-bar").value = 0;
  $("log").replaceChildren();
  showFailure(null);
}

function showFailure(reason) {
  $("job-failure").hidden = !reason;
  $("job-failure-reason").textContent = reason || "";
}

// While the page's own start/resume/stop request is on its way, no second one can be sent.
function updateJobButtons() {
  $("job-start").disabled = $("job-resume").disabled = actionPending || jobStateName === "running";
  $("job-stop").disabled = actionPending || jobStateName !== "running";
}

function setJobState(state) {
  const text = state.state + (state.exit_code != null ? ` (exit code ${state.exit_code})` : "");
  $("job-badge").textContent = state.state;
  $("job-badge").className = "badge " + state.state;
  $("job-status").textContent = text;
  jobStateName = state.state;
  updateJobButtons();
  if (state.state === "failed") {
    showFailure(state.reason || lastError || `the job exited with code ${state.exit_code}`);
    $("stat-phase").textContent = "failed";
    $("stat-eta").textContent = "–";
  } else {
    showFailure(null);
    if (state.state === "running" && $("stat-phase").textContent === "–") $("stat-phase").textContent = "starting";
    if (state.state !== "running" && state.state !== "idle") $("stat-phase").textContent = state.state;
  }
}

async function jobAction(action) {
  $("job-status").textContent = action === "stop" ? "stopping…" : "starting…"; // the stream says when
  actionPending = true;
  updateJobButtons();
  const result = await api("POST", `/api/job/${action}`).finally(() => { actionPending = false; updateJobButtons(); });
  if (!result.ok) $("job-status").textContent = result.data && result.data.detail
    ? (Array.isArray(result.data.detail) ? result.data.detail.map((e) => `${e.key}: ${e.message}`).join("; ") : result.data.detail)
    : "error " + result.status;
}

function appendLog(line) {
  const log = $("log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.append(line + "\n");
  while (log.childNodes.length > logLines) log.removeChild(log.firstChild);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function formatSeconds(seconds) {
  if (seconds == null || !isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s % 60).padStart(2, "0")}s`;
}

function showProgress(event) {
  $("stat-phase").textContent = "training";
  $("stat-step").textContent = totalSteps ? `${event.step} / ${totalSteps}` : String(event.step);
  $("stat-loss").textContent = event.loss == null ? "–" : Number(event.loss).toFixed(4);
  $("stat-lr").textContent = event.lr == null ? "–" : Number(event.lr).toExponential(2);
  $("stat-rate").textContent = event.it_per_s == null ? "–" : Number(event.it_per_s).toFixed(2);
  $("stat-eta").textContent = formatSeconds(event.eta_s);
  if (totalSteps) { $("stat-bar").max = totalSteps; $("stat-bar").value = event.step; }
  if (event.loss != null) {
    lossPoints.set(Number(event.step), Number(event.loss));
    if (lossPoints.size > 4000 && !lossLoading) loadLoss(); // the server averages the series down again
    scheduleDraw();
  }
}

function showValidating(event) {
  $("stat-phase").textContent = `validating (step ${event.step})`;
  $("stat-eta").textContent = "validating…";
}

function scheduleDraw() {
  if (drawTimer === null) drawTimer = setTimeout(() => { drawTimer = null; drawLoss(); }, 200);
}

function drawLoss() {
  const svg = $("loss-plot");
  const ns = "http://www.w3.org/2000/svg";
  const steps = [...lossPoints.keys()].sort((a, b) => a - b);
  svg.replaceChildren();
  if (steps.length === 0) return;
  const losses = steps.map((s) => lossPoints.get(s));
  const [w, h, pad] = [600, 220, 30];
  const [x0, x1] = [steps[0], Math.max(steps[steps.length - 1], steps[0] + 1)];
  const [y0, y1] = [Math.min(...losses), Math.max(...losses, Math.min(...losses) + 1e-9)];
  const x = (s) => pad + ((s - x0) / (x1 - x0)) * (w - 2 * pad);
  const y = (v) => h - pad - ((v - y0) / (y1 - y0)) * (h - 2 * pad);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", steps.map((s, i) => `${x(s).toFixed(1)},${y(losses[i]).toFixed(1)}`).join(" "));
  line.setAttribute("class", "loss-line");
  svg.append(line);
  const labels = [[pad, h - 8, String(x0)], [w - pad, h - 8, String(x1)], [2, pad, y1.toPrecision(3)], [2, h - pad, y0.toPrecision(3)]];
  for (const [lx, ly, text] of labels) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", lx); label.setAttribute("y", ly); label.setAttribute("class", "axis");
    label.textContent = text;
    svg.append(label);
  }
}

// The current run's loss, averaged down by the server; points that came in meanwhile are kept.
async function loadLoss() {
  const run = runNumber;
  lossLoading = true;
  const result = await api("GET", "/api/loss?points=1000").finally(() => { lossLoading = false; });
  if (!result.ok || run !== runNumber) return;
  const fresh = new Map();
  result.data.steps.forEach((s, i) => { if (result.data.loss[i] != null) fresh.set(s, result.data.loss[i]); });
  const last = result.data.steps.length ? result.data.steps[result.data.steps.length - 1] : -Infinity;
  for (const [step, loss] of lossPoints) if (step > last) fresh.set(step, loss);
  lossPoints.clear();
  for (const [step, loss] of fresh) lossPoints.set(step, loss);
  scheduleDraw();
}

// -- gallery ----------------------------------------------------------------------------------------
let galleryAsked = 0; // replies can come out of order: only the latest request's reply is shown

async function loadGallery() {
  const asked = ++galleryAsked;
  const result = await api("GET", "/api/validation");
  if (asked !== galleryAsked) return;
  if (!result.ok) { $("gallery-note").textContent = result.data ? result.data.detail : "error"; return; }
  $("gallery-note").textContent = result.data.steps.length ? "" : "no validation samples yet in " + result.data.output_dir;
  $("gallery").replaceChildren(...result.data.steps.map((entry) => el("section", { class: "step" },
    el("h3", {}, "step " + entry.step),
    el("div", { class: "grid" }, ...entry.files.map((f) => {
      const url = `/api/output/file?path=${encodeURIComponent(f.path)}`;
      const media = f.kind === "video" ? el("video", { src: url, controls: "", loop: "" }) : el("img", { src: url, alt: f.name });
      return el("figure", {}, media, el("figcaption", {}, f.name));
    })))));
}

// -- live events --------------------------------------------------------------------------------------
// The log shows the job's own output (which already has a line for each notable event); events drive
// the figures, the chart and the gallery. Each message has an id, so a reconnect replays nothing.
function connectEvents() {
  const source = new EventSource("/api/events");
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "reset") { logLines = event.log_lines || logLines; clearRun(); loadLoss(); }
    else if (event.type === "joblog") appendLog(event.line);
    else if (event.type === "job") { setJobState(event); if (event.state !== "running") loadGallery(); }
    else if (event.type === "start") totalSteps = event.total_steps || null;
    else if (event.type === "progress") showProgress(event);
    else if (event.type === "validation_start") showValidating(event);
    else if (event.type === "validation") { $("stat-phase").textContent = "training"; loadGallery(); }
    else if (event.type === "error") lastError = event.message;
    else if (event.type === "finished") { $("stat-phase").textContent = "finished"; loadGallery(); }
  };
}

// -- start ---------------------------------------------------------------------------------------------
function showTab(name) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.id === "tab-" + name));
  if (name === "gallery") loadGallery();
  if (name === "browser") browse("");
}

async function main() {
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("config-save").addEventListener("click", saveConfig);
  $("datasets-save").addEventListener("click", saveDatasets);
  $("dataset-add").addEventListener("click", () => {
    datasets = readDatasets();
    datasets.push({ id: `dataset-${datasets.length + 1}`, type: "local", dataset_type: "image" });
    renderDatasets();
  });
  $("browser-dataset").addEventListener("change", () => browse(""));
  $("job-start").addEventListener("click", () => jobAction("start"));
  $("job-resume").addEventListener("click", () => jobAction("resume"));
  $("job-stop").addEventListener("click", () => jobAction("stop"));
  $("gallery-refresh").addEventListener("click", loadGallery);
  const result = await api("GET", "/api/schema");
  if (!result.ok) { document.body.prepend(el("p", { class: "errors" }, "cannot load /api/schema: " + (result.data && result.data.detail))); return; }
  schema = result.data;
  await Promise.all([loadConfig(), loadDatasets()]);
  const job = await api("GET", "/api/job");
  if (job.ok) setJobState(job.data);
  connectEvents();
  document.body.dataset.ready = "true";
}

main();
