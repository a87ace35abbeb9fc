// sdengine's web page: a form over the server's native job API (/v1/jobs, its event stream, /v1/uploads,
// /v1/images, the name lists), nothing else. Every request goes through api(), which adds the API key as a
// bearer header when the server asks for one; the event stream is read with fetch (EventSource cannot send
// headers) and images are fetched as blobs for the same reason.

import { MaskPainter } from "./mask.js";
import { imageKind, imageParameters, parseInfotext } from "./pnginfo.js";

const $ = (id) => document.getElementById(id);
const SETTINGS_KEY = "sdengine.settings.v1";
const API_KEY = "sdengine.apiKey";
const GALLERY_PAGE = 12;
const QUEUE_POLL_MS = 2000; // how often a queued job's place in the queue is asked for
const READY_RETRY_MS = 2000; // a page opened while the server was away asks for its lists again this often
const FIELDS = ["prompt", "negative_prompt", "model", "sampler", "schedule", "steps", "cfg_scale", "pag_scale",
  "pag_layers", "seed", "width", "height", "batch_size", "clip_skip", "vae_decode", "vae_encode", "vae", "strength", "mask_blur", "brush", "cn-model", "cn-pre", "cn-low", "cn-high",
  "cn-weight", "cn-start", "cn-end", "cn-rule", "cn-mode", "hr-scale", "hr-upscaler", "hr-steps", "hr-strength", "hr-resize-x", "hr-resize-y", "hr-sampler",
  "hr-schedule", "hr-prompt", "hr-negative-prompt", "seed_resize_w", "seed_resize_h",
  "strength_rule", "clip_skip_rule", "noise_multiplier", "masked_content", "differential_diffusion"];
FIELDS.push("freeu", "freeu_version", "freeu_rule"); // FreeU's factors (text: empty = off), version and rule
FIELDS.push("sag_scale", "sag_blur_sigma", "sag_rule"); // self-attention guidance (scale 0 = off)
FIELDS.push("deep_shrink", "deep_shrink_block", "deep_shrink_factor", "deep_shrink_start", "deep_shrink_end",
  "deep_shrink_after_skip", "deep_shrink_downscale", "deep_shrink_upscale"); // Deep Shrink (off, on) and its settings
FIELDS.push("hypertile", "hypertile_tile", "hypertile_swap", "hypertile_depth", "hypertile_rule",
  "hypertile_scale_depth"); // HyperTile (off, on, hires fix's second pass only) and its settings
FIELDS.push("ipa-model", "ipa-clip", "ipa-scale", "ipa-start", "ipa-end", "ipa-rule"); // the IP-Adapter unit
FIELDS.push("redux-model", "redux-strength", "redux-siglip"); // the FLUX.1 Redux unit (its image: picked each time)
// SDXL's own: the second prompts, the micro-conditioning (sizes WIDTHxHEIGHT, crops "top, left"; empty = the
// model's defaults) and the refiner hand-off (the job's sdxl, refiner, refiner_switch_at, refiner_switch_rule)
const SDXL_TEXTS = { sdxl_prompt_2: "prompt_2", sdxl_negative_prompt_2: "negative_prompt_2" };
const SDXL_SIZES = { sdxl_original_size: "original_size", sdxl_target_size: "target_size",
  sdxl_negative_original_size: "negative_original_size", sdxl_negative_target_size: "negative_target_size" };
const SDXL_CROPS = { sdxl_crop: "crops_coords_top_left", sdxl_negative_crop: "negative_crops_coords_top_left" };
const SDXL_SCORES = { sdxl_aesthetic_score: "aesthetic_score", sdxl_negative_aesthetic_score: "negative_aesthetic_score" };
const SDXL_INPUTS = { ...SDXL_TEXTS, ...SDXL_SIZES, ...SDXL_CROPS, ...SDXL_SCORES };
FIELDS.push(...Object.keys(SDXL_INPUTS), "refiner", "refiner_switch_at", "refiner_switch_rule");
// (its picture is not kept)
FIELDS.push("hypertile_vae_tile", "hypertile_vae_swap", "hypertile_vae_depth"); // HyperTile VAE's settings
FIELDS.push("distilled_cfg_scale", "shift", "slg_layers", "slg_scale", "slg_start", "slg_stop"); // SD3's, Flux's
FIELDS.push("tiled_diffusion_window", "tiled_diffusion_window_height", "tiled_diffusion_stride",
  "tiled_diffusion_batch"); // MultiDiffusion's settings
// the checkboxes kept with the settings (their value is their ticked state, not .value)
const CHECKS = ["hypertile_vae", "tiled_diffusion", "tiled_diffusion_circular"];
const SCHEDULE_LABELS = { normal: "Normal (the model's own)", karras: "Karras", exponential: "Exponential",
  sgm_uniform: "SGM Uniform", simple: "Simple", ddim_uniform: "DDIM uniform", beta: "Beta", kl_optimal: "KL Optimal",
  align_your_steps: "Align Your Steps (SDXL's table on SDXL)", align_your_steps_sdxl: "Align Your Steps, SDXL table",
  uniform: "Uniform", polyexponential: "Polyexponential", linear_quadratic: "Linear Quadratic" };
// A1111's "Schedule type" labels (lower case) of its combined sampler names ("DPM++ 2M Karras") and of a server
// too old to list them (GET /v1/samplers' schedule_labels); "Align Your Steps" is the model's own table, as in A1111
const A1111_SCHEDULES = { automatic: "normal", normal: "normal", karras: "karras", exponential: "exponential",
  "sgm uniform": "sgm_uniform", sgmuniform: "sgm_uniform", simple: "simple", ddim: "ddim_uniform", beta: "beta",
  "kl optimal": "kl_optimal", "align your steps": "align_your_steps", "align your steps sdxl": "align_your_steps_sdxl",
  uniform: "uniform",
  polyexponential: "polyexponential" };

const state = {
  samplers: [], scheduleLabels: {}, styles: [], sizes: {}, loras: [], embeddings: [], activePrompt: "prompt", tiny: {}, tinyEncoder: {}, model: null,
  lastSeed: null, jobId: null, running: false,
  cancelAsked: false, jobDone: false, jobStep: 0,
  initBlob: null, controlBlob: null, ipaBlob: null, galleryOffset: 0, galleryTotal: 0, resultUrls: [], galleryUrls: [],
};

// ------------------------------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, message, field = null) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

function authHeaders() {
  const key = localStorage.getItem(API_KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

let keyPrompt = null; // one dialog for all the requests that met a 401 at the same time
// Set when the dialog was closed without a key; until the user clicks or submits something again, a request that
// meets a 401 fails at once instead of opening the dialog again (a page-load request answered after the Escape
// once reopened it, and the dialog then hid the page the user had just uncovered).
let keyDeclined = false;
for (const kind of ["click", "submit"]) document.addEventListener(kind, () => { keyDeclined = false; }, true);

function askForKey(message) {
  if (!keyPrompt && keyDeclined) {
    return Promise.reject(new ApiError(401, 'this server needs an API key: click "API key" (top right) to give it',
      "general"));
  }
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve, reject) => {
      const dialog = $("key-dialog");
      let given = false;
      $("err-key").textContent = message || "";
      $("key-input").value = "";
      $("key-form").onsubmit = () => {
        given = true;
        localStorage.setItem(API_KEY, $("key-input").value.trim());
        $("key-button").hidden = false;
        keyPrompt = null;
        resolve();
      };
      // Escape (or any close without a key): the requests waiting on the key fail with a message, and the
      // "API key" button opens the dialog again (the promise once stayed pending and the page hung).
      dialog.onclose = () => {
        $("key-button").hidden = false;
        if (given) return;
        keyPrompt = null;
        keyDeclined = true;
        reject(new ApiError(401, 'this server needs an API key: click "API key" (top right) to give it', "general"));
      };
      dialog.showModal();
      $("key-input").focus();
    });
  }
  return keyPrompt;
}

// the ControlNet extension's control modes, as its infotext's "Control Mode" names them
const CN_MODES = { balanced: "Balanced", prompt: "My prompt is more important",
  controlnet: "ControlNet is more important" };
const IPA_LABELS = { scale: "IP-Adapter scale", start: "IP-Adapter start", end: "IP-Adapter end" };
const CN_LABELS = { weight: "ControlNet weight", start: "ControlNet start", end: "ControlNet end",
  low: "ControlNet Canny low threshold", high: "ControlNet Canny high threshold" };

/** The input behind a 422 on a list item (controlnets.0.weight, loras.1.weight), with its label; else null.
 * Such errors were once named "loras.0.weight" at the section with no input marked (and the 0 counted only
 * the ticked LoRAs). */
function nestedInput(loc) {
  const [list, index, key] = loc;
  if (list === "hires" && HR_INPUTS[index]) return { id: HR_INPUTS[index][0], label: HR_INPUTS[index][1] };
  if (list === "strength" && hiresUsed()) return { id: "hr-strength", label: "Hires denoising strength" };
  if (list === "seed_resize_from" && SEED_RESIZE_INPUTS[index]) {
    return { id: SEED_RESIZE_INPUTS[index][0], label: SEED_RESIZE_INPUTS[index][1] };
  }
  if (list === "deep_shrink" && DEEP_SHRINK_INPUTS[index]) {
    return { id: DEEP_SHRINK_INPUTS[index][0], label: DEEP_SHRINK_INPUTS[index][1] };
  }
  if (list === "hypertile" && HYPERTILE_INPUTS[index]) {
    return { id: HYPERTILE_INPUTS[index][0], label: HYPERTILE_INPUTS[index][1] };
  }
  if (list === "hypertile_vae" && HYPERTILE_VAE_INPUTS[index]) {
    return { id: HYPERTILE_VAE_INPUTS[index][0], label: HYPERTILE_VAE_INPUTS[index][1] };
  }
  if (list === "tiled_diffusion" && TILED_DIFFUSION_INPUTS[index]) {
    return { id: TILED_DIFFUSION_INPUTS[index][0], label: TILED_DIFFUSION_INPUTS[index][1] };
  }
  if (list === "controlnets" && index === 0 && CN_LABELS[key]) return { id: `cn-${key}`, label: CN_LABELS[key] };
  if (list === "ip_adapters" && index === 0 && IPA_LABELS[key]) return { id: `ipa-${key}`, label: IPA_LABELS[key] };
  if (list === "loras" && key === "weight") {
    const ticked = state.loras.flatMap((l, i) => ($(`lora-use-${i}`).checked ? [i] : []));
    const i = ticked[index];
    if (i !== undefined) return { id: `lora-weight-${i}`, label: `LoRA ${state.loras[i].name} weight` };
  }
  return null;
}

// the native job's deep_shrink settings and hypertile items, and the inputs that hold them
const DEEP_SHRINK_INPUTS = { block: ["deep_shrink_block", "Deep Shrink block"],
  factor: ["deep_shrink_factor", "Deep Shrink factor"], start: ["deep_shrink_start", "Deep Shrink start"],
  end: ["deep_shrink_end", "Deep Shrink end"], after_skip: ["deep_shrink_after_skip", "Deep Shrink after the skip"],
  downscale_method: ["deep_shrink_downscale", "Deep Shrink downscale method"],
  upscale_method: ["deep_shrink_upscale", "Deep Shrink upscale method"] };
const HYPERTILE_INPUTS = [["hypertile_tile", "HyperTile tile size"], ["hypertile_swap", "HyperTile swap size"],
  ["hypertile_depth", "HyperTile depth"]];
const HYPERTILE_VAE_INPUTS = [["hypertile_vae_tile", "HyperTile VAE tile size"],
  ["hypertile_vae_swap", "HyperTile VAE swap size"], ["hypertile_vae_depth", "HyperTile VAE depth"]];
// the native job's tiled_diffusion settings (sdengine.diffusion.multidiffusion) and the inputs that hold them
const TILED_DIFFUSION_INPUTS = { window: ["tiled_diffusion_window", "Tiled diffusion window"],
  window_height: ["tiled_diffusion_window_height", "Tiled diffusion window height"],
  stride: ["tiled_diffusion_stride", "Tiled diffusion stride"],
  circular: ["tiled_diffusion_circular", "Tiled diffusion circular"],
  view_batch: ["tiled_diffusion_batch", "Tiled diffusion view batch"] };
const HR_INPUTS = { hr_scale: ["hr-scale", "Hires upscale by"], hr_upscaler: ["hr-upscaler", "Hires upscaler"],
  hr_second_pass_steps: ["hr-steps", "Hires steps"], hr_resize_x: ["hr-resize-x", "Hires resize width"],
  hr_resize_y: ["hr-resize-y", "Hires resize height"], hr_sampler: ["hr-sampler", "Hires sampler"],
  hr_schedule: ["hr-schedule", "Hires schedule"], hr_prompt: ["hr-prompt", "Hires prompt"],
  hr_negative_prompt: ["hr-negative-prompt", "Hires negative prompt"] };
const SEED_RESIZE_INPUTS = [["seed_resize_w", "Resize seed from width"], ["seed_resize_h", "Resize seed from height"]];
const hiresUsed = () => $("hr-enabled").checked && $("mode").value === "txt2img";

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (body && Array.isArray(body.detail) && body.detail.length) {
    // FastAPI's 422: [{loc: ["body", "width"], msg}]; the field is the first name after "body".
    const d = body.detail[0];
    const loc = (d.loc || []).filter((x) => x !== "body");
    const input = nestedInput(loc);
    if (input) return new ApiError(response.status, `${input.label}: ${d.msg}`, input.id);
    const name = loc.length ? String(loc[0]) : null;
    return new ApiError(response.status, `${loc.join(".") || "request"}: ${d.msg}`, name);
  }
  let message = (body && (typeof body.detail === "string" ? body.detail : body.error?.message)) ||
    `${response.status} ${response.statusText}`;
  if (response.status === 429) {
    const after = response.headers.get("Retry-After");
    const again = `try again${after ? ` in ${after} s` : " later"}`;
    message = body && body.error && body.error.type === "ClientQueueFull"
      ? `You already have as many jobs waiting as this server lets one client queue; ${again}. (${message})`
      : `The server's queue is full; ${again}. (${message})`;
    return new ApiError(429, message, "general");
  }
  return new ApiError(response.status, message);
}

