// fluxserve studio: wires the page to the API (models, tokenize, streamed generations, cancel, memory).

import { ApiClient, ApiError, newRequestId, normalizeBase } from "./api.js";
import { base64ToBlob, curlCommand, debounce, el, formatBytes, formatSeconds, mediaType, shellQuote } from "./format.js";
import { EditPanel } from "./edit.js";
import { Gallery } from "./gallery.js";
import { ParamsForm } from "./params.js";
import * as store from "./store.js";
import { Turn } from "./turn.js";

const $ = (id) => document.getElementById(id);

const ui = {
  modelSelect: $("model-select"), modelStatus: $("model-status"), badge: $("device-badge"),
  freeMemory: $("free-memory"), openSettings: $("open-settings"), dot: $("connection-dot"), banner: $("banner"),
  history: $("history"), emptyState: $("empty-state"), composer: $("composer"), prompt: $("prompt"),
  tokens: $("token-count"), generate: $("generate"), cancel: $("cancel"), curl: $("curl"), copyCurl: $("copy-curl"),
  toasts: $("toasts"), settingsDialog: $("settings-dialog"), settingsForm: $("settings-form"),
  settingsReason: $("settings-reason"), apiBase: $("api-base"), apiKey: $("api-key"), rememberKey: $("remember-key"),
  memoryDialog: $("memory-dialog"), memoryAll: $("memory-all"), toggleParams: $("toggle-params"),
  turnTemplate: $("turn-template"),
};

const state = {
  models: null, // the last GET /v1/models answer
  card: null, // the active model's card
  inflight: new Map(), // request_id → {turn, controller}
  switching: false,
  lastRequest: null,
};

const api = new ApiClient(connectionSettings());
const params = new ParamsForm(document, { onChange: () => {} });
const gallery = new Gallery({
  list: $("gallery"), count: $("gallery-count"), empty: $("gallery-empty"), viewer: $("viewer"),
  onUse: (image) => useSettings(image),
  onEdit: (image) => editImage(image),
});
const edit = new EditPanel({
  root: $("edit-panel"), onChange: () => updateButtons(),
  onError: (message) => toast(`Cannot use that image: ${message}`, "error", 6000),
});
new MutationObserver(() => updateButtons()).observe($("edit-panel"), { attributes: true, attributeFilter: ["class"] });

function connectionSettings() {
  const base = store.getApiBase();
  return { base, key: store.getApiKey(base).key };
}

// --- feedback ------------------------------------------------------------------------------------
function toast(message, kind = "info", ms = 4000) {
  const node = el("div", { class: `toast toast-${kind}`, text: message });
  ui.toasts.append(node);
  setTimeout(() => node.remove(), ms);
}

function showBanner(message, { action } = {}) {
  ui.banner.replaceChildren(el("span", { text: message }));
  if (action) {
    ui.banner.append(el("button", { type: "button", class: "btn btn-small", text: action.label, onclick: action.run }));
  }
  ui.banner.hidden = false;
}

function hideBanner() {
  ui.banner.hidden = true;
}

function setConnection(ok, title) {
  ui.dot.classList.toggle("ok", ok === true);
  ui.dot.classList.toggle("bad", ok === false);
  ui.openSettings.title = title;
}

function describeError(err) {
  const parts = [err.message];
  if (err.param) parts.push(`(param: ${err.param})`);
  return parts.join(" ");
}

