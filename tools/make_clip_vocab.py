"""Build sdengine's shipped CLIP BPE vocabulary from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

The source file is OpenAI CLIP's merge list (MIT), redistributed by PyPI ``open-clip-torch`` as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. Get it without pulling torchvision::

    .venv/bin/pip install --no-deps open-clip-torch
    .venv/bin/python tools/make_clip_vocab.py            # finds the installed file
    .venv/bin/python tools/make_clip_vocab.py --src PATH --out src/sdengine/assets/clip

The construction is the standard one of OpenAI CLIP's ``SimpleTokenizer`` (and of the
``vocab.json``/``merges.txt`` pair that transformers' ``CLIPTokenizer`` loads):

* the merge list is the file's lines 1 .. 48894 (line 0 is a header; CLIP uses
  49152 - 256 - 2 merges so that the vocabulary has 49408 entries);
* the vocabulary is the 256 byte symbols of the GPT-2 byte-to-unicode table (in that table's
  order), the same 256 with the end-of-word suffix ``</w>``, one entry per merge (the two halves
  concatenated), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Outputs are gzip files written with mtime 0 and no stored file name, so rerunning the tool on the
same input gives byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # 48894, as in OpenAI CLIP
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (Radford et al. 2019)."""
    # Printable latin-1 bytes map to themselves; the other 68 bytes are moved to U+0100 onwards,
    # so that no BPE symbol is whitespace or a control character.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}  # insertion order is the vocabulary order: kept bytes first
    moved = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return table


def build(src_lines: list[str]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    merges = [tuple(line.split()) for line in src_lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError("source does not look like bpe_simple_vocab_16e6.txt")
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != 49408:
        raise ValueError(f"expected 49408 distinct tokens, got {len(vocab)}")
    return merges, vocab  # type: ignore[return-value]


def _write_gzip(path: Path, text: str) -> None:
    buf = io.BytesIO()
    # filename="" and mtime=0 make the bytes depend on the content only.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def default_source() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip not found: .venv/bin/pip install --no-deps open-clip-torch, or pass --src")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=None, help="bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/sdengine/assets/clip")
    args = ap.parse_args()
    src = args.src or default_source()
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges, vocab = build(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_gzip(args.out / "merges.txt.gz", "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n")
    _write_gzip(args.out / "vocab.json.gz", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    print(f"wrote {len(merges)} merges and {len(vocab)} tokens to {args.out}")


if __name__ == "__main__":
    main()