async function api(path, options = {}) {
  for (let attempt = 0; attempt < 4; attempt++) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
    } catch (e) {
      throw new ApiError(0, `cannot reach the server (${e.message})`, "general");
    }
    if (response.status === 401) {
      await askForKey(attempt ? "That key was refused; try again." : "");
      continue;
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }
  throw new ApiError(401, "the server refused the API key", "general");
}

const getJSON = async (path) => (await api(path)).json();

const UPLOAD_LABELS = { init_image: "init image", mask: "mask", controlnet: "ControlNet control image",
  ip_adapter: "IP-Adapter image", reference_images: "reference image", control_image: "control image (Depth / Canny)", redux: "Redux image" };

/** The image as the server takes it: a PNG, JPEG or WebP as it is; another format the browser can show (GIF,
 * BMP, AVIF, ...; A1111 takes them) as a PNG of its pixels. Such a file was shown, painted on, and then refused. */
async function acceptedImage(blob) {
  if (imageKind(new Uint8Array(await blob.slice(0, 16).arrayBuffer()))) return blob;
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch (e) {
    return blob; // not an image the browser reads either: the server says what it is
  }
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  return canvas.convertToBlob({ type: "image/png" });
}

async function upload(blob, what) {
  if (!blob) throw new ApiError(400, `${what}: pick an image first`, what === "mask" ? "mask" : what);
  blob = await acceptedImage(blob);
  try {
    const r = await api("/v1/uploads", { method: "POST", headers: { "Content-Type": blob.type || "image/png" },
      body: blob });
    return (await r.json()).id;
  } catch (e) {  // the server's "upload: ..." says which file only by its field: name it, show it there
    if (e instanceof ApiError && e.status !== 401 && e.status !== 0) {
      throw new ApiError(e.status, `${UPLOAD_LABELS[what] || what}: ${e.message.replace(/^upload: /, "")}`, what);
    }
    throw e;
  }
}

/** An image URL of the API as a blob (sent with the key), and an object URL for <img>. */
async function fetchImage(url) {
  const blob = await (await api(url)).blob();
  return { blob, objectUrl: URL.createObjectURL(blob) };
}

// -------------------------------------------------------------------------------------- errors

const ERROR_FIELDS = [
  // the model family's own settings first: their lines name the model ("... is an SD3 model") and sizes
  [/distilled_cfg_scale|distilled guidance/i, "distilled_cfg_scale"],
  [/^shift\b|^shift applies/i, "shift"],
  [/^sd3 |sd3 settings|skip_guidance_layers|skip_layer_guidance/i, "slg_layers"],
  [/^redux\b|\bredux\[|siglip|style_models/i, "redux"], // FLUX.1 Redux's ("redux[0]: ..."), first: they name models
  [/reference_image|reference image|kontext/i, "reference_images"], // FLUX.1 Kontext's (their lines name others)
  [/control_image|depth \/ canny/i, "control_image"], // FLUX.1 Depth / Canny's map, before the ControlNet's
  [/ip-adapter|ip_adapters|clip vision/i, "ip_adapter"], // first: its lines name widths, models and images
  // SDXL's settings ("sdxl original_size must be ...") and the refiner hand-off ("refiner: ... takes no LoRA")
  ...Object.entries(SDXL_INPUTS).map(([id, key]) => [new RegExp(`^sdxl ${key}\\b`), id]),
  [/^refiner_switch_at|refiner_switch_at must/i, "refiner_switch_at"],
  [/^refiner\b|a refiner needs/i, "refiner"],
  [/^sdxl |unknown sdxl settings|sdxl settings/i, "sdxl"],
  // Deep Shrink's and HyperTile's first: their lines name blocks, sizes and the ControlNets they cannot run with
  [/deep shrink block|deep_shrink\.block/i, "deep_shrink_block"],
  [/deep shrink factor|deep_shrink\.factor/i, "deep_shrink_factor"],
  [/deep shrink start|deep_shrink\.start/i, "deep_shrink_start"],
  [/deep shrink end|deep_shrink\.end/i, "deep_shrink_end"],
  [/deep shrink after_skip|deep_shrink\.after_skip/i, "deep_shrink_after_skip"],
  [/deep shrink downscale_method|deep_shrink\.downscale/i, "deep_shrink_downscale"],
  [/deep shrink upscale_method|deep_shrink\.upscale/i, "deep_shrink_upscale"],
  [/deep[_ ]shrink/i, "deep_shrink"],
  // HyperTile VAE's and tiled diffusion's before HyperTile's and the size's ("... latent wider than the window")
  [/hypertile_vae tile_size/i, "hypertile_vae_tile"],
  [/hypertile_vae swap_size/i, "hypertile_vae_swap"],
  [/hypertile_vae max_depth/i, "hypertile_vae_depth"],
  [/hypertile_vae|hypertile vae/i, "hypertile_vae"],
  [/tiled diffusion window_height|tiled_diffusion\.window_height/i, "tiled_diffusion_window_height"],
  [/tiled diffusion window|tiled_diffusion\.window/i, "tiled_diffusion_window"],
  [/tiled diffusion stride|tiled_diffusion\.stride/i, "tiled_diffusion_stride"],
  [/tiled diffusion view_batch|tiled_diffusion\.view_batch/i, "tiled_diffusion_batch"],
  [/circular tiled diffusion|tiled diffusion circular|tiled_diffusion\.circular/i, "tiled_diffusion_circular"],
  [/tiled[_ ]diffusion/i, "tiled_diffusion"],
  [/hypertile tile_size/i, "hypertile_tile"],
  [/hypertile swap_size/i, "hypertile_swap"],
  [/hypertile max_depth/i, "hypertile_depth"],
  [/hypertile_rule|hypertile rule/i, "hypertile_rule"],
  [/hypertile_scale_depth|hypertile scale depth/i, "hypertile_scale_depth"],
  [/hypertile/i, "hypertile"],
  [/freeu_version|FreeU version/i, "freeu_version"], // FreeU's first: its lines may name widths and blocks
  [/freeu_rule|FreeU rule/i, "freeu_rule"],
  [/\bfreeu\b|FreeU/i, "freeu"],
  [/sag_blur_sigma|SAG blur/i, "sag_blur_sigma"], // SAG's before width/height: its size line names latent pixels
  [/sag_rule|SAG rule/i, "sag_rule"],
  [/sag_scale|SAG scale|self-attention guidance/i, "sag_scale"],
  [/seed_resize_from_w|resize seed from width/i, "seed_resize_w"],
  [/seed_resize_from_h|resize seed from height/i, "seed_resize_h"],
  [/seed_resize_from/i, "seed_resize_w"],
  [/strength_rule|strength rule/i, "strength_rule"],
  [/\btiling\b/i, "tiling"],
  [/\bhires\b|\bhr_/i, "hires"],
  [/controlnet|preprocessor|control image/i, "controlnet"],
  [/\blora\b|<lora/i, "loras"],
  [/^strength\b/i, "strength"], // "strength must be > 0 for img2img": the strength's, not the init image's
  [/init[_ ]image|img2img/i, "init_image"],
  [/\bmask_blur\b/i, "mask_blur"],
  [/differential_diffusion/i, "differential_diffusion"],
  [/\bmask\b/i, "mask"],
  [/strength/i, "strength"],
  [/\bwidth\b/i, "width"],
  [/\bheight\b|\bsize\b/i, "height"],
  [/\bsampler\b/i, "sampler"],
  [/\bschedule\b/i, "schedule"],
  [/\bsteps\b/i, "steps"],
  [/pag_layers|PAG layer/i, "pag_layers"], // before cfg: "pag_layers: PAG layer 'x' matches no ..."
  [/pag_scale|PAG scale/i, "pag_scale"],
  [/cfg/i, "cfg_scale"],
  [/\bseed\b/i, "seed"],
  [/batch/i, "batch_size"],
  [/clip_skip_rule|clip skip rule/i, "clip_skip_rule"],
  [/clip_skip|clip skip/i, "clip_skip"],
  [/^vae\b|\bVAE '/i, "vae"], // the job's VAE ("vae: unknown VAE 'x'; available: ...")
  [/vae_encode|tiny VAE with an encoder/i, "vae_encode"],
  [/vae_decode|tiny VAE/i, "vae_decode"],
  [/\bmodel\b/i, "model"],
  [/negative_prompt/i, "negative_prompt"],
  [/\bprompt\b/i, "prompt"],
];
const FIELD_ALIASES = { controlnets: "controlnet", loras: "loras", init_image: "init_image", mask: "mask",
  ip_adapters: "ip_adapter" };

function fieldOf(message, hint) {
  if (hint && $(`err-${FIELD_ALIASES[hint] || hint}`)) return FIELD_ALIASES[hint] || hint;
  for (const [re, field] of ERROR_FIELDS) if (re.test(message)) return field;
  return "general";
}

function clearErrors() {
  for (const el of document.querySelectorAll(".err")) el.textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showError(field, message, inputId = null) {
  const box = $(`err-${field}`) || $("err-general");
  box.textContent = message;
  const input = (inputId && $(inputId)) || $(field);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", box.id);
  }
  const section = box.closest("details");
  if (section) section.open = true;
  box.scrollIntoView({ block: "nearest" });
}

function showApiError(e) {
  const message = e instanceof Error ? e.message : String(e);
  // e.field may name the input itself (cn-low, lora-weight-0) where the message box is its section's; a server's
  // "hr_resize_x must be ..." names the hires fix's input (it was said in the section with no input marked)
  let input = e.field;
  const hr = !input && /\b(hr_[a-z_]+)\b/.exec(message);
  if (hr && HR_INPUTS[hr[1]]) input = HR_INPUTS[hr[1]][0];
  showError(fieldOf(message, input), message, input);
}

// ------------------------------------------------------------------------------------ pickers

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label ?? value;
  select.append(o);
}

function fillSchedules() {
  const select = $("schedule");
  const keep = select.value;
  const spec = state.samplers.find((s) => s.name === $("sampler").value);
  select.replaceChildren();
  for (const s of spec ? spec.schedules : ["normal"]) option(select, s, SCHEDULE_LABELS[s] || state.scheduleLabels[s] || s);
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  else if ([...select.options].some((o) => o.value === "karras")) select.value = "karras";
}

function sizeOf(model) {
  return state.sizes[model] || { width: 512, height: 512, multiple: 8 };
}

function snap(input) {
  const m = sizeOf($("model").value).multiple;
  const v = input.valueAsNumber;
  if (Number.isFinite(v) && v > 0) input.value = String(Math.max(m, Math.round(v / m) * m));
}

function renderLoras() {
  const list = $("lora-list");
  list.replaceChildren();
  if (!state.loras.length) list.textContent = "No LoRAs on this server.";
  state.loras.forEach((l, i) => {
    const row = document.createElement("div");
    row.className = "lora";
    const use = document.createElement("label");
    use.className = "inline";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = `lora-use-${i}`;
    use.append(box, ` ${l.name}`);
    const weightLabel = document.createElement("label");
    weightLabel.htmlFor = `lora-weight-${i}`;
    weightLabel.className = "visually-hidden";
    weightLabel.textContent = `Weight of ${l.name}`;
    const weight = document.createElement("input");
    Object.assign(weight, { type: "number", id: `lora-weight-${i}`, min: "-10", max: "10", step: "0.05", value: "1" });
    const cell = document.createElement("span");
    cell.append(weightLabel, weight);
    row.append(use, cell);
    list.append(row);
  });
}

// ---------------------------------------------------------------------------------- embeddings

const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Where ``word`` stands alone in ``text`` (not inside a longer word; with its weight, ``(word:1.2)``, as a
 * whole): {start, end}, or null. */
function findWord(text, word) {
  const w = escapeRegExp(word);
  const weighted = new RegExp(`\\(${w}:[\\d.]+\\)`).exec(text);
  if (weighted) return { start: weighted.index, end: weighted.index + weighted[0].length };
  const m = new RegExp(`(^|[\\s,(\\[])(${w})(?=$|[\\s,)\\]:])`).exec(text);
  return m ? { start: m.index + m[1].length, end: m.index + m[1].length + word.length } : null;
}

/** Add an embedding's name to the prompt last typed in (A1111's rule: the prompt or the negative prompt), with
 * a space before it; a name already there is taken out instead (with its weight and one comma beside it). */
function toggleEmbedding(name) {
  const box = $(state.activePrompt);
  const at = findWord(box.value, name);
  if (at) {
    let before = box.value.slice(0, at.start).replace(/ +$/, "");
    let after = box.value.slice(at.end).replace(/^ +/, "");
    if (after.startsWith(",") && (before === "" || before.endsWith(",") || before.endsWith("\n"))) {
      after = after.slice(1).replace(/^ +/, "");
    } else if (before.endsWith(",") && (after === "" || after.startsWith("\n"))) {
      before = before.slice(0, -1);
    }
    box.value = before && after && !/[\n(\[]$/.test(before) && !/^[,)\]\n]/.test(after) ? `${before} ${after}`
      : before + after;
  } else {
    box.value = box.value.trim() === "" ? name : `${box.value.replace(/ +$/, "")} ${name}`;
  }
  box.dispatchEvent(new Event("input", { bubbles: true })); // saved with the other settings
  markEmbeddings();
}

/** Each embedding's button is pressed while its name is in the prompt (or the negative prompt). */
function markEmbeddings() {
  for (const b of document.querySelectorAll("#embedding-list button")) {
    const name = b.dataset.name;
    b.setAttribute("aria-pressed", String(Boolean(findWord($("prompt").value, name) ||
      findWord($("negative_prompt").value, name))));
  }
}

// ------------------------------------------------------------------------------------- styles
// A1111's prompt styles (serve --styles-file, listed by GET /sdapi/v1/prompt-styles): the ticked ones are merged into
// the prompts of the job sent, in the file's order, as A1111's apply_styles_to_prompt (sdengine.prompts.apply_styles),
// and taken out of a reused infotext's prompts again, ticked, as A1111's "Apply if any" does.

async function loadStyles() {
  $("err-styles").textContent = "";
  let answer;
  try {
    answer = await getJSON("/sdapi/v1/prompt-styles");
  } catch (e) {
    showError("styles", `styles: ${e.message}`);
    return;
  }
  state.styles = Array.isArray(answer) ? answer : [];
  const list = $("style-list");
  list.replaceChildren();
  state.styles.forEach((st, i) => {
    const label = document.createElement("label");
    label.className = "inline";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = `style-use-${i}`;
    box.addEventListener("change", saveSettings);
    label.title = [st.prompt, st.negative_prompt && `negative: ${st.negative_prompt}`].filter(Boolean).join("\n");
    label.append(box, ` ${st.name}`);
    list.append(label);
  });
  $("styles-box").hidden = !state.styles.length;
}

function tickStyles(names) {
  state.styles.forEach((st, i) => { $(`style-use-${i}`).checked = names.includes(st.name); });
}

function chosenStyles() {
  return state.styles.filter((st, i) => $(`style-use-${i}`)?.checked);
}

/** A1111's merge_prompts: a style text with {prompt} takes the prompt in its place, any other is appended. */
function mergeStyle(styleText, prompt) {
  if (styleText.includes("{prompt}")) return styleText.split("{prompt}").join(prompt);
  return [prompt.trim(), styleText.trim()].filter(Boolean).join(", ");
}

/** A1111's extract_style_text_from_prompt: [whether the prompt holds the style text, the prompt without it]. */
function extractStyleText(styleText, prompt) {
  const p = prompt.trim().replace(/ {2,}/g, " ");
  const st = styleText.trim().replace(/ {2,}/g, " ");
  if (st.includes("{prompt}")) {
    const [left, right] = st.split("{prompt}");
    if (p.startsWith(left) && p.endsWith(right) && p.length >= left.length + right.length) {
      return [true, p.slice(left.length, p.length - right.length)];
    }
    return [false, prompt];
  }
  if (p.endsWith(st)) {
    let rest = p.slice(0, p.length - st.length);
    if (rest.endsWith(", ")) rest = rest.slice(0, -2);
    return [true, rest];
  }
  return [false, prompt];
}

/** A1111's extract_styles_from_prompt: the styles an infotext's prompts were made with, and the prompts without. */
function extractStyles(prompt, negative) {
  const found = [];
  const left = [...state.styles];
  for (;;) {
    const k = left.findIndex((st) => {
      if (!st.prompt && !st.negative_prompt) return false;
      const [okP, p] = extractStyleText(st.prompt || "", prompt);
      if (!okP) return false;
      const [okN, n] = extractStyleText(st.negative_prompt || "", negative);
      if (!okN) return false;
      prompt = p;
      negative = n;
      return true;
    });
    if (k < 0) break;
    found.push(left[k].name);
    left.splice(k, 1);
  }
  return { names: found.reverse(), prompt, negative };
}

/** The server's embeddings (A1111's GET /sdapi/v1/embeddings: the folder of --embeddings-dir, read as asked). */
async function loadEmbeddings() {
  $("err-embeddings").textContent = "";
  let answer;
  try {
    answer = await getJSON("/sdapi/v1/embeddings");
  } catch (e) {
    showError("embeddings", `embeddings: ${e.message}`);
    return;
  }
  state.embeddings = Object.entries(answer.loaded || {}).map(([name, info]) => ({ name, ...info }));
  const list = $("embedding-list");
  list.replaceChildren();
  if (!state.embeddings.length) list.textContent = "No embeddings on this server (serve --embeddings-dir DIR).";
  for (const e of state.embeddings) {
    const b = button(e.name, () => toggleEmbedding(e.name));
    b.dataset.name = e.name;
    b.title = `${e.vectors} vector(s) of width ${e.shape}`;
    list.append(b);
  }
  const skipped = Object.keys(answer.skipped || {});
  $("embeddings-skipped").hidden = !skipped.length;
  $("embeddings-skipped").textContent = skipped.length
    ? `Not readable as an embedding (skipped): ${skipped.join(", ")}` : "";
  markEmbeddings();
}

async function loadPickers() {
  const [models, samplers, loras, controlnets, sizes, vaes, upscalers] = await Promise.all([
    getJSON("/v1/models"), getJSON("/v1/samplers"), getJSON("/v1/loras"), getJSON("/v1/controlnets"),
    getJSON("/v1/sizes"), getJSON("/v1/vaes"), getJSON("/v1/upscalers"),
  ]);
  state.sizes = sizes.models;
  // The server's limits are the inputs' maximum (the page's own were the widest any server takes: 1000 steps).
  const limits = sizes.limits || {};
  for (const [id, key] of [["steps", "steps"], ["hr-steps", "steps"], ["width", "side"], ["height", "side"],
    ["batch_size", "batch_size"]]) {
    if (Number.isInteger(limits[key])) $(id).max = limits[key];
  }
  const model = $("model");
  model.replaceChildren();
  for (const m of models.data) option(model, m.id);
  state.tiny = Object.fromEntries(models.data.map((m) => [m.id, Boolean(m.tiny_vae)]));
  state.family = Object.fromEntries(models.data.map((m) => [m.id, m.family || "sd"]));
  state.kind = Object.fromEntries(models.data.map((m) => [m.id, m.kind || null])); // Flux: plain / fill / control
  state.defaults = Object.fromEntries(models.data.map((m) => [m.id, m.defaults || {}]));
  state.tinyEncoder = Object.fromEntries(models.data.map((m) => [m.id, Boolean(m.tiny_vae_encoder)]));
  const current = models.data.find((m) => m.current);
  if (current) model.value = current.id;
  state.samplers = samplers.samplers;
  state.scheduleLabels = samplers.schedule_labels || {};
  const sampler = $("sampler");
  sampler.replaceChildren();
  for (const s of state.samplers) option(sampler, s.name, s.a1111);
  // the hires fix's own sampler and schedule ("" = the job's), every one the server has
  const hrSampler = $("hr-sampler");
  hrSampler.replaceChildren();
  option(hrSampler, "", "Use the same sampler");
  for (const s of state.samplers) option(hrSampler, s.name, s.a1111);
  const hrSchedule = $("hr-schedule");
  hrSchedule.replaceChildren();
  option(hrSchedule, "", "Use the same schedule");
  for (const s of samplers.schedules || []) option(hrSchedule, s, SCHEDULE_LABELS[s] || state.scheduleLabels[s] || s);
  sampler.value = state.samplers.some((s) => s.name === "dpmpp_2m") ? "dpmpp_2m" : state.samplers[0]?.name;
  fillSchedules();
  const size = sizeOf(model.value);
  $("width").value = size.width;
  $("height").value = size.height;
  state.loras = loras.loras;
  renderLoras();
  // the VAEs a job may name (GET /v1/vaes: the server's --vaes-dir); "": the VAE the model was loaded with
  const vae = $("vae");
  vae.replaceChildren();
  option(vae, "", "The model's");
  for (const v of vaes.vaes) option(vae, v.name);
  // the SDXL refiners a job may hand off to: the server's SDXL models ("": none)
  const refiner = $("refiner");
  refiner.replaceChildren();
  option(refiner, "", "None");
  for (const m of models.data) if (m.family === "sdxl") option(refiner, m.id);
  // the hires fix's upscalers (GET /v1/upscalers): the latent modes, None, Lanczos, the --upscalers-dir models
  const hrUp = $("hr-upscaler");
  const hrChosen = hrUp.value;
  hrUp.replaceChildren();
  for (const u of upscalers.upscalers) option(hrUp, u.name);
  if (!setValue("hr-upscaler", hrChosen)) hrUp.selectedIndex = 0; // the saved choice: restoreSettings
  loadEmbeddings(); // not awaited: the page works without its list (an error is said in its section)
  await loadStyles(); // awaited (before the saved settings tick their boxes); an error is said in its place
  const cn = $("cn-model");
  cn.replaceChildren();
  for (const c of controlnets.controlnets) option(cn, c.name);
  const pre = $("cn-pre");
  pre.replaceChildren();
  for (const p of controlnets.preprocessors) option(pre, p);
  if (controlnets.preprocessors.includes("canny")) pre.value = "canny";
  // the IP-Adapters and CLIP vision encoders of the server's folders; none: the section says how to add them
  const [adapters, encoders] = await Promise.all([getJSON("/v1/ip_adapters"), getJSON("/v1/clip_vision")]);
  const ipa = $("ipa-model");
  ipa.replaceChildren();
  for (const a of adapters.ip_adapters) option(ipa, a.name);
  const clip = $("ipa-clip");
  clip.replaceChildren();
  option(clip, "", "Automatic (the one that fits)");
  for (const c of encoders.clip_vision) option(clip, c.name);
  const none = !adapters.ip_adapters.length;
  $("ipa-none").hidden = !none;
  for (const id of ["ipa-enabled", "ipa-model", "ipa-clip", "ipa-scale", "ipa-start", "ipa-end", "ipa-rule",
    "ipa-file"]) $(id).disabled = none;
  if (none) $("ipa-enabled").checked = false;
  // FLUX.1 Redux: its encoders (GET /v1/style_models) and the SigLIP choice, shown only when the CLIP vision folder
  // holds more than one file (Automatic: the server takes its one SigLIP encoder)
  const styles = await getJSON("/v1/style_models");
  const redux = $("redux-model");
  redux.replaceChildren();
  for (const m of styles.style_models) option(redux, m.name);
  const siglip = $("redux-siglip");
  siglip.replaceChildren();
  option(siglip, "", "Automatic (the one SigLIP file)");
  for (const c of encoders.clip_vision) option(siglip, c.name);
  state.siglipChoice = encoders.clip_vision.length > 1;
}

// ----------------------------------------------------------------------------------- settings

const editedEarly = new Set(); // fields typed in before the saved settings were restored

function saveSettings(event) {
  // Not before the lists are loaded: the empty model/sampler pickers of a page still waiting for the server
  // (or for its key) would overwrite the saved choices.
  if (document.body.dataset.ready !== "true") {
    if (event?.target?.id) editedEarly.add(event.target.id); // and what was typed is not overwritten by them
    return;
  }
  const s = {};
  for (const id of FIELDS) s[id] = $(id).value;
  s.cnEnabled = $("cn-enabled").checked;
  s.ipaEnabled = $("ipa-enabled").checked;
  s.hrEnabled = $("hr-enabled").checked;
  s.tiling = $("tiling").checked;
  s.checks = Object.fromEntries(CHECKS.map((id) => [id, $(id).checked]));
  s.styles = chosenStyles().map((st) => st.name);
  s.loras = Object.fromEntries(state.loras.map((l, i) => [l.name,
    { use: $(`lora-use-${i}`).checked, weight: $(`lora-weight-${i}`).value }]));
  try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(s)); } catch (e) { /* storage full or off */ }
}

