"""Errors of the distributed mode, in facemend's one exception tree (``pipeline.errors``)."""
from __future__ import annotations

from pipeline.errors import FacemendError, InputError, OutputError


class SettingsError(FacemendError, ValueError):
    """Raised when a ``FACEMEND_*`` variable (or ``--broker``) holds an unusable value."""

    exit_code = 2


class BrokerUnavailable(FacemendError, ConnectionError):
    """Raised when the broker or the job-record Redis cannot be reached (refused, auth, TLS)."""

    exit_code = 7


class JobNotFound(FacemendError, LookupError):
    """Raised when no job record has the given id (never submitted, or expired)."""

    exit_code = 8


class WaitTimeout(FacemendError, TimeoutError):
    """Raised when ``wait --timeout`` expires before the job finishes."""

    exit_code = 9


class OutsideStorage(InputError):
    """Raised when an input lies outside every FACEMEND_STORAGE_ROOTS folder."""


class OutputOutsideStorage(OutputError):
    """Raised when an output lies outside every FACEMEND_STORAGE_ROOTS folder."""
