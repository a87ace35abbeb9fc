"""``sdengine serve``: one HTTP server, one job queue, one worker per device, three protocols.

Modules, in the order a request flows through them:

* :mod:`.config` - the settings of one server (folders, limits, key);
* :mod:`.security` - bind rule, API key, Origin/Host checks, body and pixel limits (before decoding);
* :mod:`.catalog` - model, LoRA and ControlNet names resolved inside their folders;
* :mod:`.requests` - every protocol's request becomes ONE dict of pipeline keyword arguments here;
* :mod:`.jobs` - the bounded FIFO queue, the per-device workers, cancel, progress and previews;
* :mod:`.app` - the FastAPI app: native ``/v1`` routes, plus :mod:`.a1111` and :mod:`.openai_images`.
"""

from sdengine.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]


def create_app(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - re-export without importing FastAPI eagerly
    from sdengine.server.app import create_app as _create

    return _create(*args, **kwargs)