function setValue(id, value) {
  const el = $(id);
  if (value === undefined || value === null) return false;
  if (el.tagName === "SELECT") {
    if (![...el.options].some((o) => o.value === String(value))) return false;
    el.value = String(value);
    if (id === "sampler") fillSchedules();
    return true;
  }
  el.value = String(value);
  return true;
}

function restoreSettings() {
  let s;
  try { s = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "null"); } catch (e) { s = null; }
  if (!s) return;
  // The sampler first: it decides which schedules there are.
  for (const id of ["sampler", ...FIELDS.filter((f) => f !== "sampler")]) {
    if (!editedEarly.has(id)) setValue(id, s[id]);
  }
  $("cn-enabled").checked = !!s.cnEnabled;
  $("ipa-enabled").checked = !!s.ipaEnabled && !$("ipa-enabled").disabled;
  $("hr-enabled").checked = !!s.hrEnabled;
  if (!editedEarly.has("tiling")) $("tiling").checked = !!s.tiling;
  for (const id of CHECKS) if (!editedEarly.has(id)) $(id).checked = !!s.checks?.[id];
  if (Array.isArray(s.styles)) tickStyles(s.styles);
  state.loras.forEach((l, i) => {
    const saved = s.loras?.[l.name];
    if (saved) {
      $(`lora-use-${i}`).checked = !!saved.use;
      $(`lora-weight-${i}`).value = saved.weight;
    }
  });
}

// ------------------------------------------------------------------------------ infotext -> form

function samplerFromA1111(name) {
  const exact = state.samplers.find((s) => s.a1111 === name || s.name === name);
  if (exact) return { sampler: exact.name, schedule: null };
  for (const [label, schedule] of Object.entries(A1111_SCHEDULES)) {
    const suffix = ` ${label}`;
    if (name.toLowerCase().endsWith(suffix)) {
      const base = state.samplers.find((s) => s.a1111 === name.slice(0, -suffix.length));
      if (base) return { sampler: base.name, schedule };
    }
  }
  return null;
}

/** Whether A1111's step rules make this sampler walk A1111's own grid (DDIM, PLMS: GET /v1/samplers' a1111_grid). */
function gridSampler(name) {
  return Boolean(state.samplers.find((s) => s.name === name)?.a1111_grid);
}

/** Our schedule for an infotext's "Schedule type" (A1111's label or our name), as sdengine.diffusion.sampling.resolve
 * reads it: "Automatic" is what A1111 runs with the sampler (its combined name's own schedule first), a label two
 * schedules share is the first's; null for a name this server does not know. */
function scheduleFromA1111(label, sampler) {
  const key = label.trim().toLowerCase();
  if (key === "automatic") {
    if (sampler && sampler.schedule) return sampler.schedule;
    const spec = sampler && state.samplers.find((s) => s.name === sampler.sampler);
    return (spec && spec.a1111_automatic) || "normal";
  }
  for (const [name, a1111] of Object.entries(state.scheduleLabels)) {
    if (name === key || a1111.toLowerCase() === key) return name;
  }
  return A1111_SCHEDULES[key] ?? null;
}

