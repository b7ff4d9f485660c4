"""Small bridges between the pure core and ComfyUI's runtime (progress, interruption)."""
from __future__ import annotations

from typing import Callable, Optional

import comfy.model_management


def interruptible(callback: Optional[Callable[[dict], None]]) -> Callable[[dict], None]:
    """Wrap a KSAMPLER step callback so every step honours ComfyUI's Cancel button first.

    The server's progress hook also checks for interruption, but headless runs have no hook; checking
    here makes every Z2I loop stoppable in both.
    """
    def step(info: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(info)

    return step
