// The HTTP client: API base and key, OpenAI-shaped errors, and streamed generations (SSE over fetch).

import { encodeJSON, parseJSON } from "./format.js";
import { parseSSE } from "./sse.js";

/** An error as the server sent it: {"error": {"message", "type", "param", "code"}} plus the HTTP status. */
export class ApiError extends Error {
  constructor(status, { message, type = null, param = null, code = null } = {}, retryAfter = null) {
    super(message || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  get isAuth() {
    return this.status === 401;
  }
}

/** Read an error body, whatever shape it has (a proxy in front of the server may answer HTML). */
async function errorFrom(response) {
  const retryAfter = response.headers.get("retry-after");
  let detail = { message: `${response.status} ${response.statusText}`.trim() };
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error) detail = body.error;
    else if (body && typeof body.error === "string") detail = { message: body.error };
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, detail, retryAfter);
}

export class ApiClient {
  constructor({ base = "", key = "" } = {}) {
    this.configure({ base, key });
  }

  configure({ base = "", key = "" }) {
    this.base = normalizeBase(base);
    this.key = key || "";
  }

  /** Absolute URL of an API path, for display (curl) and requests. */
  url(path) {
    return (this.base || window.location.origin) + path;
  }

  get crossOrigin() {
    return Boolean(this.base) && this.base !== window.location.origin;
  }

  headers(extra = {}) {
    const headers = { Accept: "application/json", ...extra };
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    return headers;
  }

  async fetch(path, { method = "GET", body, signal, accept } = {}) {
    const init = { method, signal, headers: this.headers(accept ? { Accept: accept } : {}), cache: "no-store" };
    if (body !== undefined) {
      init.body = encodeJSON(body);
      init.headers["Content-Type"] = "application/json";
    }
    let response;
    try {
      response = await fetch(this.url(path), init);
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      const where = this.base || window.location.origin;
      const hint = this.crossOrigin ? " (is the server running, and does FLUX_CORS_ORIGINS allow this page?)" : "";
      throw new ApiError(0, { message: `could not reach the API at ${where}${hint}`, code: "network_error" });
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async json(path, options = {}) {
    const response = await this.fetch(path, options);
    const type = response.headers.get("content-type") || "";
    if (!type.includes("json")) {
      throw new ApiError(response.status, {
        message: `expected JSON from ${path} but got ${type || "no content type"}: is the API base right?`,
        code: "not_json",
      });
    }
    return parseJSON(await response.text());
  }

  models() {
    return this.json("/v1/models");
  }

  selectModel(model, signal) {
    return this.json("/v1/models/select", { method: "POST", body: { model }, signal });
  }

  loras(signal) {
    return this.json("/v1/loras", { signal });
  }

  tokenize(prompt, model, signal) {
    return this.json("/v1/tokenize", { method: "POST", body: { prompt, model }, signal });
  }

  releaseMemory(all = false) {
    return this.json("/v1/memory/release", { method: "POST", body: { all } });
  }

  cancel(requestId) {
    return this.json("/v1/images/cancel", { method: "POST", body: { request_id: requestId } });
  }

  /**
   * POST a streamed generation (with progress events) and call onEvent(type, data) for each server-sent event.
   * Resolves when the stream ends; rejects with ApiError for HTTP errors (before the stream starts).
   */
  async generate(body, { signal, onEvent }) {
    return this.streamed("/v1/images/generations", body, { signal, onEvent });
  }

  /** A streamed edit (POST /v1/images/edits with images as data URLs); events as for generate(). */
  async edit(body, { signal, onEvent }) {
    return this.streamed("/v1/images/edits", body, { signal, onEvent });
  }

  async streamed(path, body, { signal, onEvent }) {
    // Only OpenAI's partial_image / completed / error events stream by default; the page also shows the queue
    // position and the step, so it asks for the progress events too.
    const response = await this.fetch(path, {
      method: "POST", body: { ...body, stream: true, stream_progress: true }, signal, accept: "text/event-stream",
    });
    const type = response.headers.get("content-type") || "";
    if (!type.includes("text/event-stream")) {
      // A server that ignored "stream": answer as if it had streamed the images.
      const result = parseJSON(await response.text());
      for (const item of result.data || []) onEvent("image_generation.completed", item);
      return;
    }
    for await (const { event, data } of parseSSE(response.body, signal)) {
      if (data === "[DONE]") return;
      let payload;
      try {
        payload = parseJSON(data);
      } catch {
        continue; // a comment or keep-alive line
      }
      onEvent(event || payload.type || "message", payload);
    }
  }
}

export function normalizeBase(base) {
  const text = String(base || "").trim();
  if (!text) return "";
  const url = new URL(text, window.location.href);
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new TypeError("the API base must be an http:// or https:// URL");
  }
  return (url.origin + url.pathname).replace(/\/+$/, "");
}

/** A request id the server accepts ([A-Za-z0-9._:-]{1,128}); works outside secure contexts too. */
export function newRequestId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
