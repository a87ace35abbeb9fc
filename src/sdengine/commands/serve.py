"""``sdengine serve``: the HTTP server (native job API, AUTOMATIC1111 ``/sdapi/v1``, OpenAI Images).

The bind rule is checked before anything heavy is imported: a host other than loopback needs ``--api-key``
(or ``--insecure-no-auth``). See docs/server.md for the routes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def run(a: argparse.Namespace) -> int:
    from ..server.config import ServerConfig
    from ..server.errors import ServerConfigError
    from ..server.security import check_bind, check_key

    keys = list(a.api_key) if a.api_key else [k for k in [os.environ.get("SDENGINE_API_KEY")] if k]
    api_key = keys[0] if keys else None
    check_bind(a.host, api_key if api_key is not None or a.admin_key is None else a.admin_key, a.insecure_no_auth)
    for key in keys[1:]:
        check_key(key)
    if a.admin_key is not None:
        check_key(a.admin_key, "--admin-key")
    if len(set(keys)) != len(keys) or a.admin_key in keys:
        # a key given twice would be two clients that cannot be told apart (the first would own every job)
        raise ServerConfigError("each --api-key (and --admin-key) must be different: a key was given twice")
    if a.insecure_no_auth:  # it lets a non-loopback host run without a key; anywhere else it would change nothing
        from ..server.security import is_loopback

        if api_key is not None or a.admin_key is not None:
            source = "--api-key" if a.api_key else "--admin-key" if api_key is None else "$SDENGINE_API_KEY"
            raise ServerConfigError(
                f"--insecure-no-auth has no effect with {source}: every request still needs the key (drop one)"
            )
        if is_loopback(a.host):
            raise ServerConfigError(
                f"--insecure-no-auth has no effect on {a.host}: a loopback host needs no key; the flag lets a "
                "non-loopback --host run without one"
            )
    if a.max_batch < 1:
        raise ServerConfigError(f"--max-batch must be >= 1, got {a.max_batch}")
    # Limits that would refuse every job or every request are a mistake: said now, not as a 429 / 413 per request.
    if not 0 <= a.model_affinity < float("inf"):
        raise ServerConfigError(f"--model-affinity must be a number of seconds >= 0, got {a.model_affinity}")
    if a.max_queued_per_client < 0:
        raise ServerConfigError(
            f"--max-queued-per-client must be >= 0 (0 = no limit per client), got {a.max_queued_per_client}"
        )
    if a.max_queue < 1:
        raise ServerConfigError(f"--max-queue must be >= 1 (jobs that may wait), got {a.max_queue}")
    if a.max_queued_per_client >= a.max_queue:  # the whole queue is full first: the limit could never apply
        raise ServerConfigError(
            f"--max-queued-per-client {a.max_queued_per_client} has no effect with --max-queue {a.max_queue}: no "
            f"client can have more than {a.max_queue} jobs waiting (give fewer, or 0 for no limit per client)"
        )
    if not a.max_body_mb > 0 or a.max_body_mb == float("inf"):
        raise ServerConfigError(f"--max-body-mb must be a number > 0, got {a.max_body_mb}")
    for flag, seconds in (("--header-timeout", a.header_timeout), ("--body-timeout", a.body_timeout)):
        if not 0 < seconds < float("inf"):  # 0 would refuse every request; NaN / inf would be no limit at all
            raise ServerConfigError(f"{flag} must be a number of seconds > 0, got {seconds}")
    if a.max_connections is not None and a.max_connections < 1:
        raise ServerConfigError(f"--max-connections must be >= 1, got {a.max_connections}")
    if a.max_image_pixels < 1:
        raise ServerConfigError(f"--max-image-pixels must be >= 1, got {a.max_image_pixels}")
    # The job limits: below the smallest request every request is refused; above the request schema's own bound
    # (the widest any server takes) the limit would be a promise the server cannot keep.
    for flag, value, low, high in (
        ("--max-steps", a.max_steps, 1, 1000),
        ("--max-side", a.max_side, 8, 8192),
        ("--max-batch-size", a.max_batch_size, 1, 64),
    ):
        if not low <= value <= high:
            raise ServerConfigError(f"{flag} must be in [{low}, {high}], got {value}")
    if not 1 <= a.port <= 65535:
        raise ServerConfigError(f"--port must be in [1, 65535], got {a.port}")
    check_outputs_dir(Path(a.outputs_dir))
    for flag, d in (
        ("--models-dir", a.models_dir),
        ("--loras-dir", a.loras_dir),
        ("--controlnets-dir", a.controlnets_dir),
        ("--vaes-dir", a.vaes_dir),
        ("--upscalers-dir", a.upscalers_dir),
        ("--clip-vision-dir", a.clip_vision_dir),
        ("--ip-adapters-dir", a.ip_adapters_dir),
        ("--embeddings-dir", a.embeddings_dir),
    ):
        if d is not None and not Path(d).is_dir():
            raise ServerConfigError(f"{flag} {d}: not a folder")
    if a.styles_file is not None:  # A1111's --styles-file: read now, so that a wrong path or file is one line
        from ..prompts import PromptError, read_styles

        try:
            read_styles(a.styles_file)
        except PromptError as e:
            raise ServerConfigError(f"--styles-file: {e}") from None
    if a.vae is not None and not Path(a.vae).exists():
        raise ServerConfigError(f"--vae {a.vae}: no such file or folder")
    tiny_vae = None
    if a.tiny_vae is not None:
        from ..weights.tiny_vae_file import load_tiny_vae

        load_tiny_vae(a.tiny_vae)  # a bad file is one line now, not a warning per model load later
        tiny_vae = Path(a.tiny_vae)
    config = ServerConfig(
        model=a.model,
        host=a.host,
        port=a.port,
        models_dir=Path(a.models_dir) if a.models_dir else None,
        loras_dir=Path(a.loras_dir) if a.loras_dir else None,
        controlnets_dir=Path(a.controlnets_dir) if a.controlnets_dir else None,
        vaes_dir=Path(a.vaes_dir) if a.vaes_dir else None,
        upscalers_dir=Path(a.upscalers_dir) if a.upscalers_dir else None,
        clip_vision_dir=Path(a.clip_vision_dir) if a.clip_vision_dir else None,
        ip_adapters_dir=Path(a.ip_adapters_dir) if a.ip_adapters_dir else None,
        embeddings_dir=Path(a.embeddings_dir) if a.embeddings_dir else None,
        styles_file=Path(a.styles_file) if a.styles_file else None,
        outputs_dir=Path(a.outputs_dir),
        api_key=api_key,
        more_api_keys=tuple(keys[1:]),
        admin_key=a.admin_key,
        insecure_no_auth=a.insecure_no_auth,
        cors_origins=tuple(o.strip() for o in (a.cors_origins or "").split(",") if o.strip()),
        max_queue=a.max_queue,
        max_queued_per_client=a.max_queued_per_client,
        fair_queue=a.queue_order == "fair",
        max_batch_jobs=a.max_batch,
        max_steps=a.max_steps,
        model_affinity_s=a.model_affinity,
        max_side=a.max_side,
        max_batch=a.max_batch_size,
        max_body_bytes=int(a.max_body_mb * 1024 * 1024),
        header_timeout_s=a.header_timeout,
        body_timeout_s=a.body_timeout,
        max_connections=a.max_connections,
        max_image_pixels=a.max_image_pixels,
        devices=tuple(a.device.split(",")),
        dtype=a.dtype,
        vae=Path(a.vae) if a.vae else None,
        tiny_vae=tiny_vae,
        preview=a.preview,
        weight_dtype=a.weight_dtype,
    )
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        from ..errors import UsageError

        raise UsageError(
            f"sdengine serve needs the server extra ({e.name} is missing): pip install 'sdengine[server]'"
        ) from None
    from ..server.app import create_app, make_server

    app = create_app(config)
    print(f"sdengine serving {config.model} on http://{a.host}:{a.port} (docs: /docs, API: /openapi.json)", flush=True)
    # Ctrl-C / SIGTERM: queued jobs are cancelled, running ones get 10 s to finish (Ctrl-C again: at once), and
    # every open event stream ends with its job's final event.
    make_server(
        app, host=a.host, port=a.port, grace=10.0, log_level=a.log_level, access_log=a.log_level == "debug"
    ).run()
    return 0


def check_outputs_dir(folder: Path) -> None:
    """The outputs folder exists (made now if missing) and is writable: every job saves into it, so a folder
    that cannot be written is one line at start, not a failed job per request."""
    from ..server.errors import ServerConfigError

    if folder.exists() and not folder.is_dir():
        raise ServerConfigError(f"--outputs-dir {folder}: not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ServerConfigError(f"--outputs-dir {folder}: cannot create it ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ServerConfigError(f"--outputs-dir {folder}: not writable")


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP server and web page: native job API, AUTOMATIC1111 /sdapi/v1, OpenAI Images and ComfyUI routes",
        description="Serve generation over HTTP with a job queue (one worker per device). Binds 127.0.0.1; any "
        "other host needs --api-key (or --insecure-no-auth).",
    )
    p.add_argument("--model", default="emoji", help="default model: a built-in name, a name in --models-dir, or a path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models-dir", default=None, help="folder of models requests may name")
    p.add_argument("--loras-dir", default=None, help="folder of LoRAs requests may name")
    p.add_argument("--controlnets-dir", default=None, help="folder of ControlNets requests may name")
    p.add_argument(
        "--vaes-dir", default=None, help="folder of VAE .safetensors files and folders ComfyUI's VAELoader may name"
    )
    p.add_argument(
        "--upscalers-dir",
        default=None,
        help="folder of upscaler models (ESRGAN, Real-ESRGAN .pth / .safetensors) for the hires fix, the A1111 extras "
        "and ComfyUI's UpscaleModelLoader",
    )
    p.add_argument(
        "--clip-vision-dir",
        default=None,
        help="folder of CLIP vision encoders (.safetensors / .bin, image_encoder folders) ComfyUI's CLIPVisionLoader "
        "may name (IP-Adapter's image encoder)",
    )
    p.add_argument(
        "--ip-adapters-dir", default=None, help="folder of IP-Adapter files (.safetensors / .bin) requests may name"
    )
    p.add_argument("--embeddings-dir", default=None, help="textual-inversion embeddings, used by file name in prompts")
    p.add_argument(
        "--styles-file",
        default=None,
        help="A1111's prompt styles (a styles.csv: name,prompt,negative_prompt), named in A1111 requests' styles",
    )
    p.add_argument("--outputs-dir", default="outputs", help="where images are saved (and served from)")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require 'Authorization: Bearer KEY' (or $SDENGINE_API_KEY); give it again for each user: with several "
        "keys each key owns its jobs (no one else sees or cancels them)",
    )
    p.add_argument(
        "--admin-key", default=None, help="a key that may see, cancel and delete every client's jobs (also a user key)"
    )
    p.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback host without a key")
    p.add_argument("--cors-origins", default=None, help="comma-separated browser origins allowed to call the API")
    p.add_argument("--max-queue", type=int, default=64, help="jobs waiting before new ones get 429")
    p.add_argument(
        "--max-queued-per-client",
        type=int,
        default=0,
        metavar="N",
        help="jobs one client (address) may have waiting before its next gets 429 (0 = no limit but --max-queue)",
    )
    p.add_argument(
        "--queue-order",
        choices=["fair", "fifo"],
        default="fair",
        help="fair: round robin between clients' jobs (one client's many jobs never hold back another's); "
        "fifo: one queue in arrival order",
    )
    p.add_argument(
        "--max-batch", type=int, default=4, help="compatible queued jobs run as one batch, at most this many (1 = off)"
    )
    p.add_argument("--max-steps", type=int, default=150, help="most sampler steps of one request (1..1000)")
    p.add_argument("--max-side", type=int, default=2048, help="largest width / height of an image in pixels (8..8192)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="most images of one request (batch_size, OpenAI's n; 1..64); also the rows of one batched call",
    )
    p.add_argument(
        "--model-affinity",
        type=float,
        default=30.0,
        metavar="S",
        help="a free worker takes the oldest job for its loaded model, skipping jobs for other models that waited "
        "less than S seconds (fewer model switches; 0 = strict FIFO)",
    )
    p.add_argument("--max-body-mb", type=float, default=50.0, help="request body limit in MB (413 above)")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="a request's line and headers must all arrive within S seconds of the connection opening (or of its "
        "previous answer), else 408 and the connection is closed (slow clients)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="a request body that sends nothing for S seconds is a 408 and its connection is freed",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=512,
        metavar="N",
        help="open connections (event streams included) before new requests get 503 (default: 512)",
    )
    p.add_argument(
        "--max-image-pixels", type=int, default=4096 * 4096, help="largest uploaded image, checked before decoding"
    )
    p.add_argument("--device", default="auto", help="auto (each GPU, else cpu), or comma-separated devices")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--vae", default=None, help="a separate VAE file or folder every SD model is loaded with")
    p.add_argument(
        "--tiny-vae",
        default=None,
        metavar="FILE",
        help="a tiny VAE (TAESD taesd_decoder file or AutoencoderTiny folder) for previews and vae_decode 'tiny', "
        "loaded with every SD model whose latents it fits (a model folder's own vae_tiny/ is used otherwise)",
    )
    p.add_argument(
        "--weight-dtype",
        default="default",
        choices=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),  # nn/fp8_storage.WEIGHT_DTYPES (no torch)
        help="every model's diffusion network (U-Net, MMDiT, Flux transformer) with its Linear/Conv2d weights held "
        "in fp8, cast to --dtype at each use (docs/fp8-storage.md)",
    )
    p.add_argument(
        "--preview",
        default="auto",
        choices=["auto", "latent"],
        help="live previews: auto = the model's tiny VAE when it has one, else the cheap latent RGB map",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
