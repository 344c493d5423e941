// The parameter panel: presets from the model card, size/steps/guidance/seed fields, toggles.

import { el } from "./format.js";

const PRESET_ORDER = ["low", "medium", "high", "wide"];

/** Which input shows the value a server error's `param` names. */
const PARAM_FIELDS = {
  width: "width", height: "height", size: "width", num_inference_steps: "steps", quality: "steps",
  guidance_scale: "guidance", true_cfg_scale: "guidance", seed: "seed", n: "count", prompt: "prompt",
  negative_prompt: "negative-prompt", model: "model-select", loras: "lora-list",
};

export class ParamsForm {
  constructor(doc, { onChange }) {
    const $ = (id) => doc.getElementById(id);
    this.doc = doc;
    this.fields = {
      width: $("width"), height: $("height"), steps: $("steps"), guidance: $("guidance"), seed: $("seed"),
      count: $("count"), negative: $("negative-prompt"), storeLocal: $("store-local"),
      writeMetadata: $("write-metadata"),
    };
    this.presetList = $("preset-list");
    this.guidanceLabel = $("guidance-label");
    this.negativeField = $("negative-field");
    this.description = $("model-description");
    this.summary = $("params-summary");
    this.card = null;
    this.onChange = onChange;
    this.loraField = $("lora-field");
    this.loraList = $("lora-list");

    for (const input of Object.values(this.fields)) {
      input.addEventListener("input", () => {
        this.clearInvalid(input);
        this.syncPreset();
        this.onChange();
      });
    }
    this.fields.storeLocal.addEventListener("change", () => this.syncToggles());
    $("clear-seed").addEventListener("click", () => {
      this.fields.seed.value = "";
      this.clearInvalid(this.fields.seed);
      this.onChange();
    });
    this.presetList.addEventListener("change", (event) => {
      const preset = this.card?.presets?.[event.target.value];
      if (!preset) return;
      this.setValues({ width: preset.width, height: preset.height, num_inference_steps: preset.num_inference_steps });
      this.onChange();
    });
  }

  /** Show a model's presets, defaults and guidance naming; reset the values to its defaults. */
  applyModel(card, runtime, { reset = true } = {}) {
    this.card = card;
    const d = card.defaults || {};
    const limits = runtime?.limits || {};
    const multiple = d.size_multiple || 1;
    for (const name of ["width", "height"]) {
      const input = this.fields[name];
      input.step = String(multiple);
      if (limits.min_size) input.min = String(limits.min_size);
      if (limits.max_size) input.max = String(limits.max_size);
    }
    if (limits.max_steps) this.fields.steps.max = String(limits.max_steps);
    if (limits.max_guidance) this.fields.guidance.max = String(limits.max_guidance);
    if (limits.max_images_per_request) this.fields.count.max = String(limits.max_images_per_request);

    const qwenStyle = card.guidance_parameter === "true_cfg_scale";
    this.guidanceLabel.textContent = qwenStyle ? "True CFG scale" : "Guidance";
    this.negativeField.hidden = !(qwenStyle || d.negative_prompt !== null && d.negative_prompt !== undefined);
    this.fields.negative.placeholder = d.negative_prompt && d.negative_prompt.trim()
      ? d.negative_prompt : "model default";
    const licence = card.licence ? `Licence: ${card.licence}${card.commercial_use === false ? " (no commercial use)" : ""}` : "";
    this.description.textContent = [card.description, licence, card.gated ? "gated (needs HF_TOKEN)" : ""]
      .filter(Boolean).join(" · ");

    this.presetList.replaceChildren();
    const rank = (name) => (PRESET_ORDER.includes(name) ? PRESET_ORDER.indexOf(name) : PRESET_ORDER.length);
    const names = Object.keys(card.presets || {}).sort((a, b) => rank(a) - rank(b));
    for (const name of names) {
      const p = card.presets[name];
      const id = `preset-${name}`;
      this.presetList.append(
        el("input", { type: "radio", name: "preset", id, value: name, class: "visually-hidden" }),
        el("label", { for: id, class: "segment" },
          el("span", { class: "segment-name", text: name }),
          el("span", { class: "segment-meta", text: `${p.width}×${p.height} · ${p.num_inference_steps} steps` })));
    }
    if (reset) {
      this.setValues({ width: d.width, height: d.height, num_inference_steps: d.num_inference_steps,
                       guidance: d.guidance_scale });
      this.fields.negative.value = "";
    }
    if (runtime && typeof runtime.store_local === "boolean" && reset) {
      this.fields.storeLocal.checked = runtime.store_local;
    }
    this.syncToggles();
    this.syncPreset();
  }