/** Fill the form from an A1111/sdengine infotext; the names of the fields that were set. */
function applyInfotext(text) {
  const p = parseInfotext(text);
  const f = p.fields;
  const set = [];
  const put = (id, value) => { // whether the value was set (a select without that option: not)
    const ok = setValue(id, value);
    if (ok) set.push(id);
    return ok;
  };
  // The prompts without the server's styles they hold, those styles ticked (A1111's "Apply if any"), so that they
  // are not merged in a second time.
  const styled = extractStyles(p.prompt, p.negative_prompt);
  if (styled.names.length) {
    p.prompt = styled.prompt;
    p.negative_prompt = styled.negative;
  }
  tickStyles(styled.names);
  put("prompt", p.prompt);
  put("negative_prompt", p.negative_prompt);
  if (f.Steps) put("steps", parseInt(f.Steps, 10));
  const missing = []; // what the text names and this server lacks: said, not silently kept as it was
  if (f.Sampler) {
    const s = samplerFromA1111(f.Sampler);
    if (!s) missing.push(`sampler ${f.Sampler}`);
    if (s) {
      put("sampler", s.sampler);
      // As sdengine reads it (--from-png): a sampler without a schedule type means the model's own spacing.
      put("schedule", s.schedule || "normal");
    }
  }
  if (f["Schedule type"]) {
    const schedule = scheduleFromA1111(f["Schedule type"], f.Sampler ? samplerFromA1111(f.Sampler) : null);
    if (!put("schedule", schedule)) missing.push(`schedule type ${f["Schedule type"]}`);
  }
  if (f["CFG scale"]) put("cfg_scale", parseFloat(f["CFG scale"]));
  // sdengine's perturbed-attention guidance: as the image has it, else off (its layers "mid" unless named)
  put("pag_scale", f["PAG scale"] ? parseFloat(f["PAG scale"]) : 0);
  put("pag_layers", (f["PAG layers"] || pagDefault(familyOf(f.Model || $("model").value))).trim());
  // the model family's own: Forge's "Distilled CFG Scale" (Flux), "Shift" and sdengine's skip-layer guidance (SD3);
  // empty (the model's own) when the image has none
  put("distilled_cfg_scale", f["Distilled CFG Scale"] ? parseFloat(f["Distilled CFG Scale"]) : "");
  put("shift", f.Shift ? parseFloat(f.Shift) : "");
  put("slg_layers", f["Skip layers"] ? f["Skip layers"].split(",").map((x) => x.trim()).join(", ") : "");
  for (const [key, id, fallback] of [["Skip layer guidance", "slg_scale", 2.8], ["Skip layer start", "slg_start", 0.01],
    ["Skip layer stop", "slg_stop", 0.2]]) put(id, f["Skip layers"] && f[key] ? parseFloat(f[key]) : fallback);
  // self-attention guidance: sdengine's "SAG scale" / "SAG blur sigma" / "SAG rule" (blur 1 and diffusers' rule
  // unless written), or Forge's sag_enabled, sag_scale, sag_blur_sigma (ComfyUI's rule; its defaults 0.5 and 2; a
  // sag_threshold other than 1 said missing); else off
  const forgeSag = !f["SAG scale"] && /^true$/i.test((f.sag_enabled || "").trim());
  const sagOf = (own, forgeKey, fallback) => (f[own] || (forgeSag ? f[forgeKey] : "") || fallback).trim();
  put("sag_scale", f["SAG scale"] || forgeSag ? parseFloat(sagOf("SAG scale", "sag_scale", "0.5")) : 0);
  put("sag_blur_sigma", parseFloat(sagOf("SAG blur sigma", "sag_blur_sigma", forgeSag ? "2" : "1")));
  put("sag_rule", forgeSag ? "comfyui" : (f["SAG rule"] || "diffusers").trim());
  if (forgeSag && f.sag_threshold && parseFloat(f.sag_threshold) !== 1) {
    missing.push(`SAG's sag_threshold ${f.sag_threshold.trim()} (this page's mask threshold is 1)`);
  }
  // Deep Shrink: Forge's kohya_hrfix_* keys (sdengine writes them too; the script's defaults where one is missing);
  // else off
  const shrink = /^true$/i.test((f.kohya_hrfix_enabled || "").trim());
  const shrinkOf = (key, fallback) => (shrink && f[key] ? f[key].trim() : fallback);
  put("deep_shrink", shrink ? "on" : "");
  put("deep_shrink_block", parseInt(shrinkOf("kohya_hrfix_block_number", "3"), 10));
  put("deep_shrink_factor", parseFloat(shrinkOf("kohya_hrfix_downscale_factor", "2")));
  put("deep_shrink_start", parseFloat(shrinkOf("kohya_hrfix_start_percent", "0")));
  put("deep_shrink_end", parseFloat(shrinkOf("kohya_hrfix_end_percent", "0.35")));
  const afterSkip = shrinkOf("kohya_hrfix_downscale_after_skip", "True").toLowerCase();
  if (!put("deep_shrink_after_skip", afterSkip)) missing.push(`Deep Shrink after_skip ${afterSkip}`);
  for (const [key, id] of [["kohya_hrfix_downscale_method", "deep_shrink_downscale"],
    ["kohya_hrfix_upscale_method", "deep_shrink_upscale"]]) {
    const method = shrinkOf(key, "bicubic");
    if (!put(id, method)) missing.push(`Deep Shrink ${key.slice(12).replace("_", " ")} ${method}`);
  }
  // HyperTile: A1111's "Hypertile U-Net: True" (every pass) or "Hypertile U-Net second pass: True" (the hires fix's
  // only), its max tile size / swap size / max depth (256, 3, 3 where missing), sdengine's "Hypertile rule" and
  // "Hypertile scale depth"; else off
  const tiled = /^true$/i.test((f["Hypertile U-Net"] || "").trim());
  const tiledHires = !tiled && /^true$/i.test((f["Hypertile U-Net second pass"] || "").trim());
  const tileOf = (key, fallback) => ((tiled || tiledHires) && f[key] ? f[key].trim() : fallback);
  put("hypertile", tiled ? "on" : tiledHires ? "hires" : "");
  put("hypertile_tile", parseInt(tileOf("Hypertile U-Net max tile size", "256"), 10));
  put("hypertile_swap", parseInt(tileOf("Hypertile U-Net swap size", "3"), 10));
  put("hypertile_depth", parseInt(tileOf("Hypertile U-Net max depth", "3"), 10));
  const tileRule = tileOf("Hypertile rule", "a1111");
  if (!put("hypertile_rule", tileRule)) missing.push(`Hypertile rule ${tileRule}`);
  put("hypertile_scale_depth", tileOf("Hypertile scale depth", "True").toLowerCase() === "false" ? "false" : "true");
  // HyperTile on the VAE: A1111's "Hypertile VAE: True", its max tile size / swap size / max depth (128, 3, 3 where
  // missing), as sdengine.metadata reads them; else off
  const vaeTiled = /^true$/i.test((f["Hypertile VAE"] || "").trim());
  $("hypertile_vae").checked = vaeTiled;
  if (f["Hypertile VAE"]) set.push("hypertile_vae");
  const vaeTileOf = (key, fallback) => parseInt(vaeTiled && f[key] ? f[key].trim() : fallback, 10);
  put("hypertile_vae_tile", vaeTileOf("Hypertile VAE max tile size", "128"));
  put("hypertile_vae_swap", vaeTileOf("Hypertile VAE swap size", "3"));
  put("hypertile_vae_depth", vaeTileOf("Hypertile VAE max depth", "3"));
  applyTiledDiffusion(f, put, set, missing);
  if (f.Seed) put("seed", f.Seed);
  const size = /^(\d+)x(\d+)$/.exec(f.Size || "");
  if (size) { put("width", size[1]); put("height", size[2]); }
  if (f["Denoising strength"]) put("strength", parseFloat(f["Denoising strength"]));
  if (f["Mask blur"]) put("mask_blur", parseFloat(f["Mask blur"]));
  // A1111's img2img noise multiplier and sdengine's "Masked content": as the image has them, else the defaults
  put("noise_multiplier", f["Noise multiplier"] ? parseFloat(f["Noise multiplier"]) : 1);
  const masked = (f["Masked content"] || "original").trim();
  if (!put("masked_content", masked)) missing.push(`masked content ${masked}`);
  // sdengine's "Differential diffusion" (soft inpainting's strength): as the image has it, else off
  put("differential_diffusion", f["Differential diffusion"] ? parseFloat(f["Differential diffusion"]) : 0);
  put("clip_skip", f["Clip skip"] ? parseInt(f["Clip skip"], 10) : 1); // A1111 writes it only when > 1
  put("vae_decode", f["Tiny VAE"] ? "tiny" : "full"); // sdengine names the tiny VAE when it decoded
  put("vae_encode", f["Tiny VAE encode"] ? "tiny" : "full"); // and when it encoded the init image
  // A1111's "VAE" (the file's name): that VAE of the server's list, else said missing; none: the model's
  const vaeName = (f.VAE || "").trim();
  if (!put("vae", vaeName)) missing.push(`VAE ${vaeName}`);
  // FreeU: sdengine's "FreeU: b1,b2,s1,s2" (its version and rule where not 2 and width), or Forge's freeu_enabled,
  // freeu_b1 ... freeu_s2 (version 2, width; its freeu_start / freeu_end other than 0 / 1 said missing); else off
  const forgeFreeU = /^true$/i.test((f.freeu_enabled || "").trim());
  const freeuText = f.FreeU ? f.FreeU.trim() : forgeFreeU
    ? ["freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2"].map((k) => (f[k] || "").trim()).join(",") : "";
  put("freeu", freeuText.split(",").map((x) => x.trim()).filter((x) => x !== "").join(", "));
  put("freeu_version", freeuText ? (f["FreeU version"] || f.freeu_version || "2").trim() : "2");
  put("freeu_rule", freeuText ? (f["FreeU rule"] || f.freeu_rule || "width").trim() : "width");
  for (const [k, whole] of [["freeu_start", 0], ["freeu_end", 1]]) {
    if (forgeFreeU && f[k] && parseFloat(f[k]) !== whole) missing.push(`FreeU's ${k} ${f[k].trim()} (this page runs every step)`);
  }
  // Tiling, "Seed resize from" and sdengine's "Strength rule": set as the image has them, off where it has none
  // (as the CLI's --from-png reads them).
  $("tiling").checked = /^true$/i.test((f.Tiling || "").trim());
  if (f.Tiling) set.push("tiling");
  const resize = /^(\d+)x(\d+)$/.exec((f["Seed resize from"] || "").trim());
  if (f["Seed resize from"] && !resize) missing.push(`Seed resize from ${f["Seed resize from"]}`);
  if (resize) { put("seed_resize_w", resize[1]); put("seed_resize_h", resize[2]); }
  else { $("seed_resize_w").value = ""; $("seed_resize_h").value = ""; }
  // An image sdengine did not make (A1111's, Forge's) has A1111's strength and Clip skip meanings, as --from-png
  // reads it; sdengine's own have sdengine's unless their "Strength rule" / "Clip skip rule" say otherwise.
  const own = /^sdengine/.test((f.Version || "").trim());
  // (A1111 counts its img2img / hires steps its own way and walks its own DDIM / PLMS grid, txt2img too)
  const a1111Steps = !own && (f["Denoising strength"] || gridSampler(f.Sampler && samplerFromA1111(f.Sampler)?.sampler));
  const rule = (f["Strength rule"] || (a1111Steps ? "a1111" : "diffusers")).trim();
  if (!put("strength_rule", rule)) missing.push(`strength rule ${rule}`);
  const clipRule = (f["Clip skip rule"] || (own || !f["Clip skip"] ? "sdengine" : "a1111")).trim();
  if (!put("clip_skip_rule", clipRule)) missing.push(`clip skip rule ${clipRule}`);
  if (f.Model && !put("model", f.Model)) missing.push(`model ${f.Model}`);
  if (f.Model) { // its family's settings shown (the sampler and guidance are the image's, not the model's defaults)
    state.model = $("model").value;
    fitFamily();
  }
  applyHires(f, put, missing);
  applySdxl(f, put, missing);
  applyControlNet(f, put, missing, own);
  applyIpAdapter(f, put, missing);
  applyRedux(f, put, missing);
  // The infotext's prompt carries its LoRAs as <lora:NAME:W> tags: a ticked box would add them a second time
  // (twice the weight).
  state.loras.forEach((l, i) => { $(`lora-use-${i}`).checked = false; });
  markEmbeddings();
  saveSettings();
  return { set, missing };
}

/** The ControlNet of an infotext (sdengine's and A1111's "ControlNet 0: "Module: m, Model: NAME [hash], Weight: w,
 * Threshold A: low, Threshold B: high, Guidance Start: s, Guidance End: e"", and sdengine's "ControlNet step rule",
 * as --from-png reads them; without that field an image sdengine did not make (`own` false) counted its steps by
 * A1111's extension's rule): ticked with its settings (the control image is not in the infotext: the one picked
 * stays), or unticked for an image made without one. What this page cannot set is said: a model or preprocessor
 * this server lacks, a Processor Res, a hires control mode, a second unit. */
function applyControlNet(f, put, missing, own) {
  const keys = Object.keys(f).filter((k) => /^ControlNet \d+$/.test(k)).sort((a, b) => parseInt(a.slice(11), 10)
    - parseInt(b.slice(11), 10));
  $("cn-enabled").checked = keys.length > 0;
  if (!keys.length) return;
  const unit = {};
  for (const m of String(f[keys[0]]).matchAll(/\s*([^:,]+):\s*([^,]*)/g)) unit[m[1].trim()] = m[2].trim();
  const model = (unit.Model || "").replace(/\s*\[[0-9a-fA-F]+\]$/, "");
  if (!put("cn-model", model)) missing.push(`ControlNet ${model}`);
  put("cn-weight", unit.Weight !== undefined ? parseFloat(unit.Weight) : 1);
  put("cn-start", unit["Guidance Start"] !== undefined ? parseFloat(unit["Guidance Start"]) : 0);
  put("cn-end", unit["Guidance End"] !== undefined ? parseFloat(unit["Guidance End"]) : 1);
  if (unit.Module && !put("cn-pre", unit.Module)) missing.push(`ControlNet preprocessor ${unit.Module}`);
  if (unit.Module === "canny") {  // the extension's Threshold A / B sliders hold canny's thresholds
    put("cn-low", unit["Threshold A"] !== undefined ? parseFloat(unit["Threshold A"]) : 100);
    put("cn-high", unit["Threshold B"] !== undefined ? parseFloat(unit["Threshold B"]) : 200);
  }
  if (unit["Processor Res"] !== undefined && unit.Module && unit.Module !== "none") {
    missing.push(`ControlNet Processor Res ${unit["Processor Res"]}`);
  }
  const rule = (f["ControlNet step rule"] || (own ? "diffusers" : "a1111")).split(",")[0].trim();
  if (!put("cn-rule", rule)) missing.push(`ControlNet step rule ${rule}`);
  const modeName = (unit["Control Mode"] || "Balanced").toLowerCase();
  const mode = Object.entries(CN_MODES).find(([, n]) => n.toLowerCase() === modeName);
  if (!mode || !put("cn-mode", mode[0])) missing.push(`ControlNet control mode ${unit["Control Mode"]}`);
  if (unit["Hires Control Mode"]) missing.push(`ControlNet hires control mode ${unit["Hires Control Mode"]}`);
  for (const k of keys.slice(1)) missing.push(`${k} (this page runs one ControlNet)`);
}

