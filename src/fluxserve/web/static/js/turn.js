// One turn of the conversation: the prompt the user sent and the server's answer as it streams in.

import { TIMING_STAGES, el, formatSeconds, slug } from "./format.js";

const STATE_LABELS = {
  sending: "Sending…",
  queued: "Queued",
  running: "Running",
  done: "Done",
  error: "Failed",
  cancelled: "Cancelled",
};

export class Turn {
  /**
   * @param {HTMLTemplateElement} template
   * @param {object} request  the body sent (prompt, model, width, height, steps, guidance, seed, n…)
   * @param {object} handlers onCancel(turn), onSameSeed(turn, seed), onVary(turn), onRetry(turn), onImage(turn, image)
   */
  constructor(template, request, handlers) {
    this.request = request;
    this.handlers = handlers;
    this.images = [];
    this.state = "sending";
    this.startedAt = performance.now();
    this.node = template.content.firstElementChild.cloneNode(true);
    this.node.dataset.requestId = request.request_id;
    const q = (selector) => this.node.querySelector(selector);
    this.reply = q(".bubble-reply");
    this.stateLabel = q(".state-label");
    this.elapsed = q(".elapsed");
    this.progress = q(".progress");
    this.preview = q(".preview");
    this.previewImage = q(".preview-image");
    this.previewLabel = q(".preview-label");
    this.errorBox = q(".error");
    this.imagesBox = q(".images");
    this.actions = q(".actions");
    this.cancelButton = q(".cancel-one");

    q(".prompt-text").textContent = request.prompt;
    const chips = q(".chips");
    for (const text of describe(request)) chips.append(el("li", { text }));

    this.cancelButton.addEventListener("click", () => handlers.onCancel(this));
    q(".same-seed").addEventListener("click", () => handlers.onSameSeed(this, this.images[0]?.seed));
    q(".vary").addEventListener("click", () => handlers.onVary(this));
    q(".retry").addEventListener("click", () => handlers.onRetry(this));
    this.progress.removeAttribute("value"); // indeterminate until the first progress event
    this.setState("sending");
    this.timer = setInterval(() => this.tick(), 100);
  }

  get active() {
    return this.state === "sending" || this.state === "queued" || this.state === "running";
  }

  tick() {
    this.elapsed.textContent = formatSeconds((performance.now() - this.startedAt) / 1000);
  }

  setState(state, detail = "") {
    this.state = state;
    this.reply.dataset.state = state;
    this.stateLabel.textContent = detail ? `${STATE_LABELS[state]} · ${detail}` : STATE_LABELS[state];
    const active = this.active;
    this.reply.setAttribute("aria-busy", String(active));
    this.cancelButton.hidden = !active;
    if (!active) {
      clearInterval(this.timer);
      this.tick();
      this.progress.hidden = true;
      this.preview.hidden = this.images.length > 0 || state !== "cancelled" || !this.previewImage.src;
    }
  }

  /** The user asked to cancel; the server's answer (an error event "cancelled") ends the turn. */
  markCancelling() {
    this.cancelling = true;
    this.cancelButton.disabled = true;
    this.stateLabel.textContent = "Cancelling…";
  }

  /** image_generation.progress: {status, step, total, queue_position} */
  onProgress({ status, step = 0, total = 0, queue_position: position }) {
    if (!this.active) return;
    if (this.cancelling) {
      if (status !== "queued") this.lastStep = { step, total };
      return;
    }
    if (status === "queued") {
      this.setState("queued", position ? `position ${position}` : "");
      this.progress.removeAttribute("value");
      return;
    }
    this.lastStep = { step, total };
    this.setState("running", total ? `step ${step} / ${total}` : "");
    this.progress.max = Math.max(1, total);
    this.progress.value = step;
    this.progress.setAttribute("aria-valuetext", `step ${step} of ${total}`);
  }

  /** image_generation.partial_image: the image the model predicts so far, at the requested size. */
  onPartial(url, { step, partial_image_index: index }) {
    if (!this.active) return;
    if (this.previewImage.src.startsWith("blob:")) URL.revokeObjectURL(this.previewImage.src);
    this.previewImage.src = url;
    this.node.dataset.previews = String(Number(this.node.dataset.previews || 0) + 1);
    this.previewLabel.textContent = `Preview ${Number(index) + 1}${step ? ` · step ${step}` : ""}`;
    this.preview.hidden = false;
  }