// --- models --------------------------------------------------------------------------------------
async function loadModels({ reset = false } = {}) {
  let data;
  try {
    data = await api.models();
  } catch (err) {
    handleConnectionError(err, { first: state.models === null && !ui.settingsDialog.open });
    return false;
  }
  hideBanner();
  setConnection(true, `Connected to ${api.base || "this origin"}`);
  const first = state.models === null;
  state.models = data;
  const active = data.active_key || data.active?.key;
  const card = data.data.find((c) => c.id === active) || data.data[0];
  const changed = !state.card || state.card.id !== card.id;
  state.card = card;

  // One group per family; an option says what limits its use (non-commercial licence, gated repo).
  const families = new Map();
  for (const c of data.data) {
    const option = el("option", { value: c.id, title: licenceText(c) },
      c.id + (c.loaded ? "" : " · not loaded") + (c.commercial_use === false ? " · non-commercial" : "")
      + (c.gated ? " · gated" : ""));
    if (!families.has(c.family)) families.set(c.family, []);
    families.get(c.family).push(option);
  }
  ui.modelSelect.replaceChildren(...[...families].map(([family, options]) =>
    el("optgroup", { label: family || "other" }, ...options)));
  ui.modelSelect.value = card.id;
  ui.modelSelect.disabled = false;
  ui.modelSelect.title = [card.description, licenceText(card)].filter(Boolean).join("\n");
  ui.badge.textContent = `${data.device} · ${data.dtype}`;
  const devices = data.runtime?.devices || [];
  ui.badge.title = devices.map((d) => `${d.device}: ${d.dtype} (VAE ${d.vae_dtype}, generator on ${d.generator_device})`)
    .join("\n") || "Device and dtype";
  params.applyModel(card, data.runtime, { reset: reset || first || changed });
  try {
    params.setLoras(await api.loras(), card);
  } catch {
    params.setLoras(null, card); // an older server without /v1/loras: no picker
  }
  updateTokens();
  updateButtons();
  return true;
}

/** "Licence: Apache-2.0" / "Licence: … — no commercial use · gated: needs HF_TOKEN" for a model card. */
function licenceText(card) {
  const parts = [];
  if (card.licence) parts.push(`Licence: ${card.licence}` + (card.commercial_use === false ? " — no commercial use" : ""));
  if (card.gated) parts.push("gated: accept the licence on the hub and set HF_TOKEN");
  return parts.join(" · ");
}

function handleConnectionError(err, { first = false } = {}) {
  setConnection(false, err.message);
  ui.badge.textContent = "offline";
  const where = api.base || window.location.origin;
  if (err instanceof ApiError && err.isAuth) {
    showBanner(`This server needs an API key: ${err.message}`, { action: { label: "Enter key", run: () => openSettings() } });
    openSettings(api.key ? `The API key was refused: ${err.message}` : "This server requires an API key.");
    return;
  }
  let message = describeError(err);
  if (err.status === 404 || err.code === "not_json") {
    message = `No fluxserve API answered at ${where} (${err.status ? `HTTP ${err.status}` : err.message}). Set the API base URL.`;
  }
  showBanner(message, { action: { label: "Connection settings", run: () => openSettings() } });
  if (first) openSettings(message);
}

async function selectModel(id) {
  const previous = state.card?.id;
  if (!id || id === previous) return;
  state.switching = true;
  ui.modelSelect.disabled = true;
  ui.modelSelect.setAttribute("aria-busy", "true");
  ui.modelStatus.replaceChildren(el("span", { class: "spinner", "aria-hidden": "true" }), `Loading ${id}…`);
  ui.modelStatus.dataset.state = "loading";
  updateButtons();
  try {
    const answer = await api.selectModel(id);
    await loadModels({ reset: true });
    ui.modelStatus.textContent = `${answer.active.key} ready (${formatSeconds(answer.seconds)})`;
    ui.modelStatus.title = "";
    ui.modelStatus.dataset.state = "ready";
  } catch (err) {
    ui.modelSelect.value = previous;
    ui.modelStatus.textContent = `Could not load ${id}: ${err.message}`;
    ui.modelStatus.title = err.message;
    ui.modelStatus.dataset.state = "error";
    toast(`Could not switch to ${id}: ${describeError(err)}`, "error", 8000);
    if (err.isAuth) openSettings("This server requires an API key.");
  } finally {
    state.switching = false;
    ui.modelSelect.disabled = false;
    ui.modelSelect.removeAttribute("aria-busy");
    updateButtons();
  }
}