/** MultiDiffusion of an infotext, as sdengine.metadata.tiled_diffusion_kwargs reads it: sdengine's "Tiled Diffusion:
 * MultiDiffusion", "Tiled Diffusion window: WxH" (latent cells), "Tiled Diffusion stride", "... circular: True" and
 * "... batch" (1 where missing): ticked with its settings, or unticked for an image made without it. The A1111
 * extension's one-field dictionary (its own tile layout) and a method this page lacks are said. */
function applyTiledDiffusion(f, put, set, missing) {
  const text = (f["Tiled Diffusion"] || "").trim();
  const ours = text.toLowerCase() === "multidiffusion";
  const cells = /^(\d+)x(\d+)$/i.exec((f["Tiled Diffusion window"] || "").trim());
  if (text && !ours) missing.push(text.startsWith("{") ? "Tiled Diffusion (the A1111 extension's settings: its "
    + "tiles are laid out otherwise)" : `Tiled Diffusion ${text}`);
  else if (ours && !cells) missing.push(`Tiled Diffusion window ${f["Tiled Diffusion window"] || "(none)"}`);
  const on = ours && !!cells;
  $("tiled_diffusion").checked = on;
  $("tiled_diffusion_circular").checked = on && /^true$/i.test((f["Tiled Diffusion circular"] || "").trim());
  if (text) set.push("tiled_diffusion");
  put("tiled_diffusion_window", on ? parseInt(cells[1], 10) : 64);
  put("tiled_diffusion_window_height", on && cells[2] !== cells[1] ? parseInt(cells[2], 10) : "");
  put("tiled_diffusion_stride", on && f["Tiled Diffusion stride"] ? parseInt(f["Tiled Diffusion stride"], 10) : 8);
  put("tiled_diffusion_batch", on && f["Tiled Diffusion batch"] ? parseInt(f["Tiled Diffusion batch"], 10) : 1);
}

/** A file of the server's list (GET /v1/ip_adapters, /v1/clip_vision: paths in its folder) that an infotext names by
 * its stem (sdengine writes the file's or folder's name without its suffix and folders); null if none or several. */
function fileByStem(select, name) {
  const stem = (path) => path.split("/").pop().replace(/\.(safetensors|bin|pt|pth|ckpt)$/i, "");
  const found = [...select.options].filter((o) => o.value && stem(o.value) === name);
  return found.length === 1 ? found[0].value : null;
}

/** The FLUX.1 Redux unit of an infotext (sdengine's "Redux 0: "Image: NAME [hash], Strength: s, Model: NAME [hash],
 * SigLIP: NAME [hash]"", as sdengine.metadata.recorded_redux reads it): its model, strength and SigLIP encoder (the
 * image is not in the infotext: the one picked stays). What this page cannot set is said: a model or encoder this
 * server lacks, a second unit. */
function applyRedux(f, put, missing) {
  const keys = Object.keys(f).filter((k) => /^Redux \d+$/.test(k)).sort((a, b) => parseInt(a.slice(6), 10)
    - parseInt(b.slice(6), 10));
  if (!keys.length) { $("redux-file").value = ""; return; } // made without Redux: none sent
  const unit = {};
  for (const m of String(f[keys[0]]).matchAll(/\s*([^:,]+):\s*([^,]*)/g)) unit[m[1].trim()] = m[2].trim();
  const nameOf = (text) => (text || "").replace(/\s*\[[0-9a-fA-F]+\]$/, "").trim();
  if (unit.Strength !== undefined) put("redux-strength", parseFloat(unit.Strength));
  const model = fileByStem($("redux-model"), nameOf(unit.Model));
  if (!model || !put("redux-model", model)) missing.push(`Redux model ${nameOf(unit.Model)}`);
  if (unit.SigLIP) {
    const siglip = fileByStem($("redux-siglip"), nameOf(unit.SigLIP));
    if (!siglip || !put("redux-siglip", state.siglipChoice ? siglip : "")) missing.push(`Redux SigLIP ${nameOf(unit.SigLIP)}`);
  }
  if (unit.Tokens) missing.push("Redux SigLIP tokens (given, not an image)");
  for (const k of keys.slice(1)) missing.push(`${k} (this page runs one Redux image)`);
}

/** The IP-Adapter of an infotext (sdengine's "IP-Adapter 0: "Model: NAME [HASH], Weight: w, CLIP vision: NAME [HASH],
 * Negative rule: r, Images: k[, Start: s, End: e]"", as sdengine.metadata.recorded_ip_adapters reads it): ticked with
 * its model, scale, window, encoder and rule (the picture is not in the infotext: the one picked stays), or unticked
 * for an image made without one. What this page cannot set is said: a model or encoder this server lacks, a scaling
 * or per-layer weights, a second unit. */
function applyIpAdapter(f, put, missing) {
  const keys = Object.keys(f).filter((k) => /^IP-Adapter \d+$/.test(k)).sort((a, b) => parseInt(a.slice(11), 10)
    - parseInt(b.slice(11), 10));
  $("ipa-enabled").checked = keys.length > 0 && !$("ipa-enabled").disabled;
  if (!keys.length) return;
  const unit = {};
  for (const m of String(f[keys[0]]).matchAll(/\s*([^:,]+):\s*([^,]*)/g)) unit[m[1].trim()] = m[2].trim();
  const nameOf = (text) => (text || "").replace(/\s*\[[0-9a-fA-F]+\]$/, "").trim();
  const model = fileByStem($("ipa-model"), nameOf(unit.Model));
  if (!model || !put("ipa-model", model)) missing.push(`IP-Adapter ${nameOf(unit.Model)}`);
  put("ipa-scale", unit.Weight !== undefined ? parseFloat(unit.Weight) : 1);
  put("ipa-start", unit.Start !== undefined ? parseFloat(unit.Start) : 0);
  put("ipa-end", unit.End !== undefined ? parseFloat(unit.End) : 1);
  if (unit["CLIP vision"] !== undefined) {
    const clip = fileByStem($("ipa-clip"), nameOf(unit["CLIP vision"]));
    if (!clip || !put("ipa-clip", clip)) missing.push(`CLIP vision ${nameOf(unit["CLIP vision"])}`);
  } else {
    put("ipa-clip", "");
  }
  const rule = (unit["Negative rule"] || "diffusers").trim();
  if (!put("ipa-rule", rule)) missing.push(`IP-Adapter negative rule ${rule}`);
  if (unit.Scaling && unit.Scaling !== "output") missing.push(`IP-Adapter scaling ${unit.Scaling}`);
  if (unit["Layer weights"]) missing.push("IP-Adapter layer weights (this page sets one scale)");
  if (unit.Images && parseInt(unit.Images, 10) > 1) {
    missing.push(`IP-Adapter ${unit.Images} pictures (this page sends one)`);
  }
  for (const k of keys.slice(1)) missing.push(`${k} (this page runs one IP-Adapter)`);
}

/** The hires fix of an infotext ("Hires upscale", "Hires steps", "Hires upscaler"; A1111's names): ticked
 * with its settings, or unticked for an image made without it. What this page cannot set is said. */
function applyHires(f, put, missing) {
  const keys = Object.keys(f).filter((k) => k.startsWith("Hires "));
  $("hr-enabled").checked = keys.length > 0;
  if (!keys.length) return;
  if (f["Hires upscale"]) put("hr-scale", parseFloat(f["Hires upscale"]));
  put("hr-steps", f["Hires steps"] ? parseInt(f["Hires steps"], 10) : 0);
  const upscaler = f["Hires upscaler"] || "Latent";
  if (!put("hr-upscaler", upscaler)) missing.push(`hires upscaler ${upscaler}`);
  if (f["Denoising strength"]) put("hr-strength", parseFloat(f["Denoising strength"]));
  // As sdengine.metadata.hires_kwargs reads them; an image without one has the job's (sampler, prompts) or the scale
  const resize = /^(\d+)x(\d+)$/.exec((f["Hires resize"] || "").trim());
  if (f["Hires resize"] && !resize) missing.push(`Hires resize ${f["Hires resize"]}`);
  put("hr-resize-x", resize ? resize[1] : 0);
  put("hr-resize-y", resize ? resize[2] : 0);
  const sampler = f["Hires sampler"] ? samplerFromA1111(f["Hires sampler"]) : null;
  if (f["Hires sampler"] && !sampler) missing.push(`Hires sampler ${f["Hires sampler"]}`);
  put("hr-sampler", sampler ? sampler.sampler : "");
  let schedule = sampler?.schedule || "";
  if (f["Hires schedule type"]) {
    schedule = scheduleFromA1111(f["Hires schedule type"], sampler || (f.Sampler ? samplerFromA1111(f.Sampler) : null));
    if (!schedule) missing.push(`Hires schedule type ${f["Hires schedule type"]}`);
  }
  put("hr-schedule", schedule || "");
  // its own prompts hold the styles the prompts held (merged into both): taken out as well where they all are
  const styles = chosenStyles();
  let [hrPrompt, hrNegative] = [f["Hires prompt"] || "", f["Hires negative prompt"] || ""];
  let all = true;
  let [p, n] = [hrPrompt, hrNegative];
  for (const st of [...styles].reverse()) {
    const [okP, p2] = p ? extractStyleText(st.prompt || "", p) : [true, p];
    const [okN, n2] = n ? extractStyleText(st.negative_prompt || "", n) : [true, n];
    if (!okP || !okN) { all = false; break; }
    [p, n] = [p2, n2];
  }
  if (all) [hrPrompt, hrNegative] = [p, n];
  put("hr-prompt", hrPrompt);
  put("hr-negative-prompt", hrNegative);
  const known = ["Hires upscale", "Hires steps", "Hires upscaler", "Hires resize", "Hires sampler",
    "Hires schedule type", "Hires prompt", "Hires negative prompt"];
  for (const k of keys) {
    if (!known.includes(k)) missing.push(`${k} ${f[k]}`);
  }
}

// --------------------------------------------------------------------------------- images in

let painter;

function setMode(mode) {
  $("mode").value = mode;
  updateMode();
}

function updateMode() {
  const mode = $("mode").value;
  const inpaint = mode === "inpaint";
  $("mask-tools").hidden = !inpaint;
  $("mask_blur").closest(".field").hidden = !inpaint;
  $("masked_content").closest(".field").hidden = !inpaint;
  $("differential_diffusion").closest(".field").hidden = !inpaint;
  $("noise_multiplier").closest(".field").hidden = mode === "txt2img";
  $("mask-canvas").hidden = !inpaint;
  $("strength").closest(".field").hidden = mode === "txt2img";
  $("vae_encode").closest(".field").hidden = mode === "txt2img"; // only an init image is encoded
  // Text to image sends no init image: its stage is not shown (it was, after "Send to inpaint", as if it were
  // used); the image is kept, and shown again when the mode goes back to img2img or inpaint.
  $("init-stage").hidden = mode === "txt2img" || !state.initBlob || !$("init-preview").naturalWidth;
}

/** The init image (a picked or dropped file, or a result sent here); ``sendSize``: the width and height become
 * the image's (snapped to the model's multiple). */
function setInitImage(blob, mode, sendSize = false) {
  state.initBlob = blob;
  $("err-init_image").textContent = ""; // an earlier file's "not an image" is over
  URL.revokeObjectURL($("init-preview").src);
  const url = URL.createObjectURL(blob);
  const img = $("init-preview");
  img.onload = () => {
    painter.reset(img.naturalWidth, img.naturalHeight);
    if (sendSize) {
      $("width").value = img.naturalWidth;
      $("height").value = img.naturalHeight;
      snap($("width"));
      snap($("height"));
      saveSettings();
    }
    $("init-stage").hidden = $("mode").value === "txt2img";
    $("init-stage").scrollIntoView({ block: "nearest" });
  };
  img.onerror = () => {  // not an image: no stale stage (and mask) of the previous one behind a broken preview
    state.initBlob = null;
    $("init-stage").hidden = true;
    showError("init_image", `${blob.name || "that file"}: not an image this page can read (PNG, JPEG or WebP)`);
  };
  img.src = url;
  $("img2img-section").open = true;
  if (mode || $("mode").value === "txt2img") setMode(mode || "img2img");
}

function setControlImage(blob) {
  state.controlBlob = blob;
  URL.revokeObjectURL($("cn-source").src);
  const url = URL.createObjectURL(blob);
  $("err-controlnet").textContent = "";
  $("cn-source").onerror = () => {  // not an image: said now, not shown as a broken picture and sent later
    state.controlBlob = null;
    $("cn-source").hidden = true;
    showError("controlnet", `${blob.name || "that file"}: not an image this page can read (PNG, JPEG or WebP)`);
  };
  $("cn-source").src = url;
  $("cn-source").hidden = false;
  $("cn-preview").hidden = true;
  $("cn-enabled").checked = true;
  $("controlnet-section").open = true;
}

/** The IP-Adapter's window, sent only where it is not the whole schedule (0 and 1, the API's defaults). */
function ipaWindow() {
  const start = number("ipa-start", "IP-Adapter start", false);
  const end = number("ipa-end", "IP-Adapter end", false);
  return start === 0 && end === 1 ? {} : { start, end };
}

