// The edit panel: input images (drop, paste, pick, or "Edit this" on a result), a mask painted over the first
// image with brush and eraser (undo, clear, size), and the strength slider. It turns into the body of
// POST /v1/images/edits: images as data URLs, the mask as a PNG whose transparent pixels mark the area to change.

import { el } from "./format.js";

const MAX_IMAGES = 16;
const ACCEPTED = ["image/png", "image/jpeg", "image/webp"];

export class EditPanel {
  constructor({ root, onChange, onError }) {
    this.root = root;
    this.onChange = onChange;
    this.onError = onError;
    this.images = []; // {dataUrl, name, width, height}
    this.strokes = []; // {mode: "brush"|"eraser", size, points: [[x, y], ...]} in image pixels
    this.mode = "brush";
    this.drawing = null;
    const q = (id) => root.querySelector(`#${id}`);
    this.drop = q("edit-drop");
    this.fileInput = q("edit-files");
    this.thumbs = q("edit-thumbs");
    this.stage = q("mask-stage");
    this.base = q("mask-base");
    this.canvas = q("mask-canvas");
    this.tools = q("mask-tools");
    this.brushSize = q("brush-size");
    this.strength = q("strength");
    this.strengthValue = q("strength-value");
    this.brushButton = q("tool-brush");
    this.eraserButton = q("tool-eraser");
    this.undoButton = q("mask-undo");
    this.clearButton = q("mask-clear");
    this.wire();
    this.render();
  }

  get active() {
    return this.images.length > 0;
  }

  get hasMask() {
    return this.strokes.some((s) => s.mode === "brush");
  }