// --- token count ---------------------------------------------------------------------------------
const TOKENIZER_NAMES = { flux: { tokenizer: "CLIP", tokenizer_2: "T5" }, qwen: { tokenizer: "Qwen" } };
let tokenController = null;

const updateTokens = debounce(async () => {
  tokenController?.abort();
  const prompt = ui.prompt.value;
  const card = state.card;
  if (!card) return;
  if (!prompt) {
    ui.tokens.textContent = "0 tokens";
    ui.tokens.classList.remove("over");
    ui.tokens.removeAttribute("title");
    return;
  }
  tokenController = new AbortController();
  try {
    const answer = await api.tokenize(prompt, card.id, tokenController.signal);
    const names = TOKENIZER_NAMES[card.family] || {};
    const parts = [];
    const over = [];
    for (const [key, count] of Object.entries(answer.counts || {})) {
      const limit = answer.limits?.[key];
      const name = names[key] || key;
      parts.push(limit ? `${name} ${count}/${limit}` : `${name} ${count}`);
      if (limit && count > limit) over.push(`${name} keeps the first ${limit} tokens; the rest is cut off`);
    }
    ui.tokens.textContent = parts.length ? `Tokens: ${parts.join(" · ")}` : "Tokens: –";
    ui.tokens.classList.toggle("over", over.length > 0);
    ui.tokens.title = over.join("\n") || `Token counts from ${answer.model}'s tokenizers`;
  } catch (err) {
    if (err.name === "AbortError") return;
    ui.tokens.classList.remove("over");
    ui.tokens.textContent = err.code === "model_not_loaded" ? "Tokens: load the model to count" : "Tokens: unavailable";
    ui.tokens.title = err.message;
  }
}, 250);

// --- generation ----------------------------------------------------------------------------------
function buildRequest() {
  const prompt = ui.prompt.value;
  if (!prompt.trim()) {
    params.markInvalid("prompt", "Type a prompt first.");
    ui.prompt.focus();
    return null;
  }
  params.clearInvalid(ui.prompt);
  const request = { prompt, model: state.card?.id, ...params.read() };
  if (!edit.active) return request;
  // An edit: the first image's size ("auto"), the images and the painted mask; strength where the task takes one.
  const modes = state.card?.edits;
  if (!modes) {
    toast(`${state.card?.id} does not edit images`, "error", 6000);
    return null;
  }
  const task = edit.hasMask ? modes.with_mask : modes.without_mask;
  delete request.width;
  delete request.height;
  return { ...request, ...edit.fields({ usesStrength: task === "img2img" || task === "inpaint" }) };
}

async function editImage(image) {
  try {
    edit.clear(); // continue from this image: it becomes the (only) input, with a fresh mask
    await edit.addUrl(image.url, `result ${image.seed}`);
    $("edit-panel").scrollIntoView({ block: "nearest" });
    ui.prompt.focus();
  } catch (err) {
    toast(`Could not edit that image: ${err.message}`, "error", 6000);
  }
}

function showCurl(request) {
  const { request_id: _id, ...body } = request;
  state.lastRequest = body;
  const auth = Boolean(api.key) || Boolean(state.models?.runtime?.auth_required);
  ui.curl.textContent = body.image ? editCurl(body, auth)
    : curlCommand(api.url("/v1/images/generations"), body, { auth });
  ui.copyCurl.disabled = false;
}

/** The edit as OpenAI's SDKs send it (multipart), with the images as files instead of megabytes of base64. */
function editCurl(body, auth) {
  const lines = [`curl ${shellQuote(api.url("/v1/images/edits"))}`];
  if (auth) lines.push('-H "Authorization: Bearer $FLUX_API_KEY"');
  body.image.forEach((_, i) => lines.push(`-F ${body.image.length > 1 ? "'image[]'" : "image"}=@image${i + 1}.png`));
  if (body.mask) lines.push("-F mask=@mask.png");
  for (const [key, value] of Object.entries(body)) {
    if (key === "image" || key === "mask" || value === undefined || value === null) continue;
    lines.push(`-F ${shellQuote(`${key}=${value}`)}`);
  }
  return lines.join(" \\\n  ");
}