function setIpAdapterImage(blob) {
  state.ipaBlob = blob;
  URL.revokeObjectURL($("ipa-source").src);
  $("err-ip_adapter").textContent = "";
  $("ipa-source").onerror = () => {  // not an image: said now, not sent later
    state.ipaBlob = null;
    $("ipa-source").hidden = true;
    showError("ip_adapter", `${blob.name || "that file"}: not an image this page can read (PNG, JPEG or WebP)`);
  };
  $("ipa-source").src = URL.createObjectURL(blob);
  $("ipa-source").hidden = false;
  if (!$("ipa-enabled").disabled) $("ipa-enabled").checked = true;
  $("ip-adapter-section").open = true;
}

function cnOptions() {
  const unit = { preprocessor: $("cn-pre").value };
  if (unit.preprocessor === "canny") {  // an empty box was once sent as null and silently became the default
    unit.low = number("cn-low", "ControlNet Canny low threshold", false);
    unit.high = number("cn-high", "ControlNet Canny high threshold", false);
  }
  return unit;
}

async function previewControl() {
  $("err-controlnet").textContent = "";
  try {
    const image = await upload(state.controlBlob, "controlnet");
    const r = await api("/v1/controlnets/preprocess", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image, ...cnOptions() }) });
    URL.revokeObjectURL($("cn-preview").src);
    $("cn-preview").src = URL.createObjectURL(await r.blob());
    $("cn-preview").hidden = false;
  } catch (e) {
    showError("controlnet", e.message, e.field);
  }
}

// --------------------------------------------------------------------------------- the request

function number(id, label, integer) {
  const v = $(id).valueAsNumber;
  if (!Number.isFinite(v)) throw new ApiError(400, `${label}: enter a number`, id);
  if (integer && !Number.isInteger(v)) throw new ApiError(400, `${label}: enter a whole number`, id);
  return v;
}

/** "Resize seed from" as [width, height], or null when both boxes are empty; one of the two alone is refused. */
function seedResizeFrom() {
  const [w, h] = SEED_RESIZE_INPUTS.map(([id]) => $(id).value.trim() !== "" || !$(id).validity.valid);
  if (!w && !h) return null;
  for (const [id, label] of SEED_RESIZE_INPUTS) {
    if ($(id).value.trim() === "" && $(id).validity.valid) {
      throw new ApiError(400, `${label}: give both the width and the height, or neither (off)`, id);
    }
  }
  return SEED_RESIZE_INPUTS.map(([id, label]) => number(id, label, true));
}

// The families whose models take no U-Net patch, ControlNet, IP-Adapter or embedding (their sections are hidden)
// (Qwen-Image and Z-Image were missing here: the page kept an SD sampler and CFG 7 for them and showed SD's sections)
const FLOW_FAMILIES = ["sd3", "flux", "chroma", "qwen_image", "z_image", "flux2"];
const U_NET_ONLY = ["unet-patches", "controlnet-section", "ip-adapter-section", "embeddings-section"];
const PAG_FAMILIES = ["sd", "sd3"]; // perturbed-attention guidance: U-Nets and SD3's MMDiT (docs/sd3.md)
// PAG's layers by default: a U-Net's middle block, SD3's joint block 1 (diffusers' pag_applied_layers defaults)
function pagDefault(family) { return family === "sd3" ? "blocks.1" : "mid"; }

function familyOf(model) { return (state.family || {})[model] || "sd"; }
// A Flux model's kind (plain / fill / control) or a FLUX.2 one's (klein / dev); null: not told before it loads
function kindOf(model) { return (state.kind || {})[model] || null; }

// SD3's shift and skip-layer guidance, Flux's distilled guidance: sent for a model of that family only, empty
// inputs not sent (the model's own)
function familySettings() {
  const family = familyOf($("model").value);
  const out = {};
  const guided = family === "flux" || (family === "flux2" && kindOf($("model").value) === "dev");
  if (guided && $("distilled_cfg_scale").value.trim() !== "") {
    out.distilled_cfg_scale = number("distilled_cfg_scale", "Distilled guidance", false);
  }
  if (family === "sdxl") Object.assign(out, sdxlSettings());
  if (family !== "sd3") return out;
  if ($("shift").value.trim() !== "") out.shift = number("shift", "Shift", false);
  const layers = $("slg_layers").value.trim();
  if (layers) {
    const blocks = layers.split(",").map((x) => (x.trim() === "" ? NaN : Number(x)));
    if (!blocks.every(Number.isInteger)) {
      throw new ApiError(400, "Skip-layer guidance blocks: whole numbers separated by commas (e.g. 7, 8, 9), or nothing (off)", "slg_layers");
    }
    out.sd3 = { skip_guidance_layers: blocks, skip_layer_guidance_scale: number("slg_scale", "Skip-layer guidance scale", false),
      skip_layer_guidance_start: number("slg_start", "Skip-layer guidance start", false),
      skip_layer_guidance_stop: number("slg_stop", "Skip-layer guidance stop", false) };
  }
  return out;
}

// SDXL's settings as the job's fields: ``sdxl`` with the inputs that are not empty (none: not sent), and the refiner
// with its switch when one is chosen. A size is WIDTHxHEIGHT (sent as [height, width]), a crop "top, left".
function sdxlSettings() {
  const out = {};
  const sdxl = {};
  for (const [id, key] of Object.entries(SDXL_TEXTS)) if ($(id).value !== "") sdxl[key] = $(id).value;
  const pair = (id, re, what) => {
    const m = $(id).value.trim().match(re);
    if (!m) throw new ApiError(400, `${$(id).labels[0].textContent}: ${what}, or nothing (the default)`, id);
    return [Number(m[1]), Number(m[2])];
  };
  for (const [id, key] of Object.entries(SDXL_SIZES)) {
    if ($(id).value.trim() === "") continue;
    const [w, h] = pair(id, /^(\d+)\s*[x×,]\s*(\d+)$/i, "WIDTHxHEIGHT in pixels (e.g. 1024x1024)");
    sdxl[key] = [h, w];
  }
  for (const [id, key] of Object.entries(SDXL_CROPS)) {
    if ($(id).value.trim() !== "") sdxl[key] = pair(id, /^(\d+)\s*,\s*(\d+)$/, "TOP, LEFT in pixels (e.g. 0, 0)");
  }
  for (const [id, key] of Object.entries(SDXL_SCORES)) {
    if ($(id).value.trim() !== "") sdxl[key] = number(id, $(id).labels[0].textContent, false);
  }
  if (Object.keys(sdxl).length) out.sdxl = sdxl;
  if ($("refiner").value) {
    out.refiner = $("refiner").value;
    out.refiner_switch_at = number("refiner_switch_at", "Refiner switch at", false);
    if ($("refiner_switch_rule").value !== "diffusers") out.refiner_switch_rule = $("refiner_switch_rule").value;
  }
  return out;
}

// An image's SDXL settings (sdengine's "SDXL options" JSON, A1111's "Refiner" / "Refiner switch at") into the inputs;
// empty where the image has none. A refiner this server lacks is said missing.
function applySdxl(f, put, missing) {
  let xl = {};
  try { xl = f["SDXL options"] ? JSON.parse(f["SDXL options"]) : {}; } catch (e) { missing.push("SDXL options (not JSON)"); }
  const text = (v) => (typeof v === "string" ? v : "");
  const size = (v) => (Array.isArray(v) && v.length === 2 ? `${v[1]}x${v[0]}` : "");
  const crop = (v) => (Array.isArray(v) && v.length === 2 ? `${v[0]}, ${v[1]}` : "");
  for (const [id, key] of Object.entries(SDXL_TEXTS)) put(id, text(xl[key]));
  for (const [id, key] of Object.entries(SDXL_SIZES)) put(id, size(xl[key]));
  for (const [id, key] of Object.entries(SDXL_CROPS)) put(id, crop(xl[key]));
  for (const [id, key] of Object.entries(SDXL_SCORES)) put(id, typeof xl[key] === "number" ? xl[key] : "");
  const refiner = (f.Refiner || "").replace(/\s*\[[0-9a-f]+\]\s*$/i, "").trim();
  put("refiner", "");
  if (refiner && !put("refiner", refiner)) missing.push(`refiner ${refiner}`);
  // A1111 writes no switch for its None (the refiner from the first step)
  put("refiner_switch_at", refiner ? parseFloat(f["Refiner switch at"] || "0") : 0.8);
  put("refiner_switch_rule", (f["Refiner switch rule"] || (refiner && !/^sdengine/.test((f.Version || "").trim()) ? "a1111" : "diffusers")).trim());
}

// FLUX.1 Kontext's reference images and FLUX.1 Depth / Canny's control image: uploaded and sent for a Flux model
// whose inputs are shown only (the server refuses what its kind does not take, in one line under the input)
async function fluxImages() {
  const out = {};
  const family = familyOf($("model").value);
  if (family !== "flux" && family !== "flux2") return out;
  const refs = $("reference-files").closest(".field").hidden ? [] : [...$("reference-files").files];
  if (refs.length) {
    if (family === "flux" && refs.length > 4) {
      throw new ApiError(400, "Reference images: at most 4 (FLUX.1 Kontext)", "reference_images");
    }
    out.reference_images = [];
    for (const f of refs) out.reference_images.push(await upload(f, "reference_images"));
    // each its own size (Kontext's choice; FLUX.2 fits its references as diffusers does)
    if (family === "flux" && !$("reference-resize").checked) out.reference_auto_resize = false;
  }
  const reduxFile = $("redux-file").closest(".field").hidden ? null : $("redux-file").files[0];
  if (reduxFile) { // FLUX.1 Redux: one unit (the job's redux)
    if (!$("redux-model").value) {
      throw new ApiError(400, "Redux: this server has no Redux model (put one in --models-dir's style_models/)", "redux");
    }
    const unit = { model: $("redux-model").value, image: await upload(reduxFile, "redux"),
      strength: number("redux-strength", "Redux strength", false) };
    if (state.siglipChoice && $("redux-siglip").value) unit.siglip = $("redux-siglip").value;
    out.redux = [unit];
  }
  const control = $("control-image-file").closest(".field").hidden ? null : $("control-image-file").files[0];
  if (control) {
    out.control_image = await upload(control, "control_image");
    const pre = $("control-preprocessor").value; // the map made from a photo (canny) before the model takes it
    if (pre !== "none") out.control_preprocessor = pre;
  }
  return out;
}

// Going from an SD model to an SD3 / Flux one, the sampler, schedule and guidance become that model's defaults
// (GET /v1/models: Flux runs Euler at CFG 1, SD3 Euler at 7 on the flow's own grid); going back, the SD choices
// made before return.
function followFamilyDefaults(before, after) {
  const flowBefore = FLOW_FAMILIES.includes(familyOf(before));
  const flowAfter = FLOW_FAMILIES.includes(familyOf(after));
  const keys = ["sampler", "schedule", "cfg_scale"];
  let chosen = null;
  if (flowAfter) {
    if (!flowBefore) state.sdChoices = Object.fromEntries(keys.map((k) => [k, $(k).value]));
    chosen = state.defaults[after] || {};
  } else if (flowBefore && state.sdChoices) {
    chosen = state.sdChoices;
  }
  if (!chosen) return;
  setValue("sampler", chosen.sampler);
  setValue("schedule", chosen.schedule);
  setValue("cfg_scale", chosen.cfg_scale);
  saveSettings();
}

// Show the selected model's own settings (SD3, Flux) and hide what its family does not take.
function fitFamily() {
  const family = familyOf($("model").value);
  let any = false;
  const kind = kindOf($("model").value);
  // data-family / data-kind: the families and kinds (space-separated) an input is shown for; any kind when not told
  for (const el of document.querySelectorAll("[data-family]")) {
    const kinds = el.dataset.kind ? el.dataset.kind.split(" ") : null;
    el.hidden = !el.dataset.family.split(" ").includes(family) || Boolean(kinds && kind && !kinds.includes(kind));
    if (el.classList.contains("field")) any ||= !el.hidden;
  }
  if (!state.siglipChoice) $("redux-siglip").closest(".field").hidden = true; // one SigLIP or none: nothing to choose
  $("family-settings").hidden = !any;
  $("family-title").hidden = !any;
  for (const id of U_NET_ONLY) $(id).hidden = FLOW_FAMILIES.includes(family);
  const pag = PAG_FAMILIES.includes(family);
  $("unet-patches-title").hidden = !pag;
  $("pag-fields").hidden = !pag;
  const layers = $("pag_layers"); // the other family's default layers (or none): this family's
  if (pag && ["", "mid", "blocks.1"].includes(layers.value.trim())) layers.value = pagDefault(family);
}

