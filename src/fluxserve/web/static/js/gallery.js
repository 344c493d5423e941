// The gallery of images made in this tab, and the viewer dialog that shows one with its parameters.

import { el, formatSeconds } from "./format.js";

export class Gallery {
  constructor({ list, count, empty, viewer, onUse, onEdit }) {
    this.list = list;
    this.count = count;
    this.empty = empty;
    this.viewer = viewer;
    this.onUse = onUse;
    this.images = [];
    this.current = null;
    viewer.querySelector("#viewer-use").addEventListener("click", () => {
      if (this.current) this.onUse(this.current);
      viewer.close();
    });
    viewer.querySelector("#viewer-edit").addEventListener("click", () => {
      if (this.current) onEdit(this.current);
      viewer.close();
    });
  }

  add(image) {
    this.images.push(image);
    const number = this.images.length;
    const button = el("button", { type: "button", class: "thumb", "aria-label": `Open image ${number}: ${image.prompt}` },
      el("img", { src: image.url, alt: "", loading: "lazy" }),
      el("span", { class: "thumb-meta", text: `${image.params.width}×${image.params.height} · ${image.seed}` }));
    button.addEventListener("click", () => this.open(image));
    this.list.prepend(el("li", { title: image.prompt }, button));
    this.count.textContent = `(${number})`;
    this.empty.hidden = true;
  }

  open(image) {
    this.current = image;
    const v = this.viewer;
    const img = v.querySelector("#viewer-image");
    img.src = image.url;
    img.alt = `Generated image for: ${image.prompt}`;
    v.querySelector("#viewer-title").textContent = `${image.model} · seed ${image.seed}`;
    v.querySelector("#viewer-prompt").textContent = image.prompt;
    const download = v.querySelector("#viewer-download");
    download.href = image.url;
    download.download = image.filename;
    const p = image.params;
    const rows = [
      ["Model", image.model],
      ["Size", `${p.width}×${p.height}`],
      ["Steps", p.num_inference_steps],
      ["Guidance", p.guidance_scale],
      ["Seed", image.seed],
      ["Max sequence length", p.max_sequence_length],
      ["Negative prompt", p.negative_prompt],
      ["LoRA", (p.loras || []).map((l) => `${l.name} ×${l.scale}`).join(", ")],
      ["Server time", Number.isFinite(image.timing.total) ? formatSeconds(image.timing.total) : null],
      ["Request id", image.requestId],
    ];
    const dl = v.querySelector("#viewer-params");
    dl.replaceChildren(...rows.filter(([, value]) => value !== undefined && value !== null && value !== "")
      .flatMap(([key, value]) => [el("dt", { text: key }), el("dd", { text: String(value) })]));
    v.showModal();
  }
}
