// Reading generation parameters from PNG files in the browser: the PNG text chunks (tEXt, zTXt, iTXt)
// and AUTOMATIC1111's "parameters" infotext format (which sdengine writes too).

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
      if (type === "tEXt") {
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