async function buildRequest() {
  let [prompt, negative] = [$("prompt").value, $("negative_prompt").value];
  for (const st of chosenStyles()) {
    prompt = mergeStyle(st.prompt || "", prompt);
    negative = mergeStyle(st.negative_prompt || "", negative);
  }
  const body = {
    prompt,
    negative_prompt: negative,
    model: $("model").value || null,
    sampler: $("sampler").value,
    schedule: $("schedule").value,
    steps: number("steps", "Steps", true),
    cfg_scale: number("cfg_scale", "Guidance", false),
    seed: number("seed", "Seed", true),
    width: number("width", "Width", true),
    height: number("height", "Height", true),
    batch_size: number("batch_size", "Batch size", true),
    clip_skip: number("clip_skip", "Clip skip", true),
    clip_skip_rule: $("clip_skip_rule").value,
    vae_decode: $("vae_decode").value,
  };
  if ($("vae").value) body.vae = $("vae").value; // the job's VAE; not sent: the model's
  Object.assign(body, familySettings());
  Object.assign(body, await fluxImages());
  const unet = !FLOW_FAMILIES.includes(familyOf($("model").value)); // SD3 and Flux take no U-Net patch
  const family = familyOf($("model").value);
  const pag = PAG_FAMILIES.includes(family) ? number("pag_scale", "PAG scale", false) : 0;
  if (pag > 0) { // perturbed-attention guidance (U-Nets, SD3); not sent at 0 (off)
    body.pag_scale = pag;
    body.pag_layers = $("pag_layers").value.trim() || pagDefault(family);
  }
  const sag = unet ? number("sag_scale", "SAG scale", false) : 0;
  if (sag !== 0) { // self-attention guidance; not sent at 0 (off)
    Object.assign(body, { sag_scale: sag, sag_blur_sigma: number("sag_blur_sigma", "SAG blur sigma", false), sag_rule: $("sag_rule").value });
  }
  if ($("tiling").checked) body.tiling = true;
  const resize = seedResizeFrom();
  if (resize) body.seed_resize_from = resize;
  const freeu = unet ? $("freeu").value.trim() : "";
  if (freeu) { // FreeU; not sent when empty (off)
    const factors = freeu.split(",").map((x) => (x.trim() === "" ? NaN : Number(x)));
    if (factors.length !== 4 || !factors.every(Number.isFinite)) {
      throw new ApiError(400, "FreeU: enter four numbers b1, b2, s1, s2 (e.g. 1.3, 1.4, 0.9, 0.2), or nothing (off)", "freeu");
    }
    Object.assign(body, { freeu: factors, freeu_version: Number($("freeu_version").value), freeu_rule: $("freeu_rule").value });
  }
  if (unet && $("deep_shrink").value === "on") { // Deep Shrink; not sent when off
    body.deep_shrink = Object.fromEntries(Object.entries(DEEP_SHRINK_INPUTS).map(([key, [id, label]]) => [key,
      key === "after_skip" ? $(id).value === "true" : key.endsWith("_method") ? $(id).value
        : number(id, label, key === "block")]));
  }
  if (unet && $("hypertile").value) { // HyperTile; not sent when off
    Object.assign(body, { hypertile: HYPERTILE_INPUTS.map(([id, label]) => number(id, label, true)),
      hypertile_hires_only: $("hypertile").value === "hires", hypertile_rule: $("hypertile_rule").value,
      hypertile_scale_depth: $("hypertile_scale_depth").value === "true" });
  }
  if ($("hypertile_vae").checked) { // HyperTile on the VAE; not sent when off
    body.hypertile_vae = HYPERTILE_VAE_INPUTS.map(([id, label]) => number(id, label, true));
  }
  if ($("tiled_diffusion").checked) { // MultiDiffusion; not sent when off
    const [heightId, heightLabel] = TILED_DIFFUSION_INPUTS.window_height;
    const height = $(heightId).value.trim() === "" && $(heightId).validity.valid ? null
      : number(heightId, heightLabel, true);
    body.tiled_diffusion = { window: number(...TILED_DIFFUSION_INPUTS.window, true),
      ...(height !== null ? { window_height: height } : {}),
      stride: number(...TILED_DIFFUSION_INPUTS.stride, true), circular: $("tiled_diffusion_circular").checked,
      view_batch: number(...TILED_DIFFUSION_INPUTS.view_batch, true) };
  }
  const mode = $("mode").value;
  if ($("hr-enabled").checked) {
    if (mode !== "txt2img") {
      throw new ApiError(400, "the hires fix is for text to image: untick it or choose text to image", "hr-enabled");
    }
    const strength = number("hr-strength", "Hires denoising strength", false);
    if (!(strength > 0 && strength <= 1)) {
      throw new ApiError(400, "Hires denoising strength: a number over 0 and up to 1", "hr-strength");
    }
    body.strength = strength;
    body.hires = {
      hr_scale: number("hr-scale", "Hires upscale by", false), hr_upscaler: $("hr-upscaler").value,
      hr_second_pass_steps: number("hr-steps", "Hires steps", true),
      hr_resize_x: number("hr-resize-x", "Hires resize width", true),
      hr_resize_y: number("hr-resize-y", "Hires resize height", true),
      hr_sampler: $("hr-sampler").value || null, hr_schedule: $("hr-schedule").value || null,
      hr_prompt: $("hr-prompt").value, hr_negative_prompt: $("hr-negative-prompt").value,
    };
    // the styles reach the hires fix's own prompts too, where given (A1111's: "" stays the job's prompt)
    for (const st of chosenStyles()) {
      if (body.hires.hr_prompt) body.hires.hr_prompt = mergeStyle(st.prompt || "", body.hires.hr_prompt);
      if (body.hires.hr_negative_prompt) {
        body.hires.hr_negative_prompt = mergeStyle(st.negative_prompt || "", body.hires.hr_negative_prompt);
      }
    }
  }
  if (mode !== "txt2img") {
    if (!state.initBlob) throw new ApiError(400, "pick or drop an init image, or choose text to image", "init_image");
    body.strength = number("strength", "Strength", false);
    body.vae_encode = $("vae_encode").value;
    const multiplier = number("noise_multiplier", "Noise multiplier", false);
    if (multiplier !== 1) body.noise_multiplier = multiplier; // A1111's default: not sent, as the API's
    body.init_image = await upload(state.initBlob, "init_image");
    if (mode === "inpaint") {
      if (!painter.painted) throw new ApiError(400, "paint the area to repaint on the image first", "mask");
      body.mask = await upload(await painter.toBlob(), "mask");
      body.mask_blur = number("mask_blur", "Mask blur", false);
      if ($("masked_content").value !== "original") body.masked_content = $("masked_content").value;
      const soft = number("differential_diffusion", "Soft inpainting", false);
      if (soft !== 0) body.differential_diffusion = soft; // off: not sent, as the API's default
    }
  }
  // img2img and the hires fix count their steps by it, and DDIM / PLMS walk A1111's own grid under A1111's rules
  // (text to image too); not sent where it changes nothing (it would be written into the image's parameters)
  if (body.strength !== undefined || gridSampler(body.sampler)) body.strength_rule = $("strength_rule").value;
  if (unet && $("cn-enabled").checked) {
    if (!$("cn-model").value) throw new ApiError(400, "this server has no ControlNet", "controlnet");
    if (!state.controlBlob) throw new ApiError(400, "ControlNet: pick or drop a control image", "controlnet");
    body.controlnets = [{
      model: $("cn-model").value, image: await upload(state.controlBlob, "controlnet"), ...cnOptions(),
      weight: number("cn-weight", "ControlNet weight", false), start: number("cn-start", "ControlNet start", false),
      end: number("cn-end", "ControlNet end", false),
      ...($("cn-rule").value !== "diffusers" ? { rule: $("cn-rule").value } : {}),
      ...($("cn-mode").value !== "balanced" ? { mode: $("cn-mode").value } : {}),
    }];
  }
  if (unet && $("ipa-enabled").checked) {
    if (!$("ipa-model").value) throw new ApiError(400, "this server has no IP-Adapter", "ip_adapter");
    if (!state.ipaBlob) throw new ApiError(400, "IP-Adapter: pick or drop an image prompt", "ip_adapter");
    body.ip_adapters = [{
      model: $("ipa-model").value, image: await upload(state.ipaBlob, "ip_adapter"),
      scale: number("ipa-scale", "IP-Adapter scale", false),
      ...ipaWindow(),
      ...($("ipa-clip").value ? { clip_vision: $("ipa-clip").value } : {}),
      ...($("ipa-rule").value !== "diffusers" ? { negative_rule: $("ipa-rule").value } : {}),
    }];
  }
  body.loras = state.loras.flatMap((l, i) => ($(`lora-use-${i}`).checked
    ? [{ name: l.name, weight: number(`lora-weight-${i}`, `LoRA ${l.name} weight`, false) }] : []));
  return body;
}

// ---------------------------------------------------------------------------------- the job

function setRunning(running) {
  state.running = running;
  // The keyboard focus moves from the button being disabled to the other one (it fell back to the page's
  // start, and a keyboard user had to find Cancel, then Generate, again).
  const [from, to] = running ? ["generate", "cancel"] : ["cancel", "generate"];
  const moveFocus = document.activeElement === $(from) || (!running && document.activeElement === document.body);
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  if (moveFocus) $(to).focus({ preventScroll: true });
}

function showProgress(job) {
  const bar = $("progress");
  const text = $("progress-text");
  if (job.state === "queued") {
    bar.removeAttribute("value");
    text.textContent = job.position ? `Queued: ${job.position} job(s) before this one` : "Queued: next";
    return;
  }
  bar.max = Math.max(1, job.steps);
  bar.value = job.step;
  if (job.state === "running") {
    const eta = job.eta === null || job.eta === undefined ? "" : ` · ETA ${job.eta.toFixed(1)} s`;
    text.textContent = `Step ${job.step} / ${job.steps}${eta}`;
    // The queue's line of this job follows its steps too (it lagged the bar by up to the 5 s refresh).
    state.jobStep = job.step;
    const mine = document.querySelector("#queue li.mine span");
    if (mine) mine.textContent = queueLine(job, true);
  }
  if (job.preview) {
    $("live-preview").src = job.preview;
    $("live-preview").hidden = false;
  }
}

/** Follow a job through its event stream (fetch, so the key header goes along); the finished job. */
async function followJob(id) {
  // The stream says nothing while a job waits, also when the jobs before it leave the queue: its place is
  // asked for every 2 s (the page once said "1 job(s) before this one" until the job started).
  const queue = { state: "queued" };
  const poll = setInterval(() => {
    if (queue.state !== "queued") return;
    getJSON(`/v1/jobs/${id}`).then((job) => {
      if (queue.state === "queued" && job.state === "queued") showProgress(job);
    }).catch(() => { /* the stream or the loop below says what went wrong */ });
  }, QUEUE_POLL_MS);
  try {
    return await followJobEvents(id, queue);
  } finally {
    clearInterval(poll);
  }
}

async function followJobEvents(id, queue) {
  try {
    const r = await api(`/v1/jobs/${id}/events`, { headers: { Accept: "text/event-stream" } });
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        let data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (!data) continue;
        const job = JSON.parse(data);
        queue.state = job.state;
        showProgress(job);
        if (["done", "failed", "cancelled"].includes(name)) {
          reader.cancel().catch(() => {});
          return job;
        }
      }
    }
  } catch (e) {
    // A refused key or a job the server no longer has ends here; a stream a proxy cut or answered with a
    // 5xx (a 502/504 of a proxy that does not pass event streams) is not the job's end: it is asked below.
    if (!(e instanceof ApiError) || (e.status !== 0 && e.status < 500)) throw e;
  }
  // The stream ended early (a proxy, a network blip): ask for the job until it is finished; up to 20 failed
  // asks in a row (10 s) are a blip, more a server that is gone.
  let failures = 0;
  for (let i = 0; i < 36000; i++) {
    let job = null;
    try {
      job = await getJSON(`/v1/jobs/${id}`);
      failures = 0;
    } catch (e) {
      if (!(e instanceof ApiError) || (e.status !== 0 && e.status < 500) || ++failures > 20) throw e;
    }
    if (job) {
      queue.state = job.state;
      showProgress(job);
      if (["done", "failed", "cancelled"].includes(job.state)) return job;
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  throw new ApiError(0, "lost track of the job", "general");
}

async function generate() {
  if (state.running) return;
  clearErrors();
  if (document.body.dataset.ready !== "true") {
    showError("general", "not connected: the page has not got the server's models and samplers yet");
    readyFailed = true; // cleared once they come
    if (!readyRetry) ready(); // ask now (and for the API key, where that is what was missing)
    return;
  }
  for (const id of ["width", "height"]) snap($(id));
  saveSettings();
  setRunning(true);
  $("progress-text").textContent = "Sending…";
  $("live-preview").hidden = true;
  try {
    const body = await buildRequest();
    if (state.cancelAsked) {  // Cancel pressed while the images were uploading: nothing is sent
      $("progress-text").textContent = "Cancelled before it was sent";
      return;
    }
    const created = await (await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) })).json();
    await runJob(created.id, created.position);
  } catch (e) {
    $("progress-text").textContent = state.jobId ? afterJobError(e) : "Not started";
    showApiError(e);
  } finally {
    endJob();
  }
}

/** What the progress line says when following a sent job failed: a lost connection only when it was one. */
function afterJobError(e) {
  if (state.jobDone) return "Done, but its images could not be shown";
  if (e instanceof ApiError && e.status === 0) return "Lost the connection to the server during the job";
  return "Stopped following the job";
}

const JOB_KEY = "sdengine.job"; // the job this tab follows, so that a reload finds it again

function forgetJob() {
  try { sessionStorage.removeItem(JOB_KEY); } catch (e) { /* storage off */ }
}

function endJob() {
  state.jobId = null;
  state.jobStep = 0;
  state.jobDone = false;
  state.cancelAsked = false;
  if (!$("progress").hasAttribute("value")) $("progress").value = 0; // not left spinning as if still queued
  forgetJob();
  setRunning(false);
  status();
}

/** Follow job ``id`` to its end and show the outcome (a new job, or one this tab followed before a reload). */
async function runJob(id, position) {
  state.jobId = id;
  try { sessionStorage.setItem(JOB_KEY, id); } catch (e) { /* storage off */ }
  if (state.cancelAsked) api(`/v1/jobs/${id}`, { method: "DELETE" }).catch(showApiError);
  showProgress({ state: "queued", position });
  status();
  const job = await followJob(id);
  if (job.state === "done") {
    state.jobDone = true;
    await showResults(job.images.map((im) => ({ ...im, parameters: im.infotext })));
    $("live-preview").hidden = true;
    $("progress").value = $("progress").max;
    $("progress-text").textContent = `Done: ${job.images.length} image(s) in ` +
      `${(job.finished - job.started).toFixed(1)} s`;
    loadGallery(0);
  } else if (job.state === "cancelled") {
    $("progress-text").textContent = `Cancelled${job.step ? ` after step ${job.step} of ${job.steps}` : ""}`;
  } else {
    $("progress-text").textContent = "Failed";
    showError(fieldOf(job.error || ""), job.error || "the job failed");
  }
}

/** After a reload: the job this tab was following, if the server still has it unfinished. */
async function resumeJob() {
  let id = null;
  try { id = sessionStorage.getItem(JOB_KEY); } catch (e) { /* storage off */ }
  if (!id || state.running) return;
  let job;
  try {
    job = await getJSON(`/v1/jobs/${id}`);
  } catch (e) {
    forgetJob(); // the server no longer has it (restarted)
    return;
  }
  if (["done", "failed", "cancelled"].includes(job.state)) {
    forgetJob();
    return;
  }
  setRunning(true);
  try {
    await runJob(id, job.position);
  } catch (e) {
    $("progress-text").textContent = afterJobError(e);
    showApiError(e);
  } finally {
    endJob();
  }
}

