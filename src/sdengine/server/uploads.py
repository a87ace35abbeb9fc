"""Images uploaded with ``POST /v1/uploads``, kept in memory (encoded) under random ids, bounded in bytes; each
is its client's, as a job is (docs/server.md "Who may see and cancel a job")."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

from PIL import Image

from sdengine.server.errors import BadRequest
from sdengine.server.security import REQUEST_CALLER, decode_base64_image, decode_image, owned

UPLOAD_ID_LENGTH = 32  # hex characters


class UploadStore:
    """id -> the uploaded bytes (checked decodable and within the pixel limit when stored) and the client that
    sent them (the request's, as a job's owner); the oldest are forgotten when the total is over ``max_bytes``.
    Another client's upload is answered as an id the server never had (its id is not confirmed)."""

    def __init__(self, max_pixels: int, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[str | None, bytes]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def add(self, data: bytes, what: str = "upload") -> tuple[str, Image.Image]:
        image = decode_image(data, what, self.max_pixels)
        upload_id = secrets.token_hex(UPLOAD_ID_LENGTH // 2)
        caller = REQUEST_CALLER.get()
        with self._lock:
            self._items[upload_id] = (caller.client if caller is not None else None, data)
            self._total += len(data)
            while self._total > self.max_bytes and len(self._items) > 1:
                _, (_, old) = self._items.popitem(last=False)
                self._total -= len(old)
        return upload_id, image

    def get(self, upload_id: str, what: str) -> Image.Image:
        with self._lock:
            item = self._items.get(upload_id)
        data = item[1] if item is not None and owned(item[0]) else None
        if data is None:  # another client's upload: the same answer as an unknown id
            raise BadRequest(f"{what}: no upload with id {upload_id!r} (uploads are kept in memory, oldest dropped)")
        return decode_image(data, what, self.max_pixels)

    @staticmethod
    def looks_like_id(ref: str) -> bool:
        return len(ref) == UPLOAD_ID_LENGTH and all(c in "0123456789abcdef" for c in ref)

    def image(self, ref: str, what: str) -> Image.Image:
        """An upload id or a base64 image (data URLs too) -> a decoded image, limits checked first."""
        if not isinstance(ref, str) or not ref.strip():
            raise BadRequest(f"{what}: expected an upload id or a base64 image")
        ref = ref.strip()
        if self.looks_like_id(ref):
            return self.get(ref, what)
        return decode_base64_image(ref, what, self.max_pixels)
