"""The unique keys ``@job(unique=...)`` makes from a job's arguments."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

from . import _codec
from .errors import JobDefinitionError, SerializationError

#: A key made from arguments is hashed past this length, to keep index entries small.
MAX_DERIVED_KEY = 255


def arguments(
    job_name: str, signature: inspect.Signature, unique: bool | str | Sequence[str]
) -> tuple[str, ...] | None:
    """The arguments whose values make the key: all of them for ``True``, none for ``False``."""
    if unique is False:
        return None
    if unique is True:
        return tuple(signature.parameters)
    names = (unique,) if isinstance(unique, str) else tuple(unique)
    if not names or not all(isinstance(n, str) and n in signature.parameters for n in names):
        raise JobDefinitionError(
            f"unique= takes True (every argument) or names of {job_name}'s arguments "
            f"{list(signature.parameters)}, not {unique!r}"
        )
    return names


def key_for(
    job_name: str,
    signature: inspect.Signature,
    unique_by: tuple[str, ...],
    bound: Mapping[str, Any],
) -> str:
    """``name:{"arg":value,...}`` with defaults filled in, stable across processes."""
    values = {}
    for name in unique_by:
        if name in bound:
            values[name] = bound[name]
            continue
        parameter = signature.parameters[name]
        if parameter.default is not parameter.empty:
            values[name] = parameter.default
        else:  # *args or **kwargs left empty
            values[name] = () if parameter.kind is parameter.VAR_POSITIONAL else {}
    try:
        encoded = _codec.encode_json(values, None)
    except SerializationError as exc:
        raise SerializationError(
            f"{job_name}: its unique key is made of the arguments {list(unique_by)} as JSON, "
            f"but {exc}; pass .options(unique_key=...) instead"
        ) from None
    text = json.dumps(_stable(encoded), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    key = f"{job_name}:{text}"
    if len(key) <= MAX_DERIVED_KEY:
        return key
    return f"{job_name}:sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def _stable(value: Any) -> Any:
    """Encoded arguments with sets in a stable order (theirs varies between processes)."""
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if not isinstance(value, dict):
        return value
    if value.get(_codec.TAG) in ("set", "frozenset"):
        items = [_stable(v) for v in value["v"]]
        return {**value, "v": sorted(items, key=lambda v: json.dumps(v, sort_keys=True))}
    return {k: _stable(v) for k, v in value.items()}