async function cancel() {
  if (!state.running) return;
  $("cancel").disabled = true;
  $("progress-text").textContent = "Cancelling…";
  if (!state.jobId) {  // still being sent: cancelled as soon as the server gives it an id (or before it is sent)
    state.cancelAsked = true;
    return;
  }
  try {
    await api(`/v1/jobs/${state.jobId}`, { method: "DELETE" });
  } catch (e) {
    showApiError(e);
  }
}

// ---------------------------------------------------------------------------------- results

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

async function showResults(items) {
  const box = $("results");
  const loaded = await Promise.all(items.map((item) => fetchImage(item.url)));
  // "Reuse the last seed" takes the seed of the image shown: a job's, or a reopened gallery image's (it once
  // kept the last job's seed after another image was opened).
  const seed = items[0]?.seed ?? parseInt(parseInfotext(items[0]?.parameters || "").fields.Seed, 10);
  state.lastSeed = Number.isInteger(seed) ? seed : null;
  $("seed-reuse").disabled = state.lastSeed === null;
  box.replaceChildren();
  for (const u of state.resultUrls.splice(0)) URL.revokeObjectURL(u);
  items.forEach((item, k) => {
    const { blob, objectUrl } = loaded[k];
    state.resultUrls.push(objectUrl);
    const fig = document.createElement("figure");
    fig.className = "result";
    const img = document.createElement("img");
    img.alt = `generated image ${item.name || ""}`.trim();
    img.src = objectUrl;
    const pre = document.createElement("pre");
    pre.className = "parameters";
    pre.textContent = item.parameters || "(no parameters in this image)";
    const actions = document.createElement("div");
    actions.className = "row";
    actions.append(
      // with its size, as A1111's send_size (default on): a hires result was once sent to the first pass's size
      button("Send to img2img", () => { setInitImage(blob, "img2img", true); $("img2img-section").scrollIntoView(); }),
      button("Send to inpaint", () => { setInitImage(blob, "inpaint", true); $("img2img-section").scrollIntoView(); }),
      button("Reuse parameters", () => { if (item.parameters) applyInfotext(item.parameters); }),
    );
    const a = document.createElement("a");
    a.className = "button";
    a.href = objectUrl;
    a.download = item.name || "sdengine.png";
    a.textContent = "Download";
    actions.append(a);
    // A job's saved image, or a gallery image the server wrote (not a file someone else put in the folder).
    if (item.name && (item.deletable ?? true)) {
      const del = button("Delete", () => deleteImage(item.name, fig, del));
      del.setAttribute("aria-label", `Delete ${item.name} from the server`);
      actions.append(del);
    }
    fig.append(img, pre, actions);
    box.append(fig);
  });
}

/** Remove an image the server wrote from its outputs folder (asked first), then from the page and the gallery. */
async function deleteImage(name, fig, del) {
  if (!window.confirm(`Delete ${name} from the server's outputs folder? This cannot be undone.`)) return;
  del.disabled = true;
  try {
    await api(`/v1/images/${encodeURIComponent(name)}`, { method: "DELETE" });
  } catch (e) {
    del.disabled = false;
    if (e.status !== 404) { showError("general", `${name}: ${e.message}`); return; } // gone already: as deleted
  }
  fig.remove();
  $("server-status").textContent = `Deleted ${name}`;
  loadGallery(state.galleryOffset);
}

async function loadGallery(offset) {
  try {
    const page = await getJSON(`/v1/gallery?offset=${offset}&limit=${GALLERY_PAGE}`);
    if (!page.items.length && page.total && offset > 0) {
      // Past the end (images were removed since this page was shown): the last page, not "13–3 of 3".
      return loadGallery(Math.floor((page.total - 1) / GALLERY_PAGE) * GALLERY_PAGE);
    }
    state.galleryOffset = page.offset;
    state.galleryTotal = page.total;
    const box = $("gallery");
    box.replaceChildren();
    for (const u of state.galleryUrls.splice(0)) URL.revokeObjectURL(u);
    for (const item of page.items) {
      const b = document.createElement("button");
      b.type = "button";
      b.setAttribute("aria-label", `Open ${item.name}`);
      b.title = item.parameters || item.name;
      const img = document.createElement("img");
      img.alt = item.name;
      b.append(img);
      // An image removed since the list was read: said, not an uncaught error and an unchanged page.
      b.addEventListener("click", () => showResults([item]).catch(showApiError));
      box.append(b);
      fetchImage(item.url).then(({ objectUrl }) => {
        state.galleryUrls.push(objectUrl);
        img.src = objectUrl;
      }).catch(() => { img.alt = `${item.name} (cannot be loaded)`; });
    }
    const last = Math.min(page.total, offset + page.items.length);
    $("gallery-page").textContent = page.total ? `${offset + 1}–${last} of ${page.total}` : "no images yet";
    $("gallery-prev").disabled = offset === 0;
    $("gallery-next").disabled = last >= page.total;
  } catch (e) {
    $("gallery-page").textContent = `gallery: ${e.message}`;
  }
}

// ------------------------------------------------------------------------------------ dropping

/** A dropped PNG, JPEG or WebP: its generation parameters fill the form (a PNG's text chunk, a JPEG's or WebP's
 * EXIF UserComment, where A1111 writes them; a JPEG was once said to have none). */
async function readDroppedImage(file) {
  const { kind, text } = await imageParameters(await file.arrayBuffer());
  if (!text) {
    showError("general", kind
      ? `${file.name}: no generation parameters in this image (only images made by sdengine or AUTOMATIC1111 ` +
        "carry them)"
      : `${file.name}: not a PNG, JPEG or WebP image`);
    return;
  }
  clearErrors();
  const { set, missing } = applyInfotext(text);
  $("server-status").textContent = `Read ${set.length} settings from ${file.name}`;
  if (missing.length) {
    showError("general", `${file.name}: not on this server, kept the current one: ${missing.join(", ")}`);
  }
}

function installDrop() {
  let depth = 0;
  const overlay = $("drop-overlay");
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (e) => { if (hasFiles(e)) { depth++; overlay.hidden = false; } });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) overlay.hidden = true; });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    depth = 0;
    overlay.hidden = true;
    const file = e.dataTransfer?.files?.[0];
    if (!file) return;
    e.preventDefault();
    if (e.target.closest?.("#init-drop, #init-stage")) setInitImage(file);
    else if (e.target.closest?.("#cn-drop")) setControlImage(file);
    else if (e.target.closest?.("#ipa-drop")) setIpAdapterImage(file);
    else readDroppedImage(file);
  });
}

// ------------------------------------------------------------------------------------- start

const queueModels = {}; // job id -> model, for the queue line the event stream updates (events may lack it)
const QUEUE_REFRESH_MS = 1000;
let queueTimer = null;

function queueLine(j, mine) {
  if (j.model) queueModels[j.id] = j.model;
  const where = j.state === "running" ? `running, step ${j.step} / ${j.steps}`
    : `queued, ${j.position ? `${j.position} before it` : "next"}`;
  return `${where} · ${queueModels[j.id] ?? ""}${mine ? " · this tab's job" : ""}`;
}

/** This client's unfinished jobs (every tab's; the admin key's: everyone's), each with a Cancel button. */
async function refreshQueue() {
  let jobs;
  try {  // not api(): a background refresh does not open the key dialog (a request the user made does)
    const r = await fetch("/v1/jobs", { headers: authHeaders() });
    if (!r.ok) return;
    jobs = (await r.json()).jobs.filter((j) => j.state === "queued" || j.state === "running");
  } catch (e) {
    return; // the header says when the server is not reachable
  }
  const rank = (j) => (j.state === "running" ? -1 : j.position ?? 0);
  jobs.sort((a, b) => rank(a) - rank(b));
  const list = $("queue");
  list.replaceChildren();
  for (const j of jobs) {
    const li = document.createElement("li");
    const mine = j.id === state.jobId;
    li.classList.toggle("mine", mine);
    const text = document.createElement("span");
    // this tab's job: not a step behind the bar (the list may have been read just before the bar's last event)
    text.textContent = queueLine(mine && j.state === "running" ? { ...j, step: Math.max(j.step, state.jobStep) } : j,
      mine);
    const stop = button("Cancel", async () => {
      stop.disabled = true;
      if (mine) return cancel();
      try { await api(`/v1/jobs/${j.id}`, { method: "DELETE" }); } catch (e) { showApiError(e); }
      refreshQueue();
    });
    stop.setAttribute("aria-label", `Cancel the ${j.state} job ${j.id}`);
    li.append(text, stop);
    list.append(li);
  }
  $("queue-box").hidden = jobs.length === 0;
  // While the list shows jobs it is read again every second (the header's 5 s refresh left another client's
  // finished job listed as running for up to 5 s); nothing is asked while it is empty.
  clearTimeout(queueTimer);
  if (jobs.length) queueTimer = setTimeout(refreshQueue, QUEUE_REFRESH_MS);
}

async function status() {
  if (document.body.dataset.ready === "true") refreshQueue();
  try {
    const h = await (await fetch("/healthz")).json();
    const devices = h.workers.map((w) => w.device).join(", ");
    $("server-status").textContent = `sdengine ${h.version} · ${h.model} on ${devices} · ` +
      `${h.running} running, ${h.queued} queued`;
  } catch (e) {
    $("server-status").textContent = "server not reachable";
  }
}

function install() {
  painter = new MaskPainter($("mask-canvas"), { brush: $("brush"), erase: $("erase") });
  $("gen-form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("gen-form").addEventListener("change", saveSettings);
  // As typed too: a prompt typed and the tab reloaded (or left) before the field lost focus was once lost.
  $("gen-form").addEventListener("input", saveSettings);
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); keyDeclined = false; generate(); }
    // Ctrl+Z undoes a mask stroke in inpainting, except where it undoes typing (a text or number field).
    if ((e.ctrlKey || e.metaKey) && !e.shiftKey && e.key.toLowerCase() === "z" && $("mode").value === "inpaint" &&
        !e.target.closest?.("textarea, input:not([type=checkbox]):not([type=range]), select") &&
        painter.undo()) e.preventDefault();
  });
  $("cancel").addEventListener("click", cancel);
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("focus", () => { state.activePrompt = id; });
    $(id).addEventListener("input", markEmbeddings);
  }
  $("embeddings-refresh").addEventListener("click", loadEmbeddings);
  $("sampler").addEventListener("change", fillSchedules);
  for (const id of ["width", "height"]) $(id).addEventListener("change", () => snap($(id)));
  $("model").addEventListener("change", () => {
    // Follow the new model's default size unless the user chose another size.
    const before = sizeOf(state.model);
    const after = sizeOf($("model").value);
    if ($("width").valueAsNumber === before.width && $("height").valueAsNumber === before.height) {
      $("width").value = after.width;
      $("height").value = after.height;
    }
    followFamilyDefaults(state.model, $("model").value);
    state.model = $("model").value;
    fitDecoder();
    fitFamily();
  });
  $("seed-random").addEventListener("click", () => { $("seed").value = "-1"; saveSettings(); });
  $("seed-reuse").addEventListener("click", () => {
    if (state.lastSeed !== null) { $("seed").value = String(state.lastSeed); saveSettings(); }
  });
  $("mode").addEventListener("change", updateMode);
  $("init-file").addEventListener("change", (e) => { if (e.target.files[0]) setInitImage(e.target.files[0]); });
  $("cn-file").addEventListener("change", (e) => { if (e.target.files[0]) setControlImage(e.target.files[0]); });
  $("cn-preview-button").addEventListener("click", previewControl);
  $("ipa-file").addEventListener("change", (e) => { if (e.target.files[0]) setIpAdapterImage(e.target.files[0]); });
  $("mask-invert").addEventListener("click", () => painter.invert());
  $("mask-clear").addEventListener("click", () => painter.clear());
  $("mask-undo").addEventListener("click", () => painter.undo());
  $("gallery-prev").addEventListener("click", () => loadGallery(Math.max(0, state.galleryOffset - GALLERY_PAGE)));
  $("gallery-next").addEventListener("click", () => loadGallery(state.galleryOffset + GALLERY_PAGE));
  $("gallery-refresh").addEventListener("click", () => loadGallery(state.galleryOffset));
  $("key-button").hidden = !localStorage.getItem(API_KEY);
  $("key-button").addEventListener("click", () => {
    askForKey("").then(() => { clearErrors(); if (document.body.dataset.ready !== "true") ready(); })
      .catch(showApiError);
  });
  installDrop();
  updateMode();
}

// The "Tiny VAE" decoder and encoder are offered only for a model that has them (GET /v1/models says which).
function fitDecoder() {
  for (const [id, has, none] of [
    ["vae_decode", state.tiny[$("model").value] === true, "Tiny VAE (this model has none)"],
    ["vae_encode", state.tinyEncoder[$("model").value] === true, "Tiny VAE (this model's has no encoder)"],
  ]) {
    const tiny = $(id).querySelector("option[value=tiny]");
    tiny.disabled = !has;
    tiny.textContent = has ? "Tiny VAE (fast)" : none;
    if (!has && $(id).value === "tiny") $(id).value = "full";
  }
}

let readyRetry = null;
let readyFailed = false;

async function ready() {
  clearTimeout(readyRetry);
  readyRetry = null;
  try {
    await loadPickers();
    restoreSettings();
    markEmbeddings();
    fitDecoder();
    fitFamily();
    state.model = $("model").value;
    updateMode();
    document.body.dataset.ready = "true";
  } catch (e) {
    if (e instanceof ApiError && e.status === 0) {
      // The server is down or restarting: ask again until it answers (the page once stayed without its
      // model and sampler lists, and Generate sent an empty sampler).
      showError("general", `${e.message}; trying again every ${READY_RETRY_MS / 1000} s`);
      readyRetry = setTimeout(ready, READY_RETRY_MS);
      readyFailed = true;
    } else {
      showApiError(e);
    }
    return;
  }
  if (readyFailed) clearErrors(); // the "cannot reach" and "not connected" messages are over
  readyFailed = false;
  loadGallery(0);
  refreshQueue();
  resumeJob();
}

async function start() {
  install();
  status();
  setInterval(status, 5000); // the header's running/queued counts stay current
  await ready();
}

start();
