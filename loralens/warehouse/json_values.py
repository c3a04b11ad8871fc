"""JSON-safe values: what every manifest, summary and warehouse JSON column is written through."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """Return `value` with non-finite floats as None, numpy scalars and arrays as Python values, tuples as lists.

    JSON has no NaN or infinity (`json.dumps` would write the invalid token `NaN`); a missing number is null.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["json_safe"]
