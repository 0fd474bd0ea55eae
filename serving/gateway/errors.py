"""How the gateway says no: ``ControlError`` for the control API, SageMaker-style errors for the
runtime, and a warning log that stays readable when refusals come by the thousand."""

from __future__ import annotations

import logging
import time

from fastapi.responses import JSONResponse

log = logging.getLogger("llmops.gateway")


class ControlError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def aws_error(status: int, code: str, message: str, **extra) -> JSONResponse:
    """An error the AWS SDKs parse: ``x-amzn-ErrorType`` names it, the body says why."""
    return JSONResponse(
        {"__type": code, "message": message, **extra}, status_code=status, headers={"x-amzn-ErrorType": code}
    )


class OccasionalWarnings:
    """Warnings shared by the whole gateway, each ``key`` logged at most every ``every`` seconds."""

    def __init__(self):
        self._last_warning: dict[str, float] = {}

    def warn(self, key: str, message: str, *args, every: float = 10.0) -> None:
        """A warning at most every ``every`` seconds per ``key``: refusals can come by the thousand."""
        now = time.monotonic()
        if now - self._last_warning.get(key, -every) >= every:
            if len(self._last_warning) > 10_000:
                self._last_warning.clear()
            self._last_warning[key] = now
            log.warning(message, *args)
