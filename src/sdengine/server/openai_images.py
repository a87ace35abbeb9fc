"""(being written)"""

from __future__ import annotations

from typing import Any


def install(app: Any, services: Any) -> None:
    return None