  /** image_generation.completed: one finished image. */
  addImage(url, data) {
    const params = data.params || {};
    const width = params.width || this.request.width;
    const height = params.height || this.request.height;
    const image = {
      url,
      seed: String(data.seed ?? params.seed),
      prompt: this.request.prompt,
      model: this.request.model,
      params,
      timing: data.timing || {},
      savedPath: data.saved_path || null,
      requestId: data.request_id || this.request.request_id,
      format: data.output_format || "png",
      index: this.images.length,
      filename: `fluxserve-${slug(this.request.prompt, 32)}-${data.seed ?? params.seed}.${data.output_format || "png"}`
        .replace(/\.jpeg$/, ".jpg"),
    };
    this.images.push(image);
    this.preview.hidden = true;
    if (this.previewImage.src.startsWith("blob:")) URL.revokeObjectURL(this.previewImage.src);
    this.previewImage.removeAttribute("src");

    const img = el("img", { src: url, alt: `Generated image for: ${this.request.prompt}`, width, height,
                            class: Math.max(width, height) < 256 ? "pixelated" : null });
    const caption = el("figcaption", {},
      el("span", { class: "seed" }, "Seed ", el("code", { class: "seed-value", text: String(image.seed) })),
      el("span", { class: "meta", text: `${width}×${height} · ${params.num_inference_steps ?? "?"} steps` }),
      el("a", { class: "btn btn-small download", href: url, download: image.filename, text: "Download" }),
      el("button", { type: "button", class: "btn btn-small edit-this", text: "Edit this",
                     onclick: () => this.handlers.onEdit?.(this, image) }),
    );
    const figure = el("figure", { class: "shot" }, el("div", { class: "shot-frame" }, img), caption,
                      timingDetails(image.timing));
    if (params.fallback_applied) {
      figure.append(el("p", { class: "notice", text: `Out-of-memory fallback applied: ${params.fallback_reason || "lower resolution"}` }));
    }
    if (image.savedPath) {
      const name = image.savedPath.split(/[\\/]/).pop();
      figure.append(el("p", { class: "hint saved", title: image.savedPath, text: `Saved on the server as ${name}` }));
    }
    this.imagesBox.append(figure);
    this.imagesBox.classList.toggle("multi", (this.request.n || 1) > 1);
    this.handlers.onImage(this, image);
  }

  finish() {
    if (!this.active) return;
    if (this.images.length === 0) {
      this.fail({ message: "the stream ended without an image", code: "incomplete_stream" });
      return;
    }
    this.setState("done", this.images.length > 1 ? `${this.images.length} images` : "");
    this.actions.hidden = false;
    this.actions.querySelector(".retry").hidden = true;
  }

  cancelled() {
    if (!this.active) return;
    const at = this.lastStep?.step > 0 ? `at step ${this.lastStep.step} / ${this.lastStep.total}` : "";
    this.setState("cancelled", at);
    this.actions.hidden = false;
    this.showOnly(".retry");
  }

  /** error: an ApiError, or the {message, type, param, code} of an SSE error event. */
  fail(error) {
    if (error && error.code === "cancelled") {
      this.cancelled();
      return;
    }
    if (!this.active) return;
    const status = error.status ? `HTTP ${error.status}` : "";
    this.errorBox.replaceChildren(
      el("p", { class: "error-message", text: error.message || "unknown error" }),
      el("p", { class: "error-meta" },
        status ? el("span", { text: status }) : null,
        error.code ? el("span", {}, "code ", el("code", { class: "error-code", text: error.code })) : null,
        error.param ? el("span", {}, "param ", el("code", { class: "error-param", text: error.param })) : null,
        error.retryAfter ? el("span", { text: `retry after ${error.retryAfter} s` }) : null,
      ),
    );
    this.errorBox.hidden = false;
    this.setState("error", error.code === "network_error" ? "network" : "");
    this.actions.hidden = false;
    this.showOnly(".retry");
  }

  showOnly(selector) {
    for (const button of this.actions.querySelectorAll("button")) button.hidden = !button.matches(selector);
  }
}

/** The chips under the prompt: what was asked for. */
function describe(request) {
  const chips = [request.model, `${request.width}×${request.height}`, `${request.num_inference_steps} steps`];
  const guidance = request.guidance_scale ?? request.true_cfg_scale;
  if (guidance !== undefined) chips.push(`${request.true_cfg_scale !== undefined ? "cfg" : "guidance"} ${guidance}`);
  chips.push(request.seed !== undefined ? `seed ${request.seed}` : "random seed");
  if (request.n > 1) chips.push(`${request.n} images`);
  for (const lora of request.loras || []) chips.push(`LoRA ${lora.name} ×${lora.scale}`);
  return chips;
}

/** Stage timings as a stacked bar and a list; total first. */
export function timingDetails(timing) {
  const stages = TIMING_STAGES.filter(([key]) => Number.isFinite(timing[key]));
  const sum = stages.reduce((acc, [key]) => acc + timing[key], 0) || 1;
  const bar = el("div", { class: "timing-bar", "aria-hidden": "true" });
  const list = el("dl", { class: "kv timing-list" });
  stages.forEach(([key, label], i) => {
    const value = timing[key];
    const segment = el("span", { class: `seg seg-${i}`, title: `${label}: ${formatSeconds(value)}` });
    segment.style.flexGrow = String(Math.max(value / sum, 0.004));
    bar.append(segment);
    list.append(el("dt", {}, el("span", { class: `swatch seg-${i}` }), label),
                el("dd", { text: formatSeconds(value) }));
  });
  const total = Number.isFinite(timing.total) ? timing.total : sum;
  return el("details", { class: "timing" },
    el("summary", {}, "Server time ", el("strong", { class: "timing-total", text: formatSeconds(total) })),
    bar, list);
}