async function run(request) {
  request = { ...request, request_id: newRequestId() };
  for (const key of Object.keys(request)) if (request[key] === undefined) delete request[key];
  showCurl(request);
  params.clearAllInvalid();
  const turn = new Turn(ui.turnTemplate, request, turnHandlers);
  ui.emptyState.hidden = true;
  ui.history.append(turn.node);
  turn.node.scrollIntoView({ block: "end" });
  const controller = new AbortController();
  state.inflight.set(request.request_id, { turn, controller });
  updateButtons();
  try {
    await (request.image ? api.edit.bind(api) : api.generate.bind(api))({ ...request, partial_images: 2 }, {
      signal: controller.signal,
      onEvent: (type, data) => onStreamEvent(turn, type, data),
    });
    turn.finish();
  } catch (err) {
    if (err.name === "AbortError") {
      turn.cancelled();
    } else {
      turn.fail(err);
      if (err.param) params.markInvalid(err.param, err.message);
      if (err.isAuth) openSettings("This server requires an API key.");
    }
  } finally {
    state.inflight.delete(request.request_id);
    updateButtons();
    if (ui.history.lastElementChild === turn.node) turn.node.scrollIntoView({ block: "end" });
  }
}

function onStreamEvent(turn, type, data) {
  switch (type.replace(/^image_edit\./, "image_generation.")) { // edits stream the same events under image_edit.*
    case "image_generation.progress":
      turn.onProgress(data);
      break;
    case "image_generation.partial_image":
      turn.onPartial(URL.createObjectURL(base64ToBlob(data.b64_json, mediaType(data.output_format))), data);
      break;
    case "image_generation.completed": {
      const url = data.b64_json ? URL.createObjectURL(base64ToBlob(data.b64_json, mediaType(data.output_format)))
        : data.url;
      turn.addImage(url, data);
      break;
    }
    case "error":
      turn.fail(data.error || { message: "the server reported an error" });
      break;
    default:
      break; // newer event types: ignore
  }
}

async function cancelTurn(turn) {
  const entry = state.inflight.get(turn.request.request_id);
  if (!entry || !turn.active) return;
  turn.markCancelling();
  if (turn.state === "sending") {
    entry.controller.abort(); // the server may not know the id yet: dropping the stream cancels it
    return;
  }
  try {
    await api.cancel(turn.request.request_id);
    // The stream now ends with an error event whose code is "cancelled"; drop it if it lingers.
    setTimeout(() => turn.active && entry.controller.abort(), 5000);
  } catch (err) {
    if (err.status === 404 && turn.images.length) return; // it finished meanwhile
    entry.controller.abort();
  }
}

const turnHandlers = {
  onCancel: (turn) => cancelTurn(turn),
  onSameSeed: (turn, seed) => run({ ...turn.request, seed: seed ?? turn.request.seed }),
  onVary: (turn) => run({ ...turn.request, seed: undefined }),
  onRetry: (turn) => run({ ...turn.request }),
  onImage: (_turn, image) => gallery.add(image),
  onEdit: (_turn, image) => editImage(image),
};

function useSettings(image) {
  const p = image.params;
  if (image.model !== state.card?.id) toast(`Made with ${image.model}; the active model is ${state.card?.id}`, "info");
  params.setValues({ width: p.width, height: p.height, num_inference_steps: p.num_inference_steps,
                     guidance: p.guidance_scale, seed: image.seed });
  ui.prompt.value = image.prompt;
  updateTokens();
  ui.prompt.focus();
}

function updateButtons() {
  ui.cancel.disabled = state.inflight.size === 0;
  ui.generate.disabled = state.switching || !state.card;
  ui.generate.firstChild.textContent = edit?.active ? "Edit " : "Generate ";
  ui.cancel.textContent = state.inflight.size > 1 ? `Cancel (${state.inflight.size})` : "Cancel";
}

