// The page at /: plain JavaScript, no build step, no library, nothing from the internet.
// It uses the service's public API like any client: GET /models, POST /preview (an 8-bit
// view of the image: browsers read neither TIFF nor 16-bit ranges) and POST /segment.
"use strict";

// Overlay colours of classes 1, 2, ... (class 0, background, is left clear).
const OUTLINE = [255, 255, 0]; // objects' outlines (models that give instances)
const COLOURS = [
  [255, 0, 255],
  [255, 170, 0],
  [0, 210, 255],
  [120, 255, 0],
  [255, 60, 60],
  [160, 110, 255],
];
const OVERLAY_ALPHA = 0.5;
const KEY_STORE = "segment-api-key";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  models: {},
  image: null,
  truth: null,
  maskUrl: null,
  doc: null, // the last answer (a stack's is shown plane by plane)
  previews: {}, // a stack's plane previews, by plane
};

function setState(name, message, isError) {
  document.body.dataset.state = name;
  const status = $("status");
  status.textContent = message || "";
  status.classList.toggle("error", Boolean(isError));
}

class ServiceError extends Error {
  constructor(status, detail, code, requestId) {
    super(detail);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }
  describe() {
    const code = this.code ? ` (${this.code})` : "";
    const rid = this.requestId ? ` [request ${this.requestId}]` : "";
    return `${this.message}${code}${rid}`;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["X-API-Key"] = state.key;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    let code = "";
    let rid = response.headers.get("x-request-id") || "";
    try {
      const body = await response.json();
      detail = body.detail || detail;
      code = body.code || "";
      rid = body.request_id || rid;
    } catch (_) {
      // not the service's JSON error body: keep the status line
    }
    throw new ServiceError(response.status, detail, code, rid);
  }
  return response;
}

function showKeyPanel(message) {
  $("key-panel").hidden = false;
  $("key-message").textContent = message || "";
}

async function loadModels() {
  setState("loading", "Loading the models…");
  let listing;
  try {
    listing = await (await api("/models")).json();
  } catch (err) {
    if (err.status === 401) {
      showKeyPanel(state.key ? "This key was not accepted." : "");
      setState("need-key", "This service needs an API key: enter it above.", true);
      return;
    }
    setState("error", err.describe ? err.describe() : String(err), true);
    return;
  }
  $("key-panel").hidden = state.key === "" && document.body.dataset.keyRequired !== "true";
  const select = $("model");
  select.textContent = "";
  state.models = {};
  for (const model of listing.models) {
    state.models[model.name] = model;
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = `${model.name} (${model.metadata.classes.join(", ")})`;
    option.selected = model.default;
    select.appendChild(option);
  }
  if (!listing.models.length) {
    setState("error", "No model is loaded on this service.", true);
    return;
  }
  modelChanged();
  setState("ready", state.image ? "" : "Choose an image to segment.");
  updateButton();
}

function modelChanged() {
  const model = state.models[$("model").value];
  const binary = model.metadata.task === "binary";
  $("threshold-label").hidden = !binary;
  if (binary) $("threshold").value = model.metadata.threshold;
  // Only a model that knows its training scale can rescale an image to it.
  const trained = model.metadata.object_diameter;
  $("diameter-label").hidden = trained == null;
  $("diameter").value = "";
  $("diameter").placeholder = trained == null ? "" : `as it is (model: ${trained} px)`;
  // The precisions of its newest version; auto says what it runs on this service's hardware.
  const precision = $("precision");
  precision.textContent = "";
  const choices = [["auto", `auto (${model.auto.precision})`]];
  for (const v of model.variants) choices.push([v.precision, v.precision]);
  for (const [value, label] of choices) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label;
    precision.appendChild(option);
  }
  precision.title = `auto: ${model.auto.reason}`;
}

