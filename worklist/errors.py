"""The root of every error the worklist raises on purpose.

Each edge maps these in one place: HTTP statuses in `worklist.web.errors`,
CLI exit codes in `worklist.cli`. The HL7 interface has its own root
(`hl7.errors.Hl7Error`) because its errors become ACK codes, not statuses.
"""

from __future__ import annotations


class WorklistError(Exception):
    """Something the caller asked for cannot be done; the message says why."""


class InvalidInput(WorklistError):
    """The request itself is wrong (missing field, bad value)."""


class NotFound(WorklistError):
    """No such thing, or not one the caller may see (we do not say which)."""


class Conflict(WorklistError):
    """The request clashes with current state (already claimed, duplicate key)."""


class Forbidden(WorklistError):
    """The caller is known but their role does not allow this."""


class ConfigurationError(WorklistError):
    """The settings cannot run the service safely (e.g. no secret in production)."""