// --- connection settings -------------------------------------------------------------------------
function openSettings(reason = "") {
  const base = store.getApiBase();
  const { key, remember } = store.getApiKey(base);
  ui.apiBase.value = base;
  ui.apiKey.value = key;
  ui.rememberKey.checked = remember;
  ui.settingsReason.textContent = reason;
  ui.settingsReason.hidden = !reason;
  if (!ui.settingsDialog.open) ui.settingsDialog.showModal();
  (reason && /key/i.test(reason) ? ui.apiKey : ui.apiBase).focus();
}

$("cancel-settings").addEventListener("click", () => ui.settingsDialog.close());

ui.settingsForm.addEventListener("submit", (event) => {
  if (event.submitter?.value !== "save") return;
  let base;
  try {
    base = normalizeBase(ui.apiBase.value);
  } catch (err) {
    event.preventDefault();
    ui.settingsReason.textContent = `API base: ${err.message}`;
    ui.settingsReason.hidden = false;
    ui.apiBase.focus();
    return;
  }
  store.setApiBase(base);
  store.setApiKey(base, ui.apiKey.value.trim(), ui.rememberKey.checked);
  api.configure({ base, key: ui.apiKey.value.trim() });
  if (state.card) state.card = null; // another server may serve other models
  state.models = null;
  loadModels({ reset: true });
});

// --- memory --------------------------------------------------------------------------------------
ui.freeMemory.addEventListener("click", () => {
  ui.memoryAll.checked = false;
  ui.memoryDialog.showModal();
});

ui.memoryDialog.addEventListener("close", async () => {
  if (ui.memoryDialog.returnValue !== "release") return;
  ui.memoryDialog.returnValue = "";
  ui.freeMemory.disabled = true;
  try {
    const answer = await api.releaseMemory(ui.memoryAll.checked);
    const dropped = answer.dropped?.length ? `dropped ${answer.dropped.join(", ")}` : "nothing to drop";
    toast(`Memory released: ${dropped}; freed ${formatBytes(answer.freed_bytes || 0)}.`, "ok", 6000);
    await loadModels();
  } catch (err) {
    toast(`Could not free memory: ${describeError(err)}`, "error", 8000);
  } finally {
    ui.freeMemory.disabled = false;
  }
});

// --- the rest of the wiring ----------------------------------------------------------------------
ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  if (ui.generate.disabled) return;
  const request = buildRequest();
  if (request) run(request);
});

document.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey) || event.isComposing) return;
  if (document.querySelector("dialog[open]")) return;
  event.preventDefault();
  ui.composer.requestSubmit();
});

ui.cancel.addEventListener("click", async () => {
  // Newest first: queued requests go before the running one frees the worker for them.
  for (const { turn } of [...state.inflight.values()].reverse()) await cancelTurn(turn);
});

ui.prompt.addEventListener("input", () => {
  params.clearInvalid(ui.prompt);
  updateTokens();
});

ui.modelSelect.addEventListener("change", () => selectModel(ui.modelSelect.value));
ui.openSettings.addEventListener("click", () => openSettings());

ui.copyCurl.addEventListener("click", async () => {
  const text = ui.curl.textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const range = document.createRange(); // no clipboard API (plain http): select it for Ctrl+C
    range.selectNodeContents(ui.curl);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    toast("Selected: press Ctrl+C to copy.", "info");
    return;
  }
  ui.copyCurl.textContent = "Copied";
  setTimeout(() => (ui.copyCurl.textContent = "Copy curl"), 1500);
});

ui.toggleParams.addEventListener("click", () => {
  const open = ui.toggleParams.getAttribute("aria-expanded") !== "true";
  ui.toggleParams.setAttribute("aria-expanded", String(open));
  ui.toggleParams.textContent = open ? "Hide" : "Show";
  document.body.classList.toggle("params-open", open);
});

if (/Mac|iPhone|iPad/.test(navigator.platform || navigator.userAgent)) {
  for (const kbd of document.querySelectorAll(".shortcut")) kbd.textContent = "⌘ ⏎";
}

updateButtons();
loadModels({ reset: true });
