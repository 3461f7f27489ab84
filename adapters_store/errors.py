"""The one exception the store raises: a user-fixable problem with an adapter or its upload."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter was refused.

    `field` names the offending config field, tensor or parameter (None when there is none);
    `status` is the HTTP status the API should answer with (400, 404, 409, 413 or 422).
    The message says which value was wrong and what is allowed.
    """

    def __init__(self, message: str, *, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status

    def __repr__(self) -> str:
        return f"AdapterError({str(self)!r}, field={self.field!r}, status={self.status})"
