// Small pure helpers: DOM building, number formatting, curl commands, base64 images.

/** el("li", {class: "x", text: "hi"}, child, ...) */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function formatSeconds(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  if (seconds < 0.01) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 10) return `${seconds.toFixed(2)} s`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

export function formatBytes(bytes) {
  if (!Number.isFinite(bytes)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/** The server's stage timings, in pipeline order, with the names people read. */
export const TIMING_STAGES = [
  ["queue_wait", "Queue"],
  ["model_load", "Model load"],
  ["text_encode", "Text encode"],
  ["denoise", "Denoise"],
  ["vae_decode", "VAE decode"],
  ["image_encode", "Image encode"],
  ["save", "Save"],
];

export function shellQuote(text) {
  return `'${String(text).replace(/'/g, `'\\''`)}'`;
}

/**
 * Seeds go up to 2**63 - 1, beyond the integers a JS number holds exactly (2**53). The page keeps
 * them as decimal strings: parseJSON quotes long "seed" integers before parsing, encodeJSON writes
 * digit-string seeds back as JSON numbers.
 */
export function parseJSON(text) {
  return JSON.parse(text.replace(/("seed"\s*:\s*)(\d{16,})/g, '$1"$2"'));
}

export function encodeJSON(body) {
  const { seed, ...rest } = body;
  const text = JSON.stringify(rest);
  if (seed === undefined || seed === null || seed === "") return text;
  const value = /^\d+$/.test(String(seed)) ? String(seed) : JSON.stringify(seed);
  return `${text.slice(0, -1)}${text.length > 2 ? "," : ""}"seed":${value}}`;
}

/** A curl command that repeats a generation request (without the page's streaming fields). */
export function curlCommand(url, body, { auth = false } = {}) {
  const lines = [`curl -sS ${shellQuote(url)}`, `  -H 'Content-Type: application/json'`];
  if (auth) lines.push(`  -H "Authorization: Bearer $FLUX_API_KEY"`);
  lines.push(`  -d ${shellQuote(encodeJSON(body))}`);
  return lines.join(" \\\n");
}

export function base64ToBlob(b64, type = "image/png") {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes], { type });
}

export function mediaType(format) {
  return { jpeg: "image/jpeg", jpg: "image/jpeg", webp: "image/webp" }[format] || "image/png";
}

export function slug(text, max = 40) {
  const cleaned = String(text).toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "");
  return cleaned.slice(0, max).replace(/-+$/, "") || "image";
}

export function debounce(fn, wait) {
  let timer = null;
  const debounced = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), wait);
  };
  debounced.cancel = () => clearTimeout(timer);
  return debounced;
}
