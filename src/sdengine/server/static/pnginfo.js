// Reading generation parameters from image files in the browser: the PNG text chunks (tEXt, zTXt, iTXt), the
// EXIF UserComment of a JPEG or WebP (where AUTOMATIC1111 writes them, as sdengine.image_info reads them), and
// AUTOMATIC1111's "parameters" infotext format (which sdengine writes too).

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

async function inflate(bytes) {
  // zlib stream (PNG's compression method 0); DecompressionStream is built into the browser.
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function indexOfZero(bytes, from) {
  for (let i = from; i < bytes.length; i++) if (bytes[i] === 0) return i;
  return -1;
}

const latin1 = new TextDecoder("latin1");
const EXIF_CHUNK = "\0eXIf"; // where pngTextChunks keeps a PNG's eXIf chunk (no text keyword starts with NUL)
const utf8 = new TextDecoder("utf-8");

/** All text chunks of a PNG as {keyword: text}; null when the bytes are not a PNG. */
export async function pngTextChunks(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || PNG_SIGNATURE.some((b, i) => bytes[i] !== b)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = {};
  let pos = 8;
  while (pos + 8 <= bytes.length) {
    const length = view.getUint32(pos);
    const type = latin1.decode(bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + length);
    pos += 12 + length;
    if (data.length < length) break; // truncated file
    if (type === "IEND") break;
    try {
      if (type === "eXIf") {
        out[EXIF_CHUNK] = data;
      } else if (type === "tEXt") {
        const z = indexOfZero(data, 0);
        if (z > 0) out[latin1.decode(data.subarray(0, z))] = latin1.decode(data.subarray(z + 1));
      } else if (type === "zTXt") {
        const z = indexOfZero(data, 0);
        if (z > 0) out[latin1.decode(data.subarray(0, z))] = latin1.decode(await inflate(data.subarray(z + 2)));
      } else if (type === "iTXt") {
        const z = indexOfZero(data, 0);
        const compressed = data[z + 1] === 1;
        const langEnd = indexOfZero(data, z + 3);
        const transEnd = indexOfZero(data, langEnd + 1);
        if (z > 0 && langEnd > 0 && transEnd > 0) {
          const body = data.subarray(transEnd + 1);
          out[latin1.decode(data.subarray(0, z))] = utf8.decode(compressed ? await inflate(body) : body);
        }
      }
    } catch (e) {
      // a damaged chunk is skipped; the others are still read
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------- EXIF

const EXIF_IFD = 0x8769; // the Exif sub-IFD's pointer in IFD0
const USER_COMMENT = 0x9286;
const TYPE_SIZES = { 1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 9: 4, 10: 8 };

/** The text of an EXIF UserComment value: an 8-byte prefix names its character code (A1111 writes
 * "UNICODE\0" then UTF-16 big-endian; little-endian text of other tools is recognised by its zero bytes). */
export function decodeUserComment(value) {
  const prefix = latin1.decode(value.subarray(0, 8));
  const body = value.subarray(8);
  const strip = (t) => t.replace(/\0+$/, "");
  if (prefix === "UNICODE\0") {
    let first = 0;
    let second = 0;
    for (let i = 0; i + 1 < body.length; i += 2) { first += body[i] === 0; second += body[i + 1] === 0; }
    return strip(new TextDecoder(second > first ? "utf-16le" : "utf-16be").decode(body.subarray(0, body.length & ~1)));
  }
  if (prefix === "ASCII\0\0\0") return strip(latin1.decode(body));
  if (prefix === "JIS\0\0\0\0\0") return strip(new TextDecoder("shift_jis").decode(body));
  // An undefined code (all zero) or no prefix: UTF-8, as A1111 reads these.
  return strip(utf8.decode(prefix === "\0".repeat(8) ? body : value));
}

/** The UserComment of a TIFF-structured EXIF block ("II"/"MM" header, IFD0, the Exif IFD); null if none. */
export function exifUserComment(tiff) {
  if (tiff.length < 8) return null;
  const order = latin1.decode(tiff.subarray(0, 2));
  if (order !== "II" && order !== "MM") return null;
  const little = order === "II";
  const view = new DataView(tiff.buffer, tiff.byteOffset, tiff.byteLength);
  const u16 = (o) => view.getUint16(o, little);
  const u32 = (o) => view.getUint32(o, little);
  /** The entry ``tag`` of the IFD at ``offset``: {type, count, at} (at: where its value lies), or null. */
  const entry = (offset, tag) => {
    if (offset + 2 > tiff.length) return null;
    const n = u16(offset);
    for (let i = 0; i < n; i++) {
      const e = offset + 2 + 12 * i;
      if (e + 12 > tiff.length) return null;
      if (u16(e) !== tag) continue;
      const type = u16(e + 2);
      const count = u32(e + 4);
      const size = (TYPE_SIZES[type] || 1) * count;
      return { type, count, at: size <= 4 ? e + 8 : u32(e + 8), size };
    }
    return null;
  };
  try {
    const ifd = entry(u32(4), EXIF_IFD);
    if (!ifd) return null;
    const comment = entry(u32(ifd.at), USER_COMMENT);
    if (!comment || comment.at + comment.size > tiff.length) return null;
    return decodeUserComment(tiff.subarray(comment.at, comment.at + comment.size));
  } catch (e) {
    return null; // an offset past the end (RangeError): a damaged block has no comment to read
  }
}

/** The EXIF (TIFF) block of a JPEG: its APP1 "Exif\0\0" segment; null when it has none. */
function jpegExif(bytes) {
  let pos = 2;
  while (pos + 4 <= bytes.length && bytes[pos] === 0xff) {
    const marker = bytes[pos + 1];
    if (marker === 0xd8 || (marker >= 0xd0 && marker <= 0xd7) || marker === 0x01) { pos += 2; continue; }
    if (marker === 0xda || marker === 0xd9) break; // the image data: the metadata segments come before it
    const length = (bytes[pos + 2] << 8) | bytes[pos + 3];
    const data = bytes.subarray(pos + 4, pos + 2 + length);
    if (marker === 0xe1 && latin1.decode(data.subarray(0, 6)) === "Exif\0\0") return data.subarray(6);
    pos += 2 + length;
  }
  return null;
}

/** The EXIF block of a WebP: its RIFF "EXIF" chunk (some writers keep the JPEG "Exif\0\0" prefix). */
function webpExif(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 12;
  while (pos + 8 <= bytes.length) {
    const type = latin1.decode(bytes.subarray(pos, pos + 4));
    const length = view.getUint32(pos + 4, true);
    const data = bytes.subarray(pos + 8, pos + 8 + length);
    if (type === "EXIF") return latin1.decode(data.subarray(0, 6)) === "Exif\0\0" ? data.subarray(6) : data;
    pos += 8 + length + (length & 1);
  }
  return null;
}

/** The image's format by its first bytes: "png", "jpeg", "webp", or null. */
export function imageKind(bytes) {
  if (bytes.length >= 8 && PNG_SIGNATURE.every((b, i) => bytes[i] === b)) return "png";
  if (bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) return "jpeg";
  if (bytes.length >= 12 && latin1.decode(bytes.subarray(0, 4)) === "RIFF" &&
      latin1.decode(bytes.subarray(8, 12)) === "WEBP") return "webp";
  return null;
}

/** The generation parameters of a PNG, JPEG or WebP file, as A1111 reads them: a PNG's "parameters" text
 * chunk (else its eXIf chunk), a JPEG's or WebP's EXIF UserComment. {kind, text}: text null when none. */
export async function imageParameters(buffer) {
  const bytes = new Uint8Array(buffer);
  const kind = imageKind(bytes);
  let text = null;
  if (kind === "png") {
    const chunks = await pngTextChunks(buffer);
    text = chunks.parameters ?? chunks.Parameters ?? null;
    if (text === null && chunks[EXIF_CHUNK]) text = exifUserComment(chunks[EXIF_CHUNK]);
  } else if (kind === "jpeg") {
    const exif = jpegExif(bytes);
    text = exif && exifUserComment(exif);
  } else if (kind === "webp") {
    const exif = webpExif(bytes);
    text = exif && exifUserComment(exif);
  }
  return { kind, text: text || null };
}

// A1111's field pattern: a key, ": ", then a JSON string or anything up to the next comma.
const RE_PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

/** A1111's parse_generation_parameters: {prompt, negative_prompt, fields: {Key: value}}. */
export function parseInfotext(text) {
  const lines = String(text).trim().split("\n");
  let last = lines.pop() ?? "";
  if ([...last.matchAll(RE_PARAM)].length < 3) {
    lines.push(last);
    last = "";
  }
  let prompt = "";
  let negative = "";
  let inNegative = false;
  for (let line of lines) {
    line = line.trim();
    if (line.startsWith("Negative prompt:")) {
      inNegative = true;
      line = line.slice(16).trim();
    }
    if (inNegative) negative += (negative === "" ? "" : "\n") + line;
    else prompt += (prompt === "" ? "" : "\n") + line;
  }
  const fields = {};
  for (const m of last.matchAll(RE_PARAM)) {
    let v = m[2];
    if (v.length >= 2 && v.startsWith('"') && v.endsWith('"')) {
      try { v = JSON.parse(v); } catch (e) { /* kept as written */ }
    }
    fields[m[1].trim()] = v.trim();
  }
  return { prompt, negative_prompt: negative, fields };
}