  /**
   * The LoRA picker: the library's adapters for this model's family (and, for adapters made for one model,
   * that model), each with a checkbox and a scale slider. Hidden when none fits.
   */
  setLoras(library, card) {
    const fits = (library?.data || []).filter((a) => (!a.family || a.family === card.family)
      && (!a.base_model || a.base_model === card.id));
    const chosen = new Map(this.readLoras().map((l) => [l.name, l.scale]));
    const max = library?.limits?.max_scale || 2;
    this.loraList.replaceChildren(...fits.map((adapter, index) => {
      const id = `lora-${index}`;
      const check = el("input", { type: "checkbox", id, class: "lora-check", value: adapter.name });
      check.checked = chosen.has(adapter.name);
      const slider = el("input", { type: "range", class: "lora-scale", min: String(-max), max: String(max),
                                   step: "0.05", value: String(chosen.get(adapter.name) ?? 1),
                                   "aria-label": `Scale of ${adapter.name}` });
      const shown = el("output", { class: "lora-value", text: Number(slider.value).toFixed(2) });
      slider.addEventListener("input", () => {
        shown.textContent = Number(slider.value).toFixed(2);
        check.checked = true;
        this.onChange();
      });
      check.addEventListener("change", () => this.onChange());
      return el("li", { class: "lora-row", title: `rank ${adapter.rank} · ${adapter.target_modules.join(", ")}` },
        check, el("label", { for: id, class: "lora-name", text: adapter.name }), slider, shown);
    }));
    this.loraField.hidden = fits.length === 0 || library?.available === false;
  }

  /** The chosen adapters as the API takes them: [{name, scale}]. */
  readLoras() {
    if (!this.loraList) return [];
    return [...this.loraList.querySelectorAll(".lora-row")]
      .filter((row) => row.querySelector(".lora-check").checked)
      .map((row) => ({ name: row.querySelector(".lora-check").value,
                       scale: Number(row.querySelector(".lora-scale").value) }));
  }

  setValues(values) {
    const f = this.fields;
    const set = (input, value) => {
      if (value === undefined) return;
      input.value = value === null ? "" : String(value);
      this.clearInvalid(input);
    };
    set(f.width, values.width);
    set(f.height, values.height);
    set(f.steps, values.num_inference_steps);
    set(f.guidance, values.guidance);
    set(f.seed, values.seed);
    if (values.negative_prompt !== undefined) set(f.negative, values.negative_prompt);
    this.syncPreset();
  }

  /** Check the preset radio that matches the current values, if any. */
  syncPreset() {
    const f = this.fields;
    let matched = null;
    for (const [name, p] of Object.entries(this.card?.presets || {})) {
      if (Number(f.width.value) === p.width && Number(f.height.value) === p.height
          && Number(f.steps.value) === p.num_inference_steps) {
        matched = name;
        break;
      }
    }
    for (const radio of this.presetList.querySelectorAll("input")) radio.checked = radio.value === matched;
    const seed = f.seed.value.trim() ? `seed ${f.seed.value.trim()}` : "random seed";
    this.summary.textContent = `${matched ? `${matched} · ` : ""}${f.width.value || "?"}×${f.height.value || "?"}`
      + ` · ${f.steps.value || "?"} steps · ${seed}`;
  }

  syncToggles() {
    const meta = this.fields.writeMetadata;
    meta.disabled = !this.fields.storeLocal.checked;
    meta.closest("label").classList.toggle("disabled", meta.disabled);
  }

  /** The generation fields as the API names them; empty fields are left out (server defaults). */
  read() {
    const f = this.fields;
    const num = (input) => {
      const text = input.value.trim();
      if (text === "") return undefined;
      const value = Number(text);
      return Number.isFinite(value) ? value : text; // let the server explain what is wrong with it
    };
    const body = {
      width: num(f.width),
      height: num(f.height),
      num_inference_steps: num(f.steps),
    };
    const guidance = num(f.guidance);
    if (guidance !== undefined) body[this.card?.guidance_parameter || "guidance_scale"] = guidance;
    const seed = f.seed.value.trim(); // a string: seeds can exceed what a JS number holds exactly
    if (seed !== "") body.seed = /^\d+$/.test(seed) ? seed.replace(/^0+(?=\d)/, "") : num(f.seed);
    const n = num(f.count);
    if (n !== undefined && n !== 1) body.n = n;
    if (!this.negativeField.hidden && f.negative.value !== "") body.negative_prompt = f.negative.value;
    const loras = this.loraField.hidden ? [] : this.readLoras();
    if (loras.length) body.loras = loras;
    body.store_local = f.storeLocal.checked;
    body.write_metadata = f.storeLocal.checked && f.writeMetadata.checked;
    return body;
  }

  /** Point at the field a server error names; returns the input, if one matches. */
  markInvalid(param, message) {
    const id = PARAM_FIELDS[param];
    const input = id && this.doc.getElementById(id);
    if (!input) return null;
    input.setAttribute("aria-invalid", "true");
    const errorId = `${input.id}-error`;
    let note = this.doc.getElementById(errorId);
    if (!note) {
      note = el("small", { id: errorId, class: "field-error" });
      (input.closest(".input-row") || input).after(note);
    }
    note.textContent = message;
    const described = new Set((input.getAttribute("aria-describedby") || "").split(/\s+/).filter(Boolean));
    described.add(errorId);
    input.setAttribute("aria-describedby", [...described].join(" "));
    return input;
  }

  clearInvalid(input) {
    if (!input || input.getAttribute("aria-invalid") !== "true") return;
    input.removeAttribute("aria-invalid");
    const errorId = `${input.id}-error`;
    this.doc.getElementById(errorId)?.remove();
    const described = (input.getAttribute("aria-describedby") || "").split(/\s+/).filter((x) => x && x !== errorId);
    if (described.length) input.setAttribute("aria-describedby", described.join(" "));
    else input.removeAttribute("aria-describedby");
  }

  clearAllInvalid() {
    for (const input of this.doc.querySelectorAll("[aria-invalid='true']")) this.clearInvalid(input);
  }
}
