"""Exceptions raised by tasklet. Each message says what to do about it."""

from __future__ import annotations

__all__ = [
    "DatabaseUnavailableError",
    "JobDefinitionError",
    "JobNotFoundError",
    "PayloadTooLargeError",
    "SchemaMissingError",
    "SerializationError",
    "TaskletError",
]


class TaskletError(Exception):
    """Base class of every error tasklet raises on purpose."""


class JobDefinitionError(TaskletError):
    """A ``@job`` declaration is invalid (duplicate name, job in ``__main__``, bad option)."""


class JobNotFoundError(TaskletError, LookupError):
    """No job has this id: it was never created, or it was deleted."""


class SerializationError(TaskletError, TypeError):
    """Job arguments could not be encoded, or a stored payload could not be decoded."""


class PayloadTooLargeError(SerializationError):
    """The encoded arguments exceed the configured ``max_payload_bytes``."""


class SchemaMissingError(TaskletError):
    """tasklet's tables do not exist in the configured database."""


class DatabaseUnavailableError(TaskletError):
    """The configured database cannot be reached."""
