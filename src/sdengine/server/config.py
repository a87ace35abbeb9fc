"""The settings of one server: folders, limits, the API key, the devices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerConfig:
    """Everything ``sdengine serve`` takes on its command line (see docs/server.md)."""

    model: str = "emoji"  # the model jobs use unless they name one
    host: str = "127.0.0.1"
    port: int = 7860
    models_dir: Path | None = None
    loras_dir: Path | None = None
    controlnets_dir: Path | None = None
    vaes_dir: Path | None = None  # VAE files and folders ComfyUI's VAELoader may name
    upscalers_dir: Path | None = None  # upscaler models (ESRGAN, Real-ESRGAN) hires and extras may name
    clip_vision_dir: Path | None = None  # CLIP vision encoders (IP-Adapter's image encoder), ComfyUI's clip_vision
    ip_adapters_dir: Path | None = None  # IP-Adapter files, ComfyUI's ipadapter folder
    embeddings_dir: Path | None = None  # textual-inversion embeddings, used by name in prompts
    styles_file: Path | None = None  # A1111's prompt styles (styles.csv), by name in A1111 requests' ``styles``
    outputs_dir: Path = Path("outputs")
    api_key: str | None = None  # the (first) user key: Authorization: Bearer KEY
    # more user keys (``--api-key`` given again): with two or more, each key is a client of its own, who owns the
    # jobs it sent (docs/server.md "Who may see and cancel a job")
    more_api_keys: tuple[str, ...] = ()
    admin_key: str | None = None  # a key that may see, cancel and delete every client's jobs
    insecure_no_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    max_queue: int = 64  # jobs waiting (running ones not counted); one more is a 429
    max_queued_per_client: int = 0  # jobs one client (address) may have waiting; one more is a 429 (0: no limit)
    fair_queue: bool = True  # round robin between clients' queued jobs (False: one FIFO for all)
    max_body_bytes: int = 50 * 1024 * 1024
    body_timeout_s: float = 60.0  # a request body that sends nothing for this long is a 408 (slow clients)
    # the whole head of a request (request line, headers) must arrive within this many seconds of the connection
    # opening or its last answer ending, else 408 and the connection is closed (slowloris; make_server)
    header_timeout_s: float = 30.0
    # most open connections (event streams included) before new requests get uvicorn's 503 (None: no limit);
    # 512 stays well under the usual 1024 open files a process may hold, so the cap answers 503 before accept()
    # fails on EMFILE (then new clients wait unanswered in the listen backlog) and model files can still open
    max_connections: int | None = 512
    max_image_pixels: int = 4096 * 4096  # of any uploaded image, checked from its header before decoding
    max_side: int = 2048  # width / height of a generated image
    max_batch: int = 8  # images of one request (batch_size)
    max_batch_jobs: int = 4  # compatible queued jobs one pipeline call may run together (1 = no batching)
    max_steps: int = 150
    # a free worker takes the oldest job for the model it has loaded, skipping jobs for other models that have
    # waited less than this many seconds (0: strict FIFO); see docs/server.md "Queue, workers, cancel"
    model_affinity_s: float = 30.0
    devices: tuple[str, ...] = ("auto",)  # "auto": every CUDA GPU, else the CPU; or names like "cuda:1"
    dtype: str | None = None
    vae: Path | None = None  # a separate VAE every SD model is loaded with (A1111's --vae-path)
    preview_every: int = 2  # a preview image in the events every this many steps
    # "auto": previews by the model's tiny VAE when it has one (full size, close to the result), else the cheap
    # latent RGB map; "latent": always the latent map
    preview: str = "auto"
    tiny_vae: Path | None = None  # a tiny VAE (TAESD) every SD model whose latents it fits is loaded with
    weight_dtype: str = "default"  # every model's diffusion network held in fp8 (serve --weight-dtype, fp8-storage.md)
    keep_jobs: int = 256  # finished jobs remembered for GET /v1/jobs/{id}
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def user_keys(self) -> tuple[str, ...]:
        """The keys of the users (not the admin's), in the order given."""
        return ((self.api_key,) if self.api_key is not None else ()) + tuple(self.more_api_keys)

    @property
    def auth_required(self) -> bool:
        return bool(self.user_keys) or self.admin_key is not None