  wire() {
    this.fileInput.addEventListener("change", () => {
      this.addFiles([...this.fileInput.files]);
      this.fileInput.value = "";
    });
    this.drop.addEventListener("click", (event) => {
      if (event.target === this.drop || event.target.closest(".drop-hint")) this.fileInput.click();
    });
    this.drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        this.fileInput.click();
      }
    });
    for (const type of ["dragenter", "dragover"]) {
      this.drop.addEventListener(type, (event) => {
        event.preventDefault();
        this.drop.classList.add("dragging");
      });
    }
    this.drop.addEventListener("dragleave", () => this.drop.classList.remove("dragging"));
    this.drop.addEventListener("drop", (event) => {
      event.preventDefault();
      this.drop.classList.remove("dragging");
      this.addFiles([...(event.dataTransfer?.files || [])]);
    });
    document.addEventListener("paste", (event) => {
      const files = [...(event.clipboardData?.items || [])].filter((i) => i.kind === "file").map((i) => i.getAsFile());
      if (files.length) {
        event.preventDefault();
        this.addFiles(files);
      }
    });
    this.brushButton.addEventListener("click", () => this.setMode("brush"));
    this.eraserButton.addEventListener("click", () => this.setMode("eraser"));
    this.undoButton.addEventListener("click", () => {
      this.strokes.pop();
      this.redraw();
    });
    this.clearButton.addEventListener("click", () => {
      this.strokes = [];
      this.redraw();
    });
    this.strength.addEventListener("input", () => {
      this.strengthValue.textContent = Number(this.strength.value).toFixed(2);
    });
    this.root.querySelector("#edit-clear").addEventListener("click", () => this.clear());
    this.canvas.addEventListener("pointerdown", (event) => this.startStroke(event));
    this.canvas.addEventListener("pointermove", (event) => this.extendStroke(event));
    for (const type of ["pointerup", "pointercancel", "pointerleave"]) {
      this.canvas.addEventListener(type, () => this.endStroke());
    }
  }

  setMode(mode) {
    this.mode = mode;
    this.brushButton.setAttribute("aria-pressed", String(mode === "brush"));
    this.eraserButton.setAttribute("aria-pressed", String(mode === "eraser"));
  }

  async addFiles(files) {
    for (const file of files) {
      if (!file) continue;
      if (!ACCEPTED.includes(file.type)) {
        this.onError(`${file.name || "the pasted file"} is not a PNG, JPEG or WebP image`);
        continue;
      }
      if (this.images.length >= MAX_IMAGES) {
        this.onError(`at most ${MAX_IMAGES} images`);
        break;
      }
      await this.addDataUrl(await readAsDataUrl(file), file.name || "pasted image");
    }
  }

  /** Add an image from a data: or blob: URL (a result's "Edit this" passes its blob URL). Read through an <img>
   * and a canvas, not fetch(): the page's Content-Security-Policy allows blob: images but no blob: connections. */
  async addUrl(url, name) {
    const img = await loadImage(url);
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    canvas.getContext("2d").drawImage(img, 0, 0);
    await this.addDataUrl(canvas.toDataURL("image/png"), name);
  }

  async addDataUrl(dataUrl, name) {
    const img = await loadImage(dataUrl);
    const first = this.images.length === 0;
    this.images.push({ dataUrl, name, width: img.naturalWidth, height: img.naturalHeight });
    if (first) this.strokes = [];
    this.render();
  }

  remove(index) {
    this.images.splice(index, 1);
    if (index === 0) this.strokes = [];
    this.render();
  }

  clear() {
    this.images = [];
    this.strokes = [];
    this.render();
  }

  render() {
    this.thumbs.replaceChildren(...this.images.map((image, index) => el("li", { class: "edit-thumb" },
      el("img", { src: image.dataUrl, alt: `Input image ${index + 1}: ${image.name}` }),
      el("button", { type: "button", class: "btn btn-small btn-quiet", "aria-label": `Remove input image ${index + 1}`,
                     text: "✕", onclick: () => this.remove(index) }))));
    const first = this.images[0];
    this.stage.hidden = !first;
    this.tools.hidden = !first;
    this.root.querySelector("#edit-clear").hidden = !first;
    this.root.classList.toggle("editing", Boolean(first));
    if (first) {
      this.base.src = first.dataUrl;
      this.canvas.width = first.width;
      this.canvas.height = first.height;
      this.stage.style.setProperty("--aspect", `${first.width} / ${first.height}`);
    }
    this.redraw();
  }

  // --- painting ------------------------------------------------------------------------------------
  point(event) {
    const rect = this.canvas.getBoundingClientRect();
    return [(event.clientX - rect.left) * (this.canvas.width / rect.width),
            (event.clientY - rect.top) * (this.canvas.height / rect.height)];
  }

  startStroke(event) {
    if (!this.active) return;
    event.preventDefault();
    this.canvas.setPointerCapture?.(event.pointerId);
    const rect = this.canvas.getBoundingClientRect();
    const size = Number(this.brushSize.value) * (this.canvas.width / rect.width);
    this.drawing = { mode: this.mode, size, points: [this.point(event)] };
    this.strokes.push(this.drawing);
    this.redraw();
  }

  extendStroke(event) {
    if (!this.drawing) return;
    this.drawing.points.push(this.point(event));
    this.redraw();
  }

  endStroke() {
    if (this.drawing) this.onChange();
    this.drawing = null;
  }

  redraw() {
    const ctx = this.canvas.getContext("2d");
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    for (const stroke of this.strokes) {
      ctx.globalCompositeOperation = stroke.mode === "eraser" ? "destination-out" : "source-over";
      ctx.strokeStyle = "rgb(255, 40, 90)";
      ctx.fillStyle = "rgb(255, 40, 90)";
      ctx.lineWidth = stroke.size;
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      const [x0, y0] = stroke.points[0];
      if (stroke.points.length === 1) {
        ctx.arc(x0, y0, stroke.size / 2, 0, Math.PI * 2);
        ctx.fill();
        continue;
      }
      ctx.moveTo(x0, y0);
      for (const [x, y] of stroke.points.slice(1)) ctx.lineTo(x, y);
      ctx.stroke();
    }
    ctx.globalCompositeOperation = "source-over";
    this.undoButton.disabled = this.strokes.length === 0;
    this.clearButton.disabled = this.strokes.length === 0;
    this.root.querySelector("#mask-state").textContent = this.hasMask
      ? "Painted areas change; the rest is kept." : "No mask: the whole image may change.";
  }

  /** OpenAI's mask: opaque where the image stays, transparent where it was painted. */
  maskDataUrl() {
    if (!this.hasMask) return null;
    const { width, height } = this.canvas;
    const painted = this.canvas.getContext("2d").getImageData(0, 0, width, height);
    const out = new ImageData(width, height);
    for (let i = 0; i < painted.data.length; i += 4) {
      out.data[i + 3] = 255 - painted.data[i + 3];
    }
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").putImageData(out, 0, 0);
    return canvas.toDataURL("image/png");
  }

  /** The edit fields of the request body. */
  fields({ usesStrength }) {
    const body = { image: this.images.map((image) => image.dataUrl), size: "auto" };
    const mask = this.maskDataUrl();
    if (mask) body.mask = mask;
    if (usesStrength) body.strength = Number(this.strength.value);
    return body;
  }
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not read this image"));
    img.src = src;
  });
}
