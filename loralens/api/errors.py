"""The one error class of the Python API."""

from __future__ import annotations


class ApiError(ValueError):
    """A request the API cannot answer (no such version, no trained lenses, a bad or out-of-range head); one line."""