// What the chosen image holds beyond a plane: its planes and, when it has several, its
// channels (from the service's preview headers), so that the page can offer the choice.
async function probeImage(file) {
  const form = new FormData();
  form.append("image", file);
  $("channel-label").hidden = true;
  $("channel").textContent = "";
  try {
    const response = await api("/preview?max_side=16", { method: "POST", body: form });
    if (state.image !== file) return; // another image was chosen meanwhile
    const names = JSON.parse(response.headers.get("x-image-channels") || "[]");
    for (const [index, name] of names.entries()) {
      const option = document.createElement("option");
      option.value = String(index);
      option.textContent = name === String(index) ? `channel ${index}` : `${index}: ${name}`;
      $("channel").appendChild(option);
    }
    $("channel-label").hidden = names.length < 2;
    const planes = Number(response.headers.get("x-image-planes") || "1");
    const channels = names.length > 1 ? `, ${names.length} channels` : "";
    const stack = planes > 1 ? `a stack of ${planes} planes` : "";
    if (stack || channels) $("image-name").textContent += ` — ${stack || "one plane"}${channels}`;
  } catch (err) {
    // The segmentation will say what is wrong with the file.
  }
}

function updateButton() {
  $("run").disabled = !(state.image && Object.keys(state.models).length);
}

function chooseFile(kind, file) {
  state[kind] = file || null;
  $(`${kind}-name`).textContent = file ? `${file.name} (${file.size.toLocaleString()} bytes)` : (kind === "image" ? "no image yet" : "none");
  if (kind === "truth") $("truth-clear").hidden = !file;
  if (kind === "image") {
    clearResult();
    // Only a TIFF can hold planes or more channels than RGB(A).
    if (file && /\.tiff?$/i.test(file.name)) probeImage(file);
    else {
      $("channel-label").hidden = true;
      $("channel").textContent = "";
    }
  }
  updateButton();
}

// Nothing of an earlier run stays on screen once another starts, fails, or the image changes.
function clearResult() {
  $("result").hidden = true;
  for (const id of ["image-view", "overlay-view"]) {
    const view = $(id);
    view.width = 1;
    view.height = 1;
  }
  $("legend").textContent = "";
  $("summary").textContent = "";
  $("objects").textContent = "";
  $("scores").hidden = true;
  $("scores").querySelector("tbody").textContent = "";
  $("scores").querySelector("tfoot").textContent = "";
  $("planes").hidden = true;
  $("plane-name").textContent = "";
  state.doc = null;
  state.previews = {};
  if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
  state.maskUrl = null;
  $("download").removeAttribute("href");
}

function wireDrop(zoneId, inputId, kind) {
  const zone = $(zoneId);
  const input = $(inputId);
  input.addEventListener("change", () => chooseFile(kind, input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) chooseFile(kind, event.dataTransfer.files[0]);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not read an image the service sent"));
    img.src = src;
  });
}

function b64Bytes(b64) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// Paint ``colour`` into ``out`` wherever the 0/255 PNG (base64) is set.
async function paint(ctx, out, png, colour) {
  const img = await loadImage(`data:image/png;base64,${png}`);
  ctx.clearRect(0, 0, out.width, out.height);
  ctx.drawImage(img, 0, 0);
  const mask = ctx.getImageData(0, 0, out.width, out.height).data;
  for (let i = 0; i < mask.length; i += 4) {
    if (mask[i] > 127) {
      out.data[i] = colour[0];
      out.data[i + 1] = colour[1];
      out.data[i + 2] = colour[2];
      out.data[i + 3] = 255;
    }
  }
}

// The classes' 0/255 masks painted in their colours on a transparent canvas of the mask's size,
// and the objects' outlines over them (a model that gives instances).
async function colouredMask(doc) {
  const canvas = document.createElement("canvas");
  canvas.width = doc.image.width;
  canvas.height = doc.image.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const out = ctx.createImageData(canvas.width, canvas.height);
  const legend = [];
  for (const [index, name] of doc.classes.entries()) {
    if (index === 0) continue; // background stays clear
    const colour = COLOURS[(index - 1) % COLOURS.length];
    legend.push([name, colour]);
    await paint(ctx, out, doc.class_masks[name], colour);
  }
  if (doc.outlines_png) {
    await paint(ctx, out, doc.outlines_png, OUTLINE);
    legend.push(["outlines", OUTLINE]);
  }
  ctx.putImageData(out, 0, 0);
  return { canvas, legend };
}

