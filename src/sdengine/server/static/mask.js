// The inpainting mask, painted with the mouse, a pen or a finger on a canvas laid over the init image.
// The canvas has the init image's pixel size; painted pixels are opaque white, the rest transparent.
// The mask sent to the server is white (repaint) on black (keep). Undo steps back over strokes, inverts and
// clears (as many as fit in UNDO_BYTES of snapshots, at least one).

const UNDO_BYTES = 64 * 1024 * 1024;

export class MaskPainter {
  constructor(canvas, { brush, erase, onChange }) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.brush = brush; // <input type=range>: the brush diameter in screen pixels
    this.erase = erase; // <input type=checkbox>
    this.onChange = onChange || (() => {});
    this.painted = false;
    this.last = null;
    this.history = []; // the canvas before each stroke, invert and clear; newest last
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const t of ["pointerup", "pointercancel", "pointerleave"]) canvas.addEventListener(t, () => this.up());
  }

  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.history = [];
    this.ctx.clearRect(0, 0, width, height);
    this.painted = false;
    this.onChange();
  }

  snapshot() {
    const { width, height } = this.canvas;
    this.history.push(this.ctx.getImageData(0, 0, width, height));
    const depth = Math.max(1, Math.floor(UNDO_BYTES / Math.max(1, width * height * 4)));
    if (this.history.length > depth) this.history.splice(0, this.history.length - depth);
  }

  /** Back to the mask before the last stroke, invert or clear; false when there is nothing to undo. */
  undo() {
    const before = this.history.pop();
    if (!before) return false;
    this.ctx.putImageData(before, 0, 0);
    this.painted = this.hasPaint();
    this.onChange();
    return true;
  }

  point(e) {
    const r = this.canvas.getBoundingClientRect();
    const sx = this.canvas.width / r.width;
    const sy = this.canvas.height / r.height;
    return { x: (e.clientX - r.left) * sx, y: (e.clientY - r.top) * sy, scale: (sx + sy) / 2 };
  }

  stroke(from, to) {
    const c = this.ctx;
    c.globalCompositeOperation = this.erase.checked ? "destination-out" : "source-over";
    c.strokeStyle = c.fillStyle = "#ffffff";
    c.lineCap = c.lineJoin = "round";
    c.lineWidth = Math.max(1, Number(this.brush.value) * to.scale);
    c.beginPath();
    c.moveTo(from.x, from.y);
    c.lineTo(to.x, to.y);
    c.stroke();
    c.beginPath();
    c.arc(to.x, to.y, c.lineWidth / 2, 0, 2 * Math.PI);
    c.fill();
    c.globalCompositeOperation = "source-over";
  }

  down(e) {
    if (e.button !== 0) return;
    this.canvas.setPointerCapture?.(e.pointerId);
    this.snapshot();
    this.last = this.point(e);
    this.stroke(this.last, this.last);
    e.preventDefault();
  }

  move(e) {
    if (!this.last) return;
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
    e.preventDefault();
  }

  up() {
    if (this.last) {
      this.last = null;
      this.painted = this.hasPaint();
      this.onChange();
    }
  }

  hasPaint() {
    const d = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
    return false;
  }

  clear() {
    this.snapshot();
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
    this.onChange();
  }

  invert() {
    this.snapshot();
    const img = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
    const d = img.data;
    for (let i = 0; i < d.length; i += 4) {
      d[i] = d[i + 1] = d[i + 2] = 255;
      d[i + 3] = 255 - d[i + 3];
    }
    this.ctx.putImageData(img, 0, 0);
    this.painted = this.hasPaint();
    this.onChange();
  }

  /** The mask as a PNG blob: white where painted, black elsewhere. */
  async toBlob() {
    const out = document.createElement("canvas");
    out.width = this.canvas.width;
    out.height = this.canvas.height;
    const c = out.getContext("2d");
    c.fillStyle = "#000000";
    c.fillRect(0, 0, out.width, out.height);
    c.drawImage(this.canvas, 0, 0);
    return await new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }
}
