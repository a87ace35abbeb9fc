"""ComfyUI API-format workflows on ``sdengine serve``: :mod:`.routes` (HTTP and websocket), :mod:`.graph`
(validation and execution), :mod:`.nodes` (the nodes), :mod:`.workflow` (UI-format workflows -> API prompts).
``router`` is included by the app. The routes (FastAPI) are imported on first use, so that ``sdengine comfy``
runs a workflow through :mod:`.graph` without the server's packages."""

from typing import Any

__all__ = ["install", "router", "uninstall"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sdengine.server.comfy import routes

        return getattr(routes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