function drawViews(preview, mask) {
  const views = [$("image-view"), $("overlay-view")];
  for (const view of views) {
    view.width = preview.width;
    view.height = preview.height;
    const ctx = view.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(preview, 0, 0);
  }
  const ctx = $("overlay-view").getContext("2d");
  ctx.globalAlpha = OVERLAY_ALPHA;
  ctx.drawImage(mask, 0, 0, preview.width, preview.height);
  ctx.globalAlpha = 1;
}

function fmt(value) {
  return value === null || value === undefined ? "–" : value.toFixed(4);
}

function showScores(doc, metrics = doc.metrics) {
  const table = $("scores");
  table.hidden = !metrics;
  if (!metrics) return;
  const body = table.querySelector("tbody");
  body.textContent = "";
  for (const name of doc.classes) {
    const row = body.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = fmt(metrics.iou[name]);
    row.insertCell().textContent = fmt(metrics.dice[name]);
  }
  const foot = table.querySelector("tfoot");
  foot.textContent = "";
  const mean = foot.insertRow();
  mean.insertCell().textContent = "mean (classes present)";
  mean.insertCell().textContent = fmt(metrics.mean_iou);
  mean.insertCell().textContent = fmt(metrics.mean_dice);
}

function showLegend(legend) {
  const holder = $("legend");
  holder.textContent = "";
  for (const [name, colour] of legend) {
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${colour.join(",")})`;
    holder.appendChild(swatch);
    holder.appendChild(document.createTextNode(name));
  }
}

async function segment(event) {
  event.preventDefault();
  if (!state.image) return;
  $("run").disabled = true;
  clearResult();
  setState("running", "Segmenting…");
  const params = new URLSearchParams({
    model: $("model").value,
    precision: $("precision").value,
    format: "json",
    per_class: "true",
  });
  if ($("overlap").value) params.set("overlap", $("overlap").value);
  const channel = $("channel-label").hidden ? null : $("channel").value;
  if (channel !== null) params.set("channel", channel);
  if (!$("threshold-label").hidden) params.set("threshold", $("threshold").value);
  if (!$("diameter-label").hidden && $("diameter").value) params.set("diameter", $("diameter").value);
  // A model that separates touching objects: count them and draw their outlines.
  if (state.models[$("model").value].instances) params.set("output", "labels");
  const form = new FormData();
  form.append("image", state.image);
  if (state.truth) form.append("ground_truth", state.truth);
  try {
    const [segmented, preview] = await Promise.all([
      api(`/segment?${params}`, { method: "POST", body: form }),
      planePreview(0, channel),
    ]);
    const doc = await segmented.json();
    state.doc = doc;
    if (doc.mask_tiff) {
      // A stack: the first plane at once, the others on the slider.
      state.previews[0] = preview;
      offerDownload(b64Bytes(doc.mask_tiff), "image/tiff", ".tif");
      $("plane").max = String(doc.image.planes - 1);
      $("plane").value = "0";
      $("planes").hidden = false;
      await showPlane(0);
    } else {
      const { canvas, legend } = await colouredMask(doc);
      drawViews(preview, canvas);
      showLegend(legend);
      showScores(doc);
      offerDownload(b64Bytes(doc.mask_png), "image/png", ".png");
    }
    const ms = Object.values(doc.timings_ms).reduce((a, b) => a + b, 0);
    const scaled = doc.scale && doc.scale.resampled
      ? `, rescaled ×${doc.scale.factor.toFixed(2)} to ${doc.scale.width}×${doc.scale.height}`
      : "";
    $("summary").textContent = ` — ${doc.model} v${doc.version} (${doc.precision}), ${doc.image.width}×${doc.image.height}${scaled}, ${doc.tiles} tiles, ${Math.round(ms)} ms on ${doc.provider}`;
    if (doc.mask_tiff) $("summary").textContent += `, ${doc.image.planes} planes (${doc.image.plane_axes})`;
    if (doc.object_count !== null && doc.object_count !== undefined) {
      const f1 = doc.object_metrics && doc.object_metrics.f1 !== null
        ? ` (F1 ${doc.object_metrics.f1.toFixed(3)} against the ground truth)`
        : "";
      $("objects").textContent = `${doc.object_count} object${doc.object_count === 1 ? "" : "s"}${f1}`;
    }
    $("result").hidden = false;
    setState("done", "");
  } catch (err) {
    clearResult();
    setState("error", err.describe ? err.describe() : String(err), true);
  } finally {
    updateButton();
  }
}

// The 8-bit preview of one plane of the chosen image (in the chosen channel).
async function planePreview(plane, channel) {
  const form = new FormData();
  form.append("image", state.image);
  const params = new URLSearchParams({ max_side: "1024", plane: String(plane) });
  if (channel !== null) params.set("channel", channel);
  const response = await api(`/preview?${params}`, { method: "POST", body: form });
  return loadImage(URL.createObjectURL(await response.blob()));
}

// Plane ``k`` of a stack's answer: its image, its classes and outlines, its scores.
async function showPlane(k) {
  const doc = state.doc;
  if (!doc || !doc.mask_tiff) return;
  if (!state.previews[k]) {
    const channel = $("channel-label").hidden ? null : $("channel").value;
    state.previews[k] = await planePreview(k, channel);
  }
  if (state.doc !== doc || Number($("plane").value) !== k) return; // moved on meanwhile
  const plane = {
    image: doc.image,
    classes: doc.classes,
    class_masks: doc.plane_class_masks[k],
    outlines_png: doc.plane_outlines_png ? doc.plane_outlines_png[k] : null,
  };
  const { canvas, legend } = await colouredMask(plane);
  drawViews(state.previews[k], canvas);
  showLegend(legend);
  const scores = doc.planes ? doc.planes[k].metrics : null;
  showScores(doc, scores);
  const index = Object.entries(doc.planes ? doc.planes[k].index : {}).map(([a, i]) => `${a}=${i}`);
  const found = doc.plane_objects ? `, ${doc.plane_objects[k].object_count} objects` : "";
  $("plane-name").textContent = `${k + 1} of ${doc.image.planes}${index.length ? ` (${index.join(", ")})` : ""}${found}`;
}

function offerDownload(bytes, type, suffix) {
  if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
  state.maskUrl = URL.createObjectURL(new Blob([bytes], { type }));
  const link = $("download");
  link.href = state.maskUrl;
  const stem = state.image.name.replace(/\.[^.]+$/, "");
  // Not "<image>_mask": segment-client and the like pair that name as the image's ground truth.
  link.download = `${stem}.mask${suffix}`;
  link.textContent = `Download the mask (${suffix === ".png" ? "PNG" : "multi-page TIFF"})`;
}

function init() {
  wireDrop("drop", "image-input", "image");
  wireDrop("drop-truth", "truth-input", "truth");
  $("truth-clear").addEventListener("click", () => {
    $("truth-input").value = "";
    chooseFile("truth", null);
  });
  $("model").addEventListener("change", modelChanged);
  $("plane").addEventListener("input", () => {
    showPlane(Number($("plane").value)).catch((err) => setState("error", String(err), true));
  });
  $("form").addEventListener("submit", segment);
  $("save-key").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    loadModels();
  });
  if (document.body.dataset.keyRequired === "true" && !state.key) {
    showKeyPanel("");
    setState("need-key", "This service needs an API key: enter it above.", true);
    return;
  }
  loadModels();
}

init();
