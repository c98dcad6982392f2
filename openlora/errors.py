"""The small exception family of OpenLoRA.

Each error carries the HTTP status the server maps it to (OpenAI error JSON), so the mapping lives in
one place and the engine never imports the server.
"""

from __future__ import annotations


class OpenLoRAError(Exception):
    """Base class. `status` is the HTTP status code, `code` the OpenAI error `type`."""

    status: int = 500
    code: str = "internal_error"


class InvalidRequest(OpenLoRAError, ValueError):
    """Bad parameters (a ValueError too, so offline users can catch the builtin)."""

    status = 400
    code = "invalid_request_error"


class RequestTooLong(InvalidRequest):
    """Prompt (plus max_tokens) does not fit the model's context."""


class AdapterNotFound(OpenLoRAError, KeyError):
    """The named adapter is not registered."""

    status = 404
    code = "not_found_error"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterLoadError(OpenLoRAError):
    """An adapter exists but cannot be loaded (missing file, wrong shapes, unsupported feature)."""

    status = 503
    code = "adapter_load_error"


class UnsupportedAdapter(AdapterLoadError, ValueError):
    """The adapter uses a feature OpenLoRA does not implement (named in the message)."""


class ModelLoadError(OpenLoRAError, ValueError):
    """The base model folder is missing a file or uses an unsupported architecture."""


class Overloaded(OpenLoRAError):
    """The waiting queue is full."""

    status = 429
    code = "rate_limit_error"


class AccessDenied(OpenLoRAError, PermissionError):
    """The caller may not use this adapter."""

    status = 403
    code = "permission_error"
