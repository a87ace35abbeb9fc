"""ComfyUI API-format workflows on ``sdengine serve``: :mod:`.routes` (HTTP and websocket), :mod:`.graph`
(validation and execution), :mod:`.nodes` (the nodes). ``router`` is included by the app."""

from sdengine.server.comfy.routes import install, router, uninstall

__all__ = ["install", "router", "uninstall"]
