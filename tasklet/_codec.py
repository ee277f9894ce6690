"""Encoding of job arguments: tagged JSON by default, cloudpickle when a job opts in.

JSON payloads stay readable in the database. Values JSON cannot carry exactly
(datetime, date, time, timedelta, UUID, Decimal, bytes, Enum, tuple, set, dicts
with non-string keys, floats jsonb would alter, strings holding NUL) are written
as ``{"__tasklet__": TAG, "v": ...}`` and come back as the same type. Decoding
never imports anything: an Enum is looked up among modules that are already
loaded (the job's own module references it).
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import math
import sys
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final

import cloudpickle  # type: ignore[import-untyped,unused-ignore]

from .errors import PayloadTooLargeError, SerializationError

TAG: Final = "__tasklet__"
_PICKLE_MAGIC: Final = b"tasklet-pickle/"
PYTHON_VERSION: Final = f"{sys.version_info.major}.{sys.version_info.minor}"


def _encode_datetime(v: dt.datetime) -> str:
    return v.isoformat()


_SIMPLE_ENCODERS: dict[type, tuple[str, Callable[[Any], Any]]] = {
    dt.datetime: ("datetime", _encode_datetime),
    dt.date: ("date", lambda v: v.isoformat()),
    dt.time: ("time", lambda v: v.isoformat()),
    dt.timedelta: ("timedelta", lambda v: [v.days, v.seconds, v.microseconds]),
    uuid.UUID: ("uuid", str),
    Decimal: ("decimal", str),
    bytes: ("bytes", lambda v: base64.b64encode(v).decode("ascii")),
}

_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "timedelta": lambda v: dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "uuid": uuid.UUID,
    "decimal": Decimal,
    "bytes": lambda v: base64.b64decode(v),
    "float": float,
    "str": "\x00".join,
}


def _exact_in_jsonb(value: float) -> bool:
    """PostgreSQL's jsonb keeps numbers as ``numeric``: NaN and infinities are refused,
    ``-0.0`` loses its sign and ``1e+16`` comes back as the integer 10000000000000000."""
    return math.isfinite(value) and "e" not in repr(value) and math.copysign(1.0, value) > 0


def _encode(value: Any, path: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        # jsonb refuses the NUL character: carry such a string as its NUL-separated parts.
        return value if "\x00" not in value else {TAG: "str", "v": value.split("\x00")}
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {
            TAG: "enum",
            "v": [f"{cls.__module__}:{cls.__qualname__}", _encode(value.value, path)],
        }
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if _exact_in_jsonb(value) else {TAG: "float", "v": repr(value)}
    encoder = _SIMPLE_ENCODERS.get(type(value))
    if encoder is not None:
        tag, fn = encoder
        return {TAG: tag, "v": fn(value)}
    if isinstance(value, list):
        return [_encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {TAG: "tuple", "v": [_encode(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, set | frozenset):
        tag = "frozenset" if isinstance(value, frozenset) else "set"
        return {TAG: tag, "v": [_encode(v, f"{path}{{}}") for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and "\x00" not in k for k in value) and TAG not in value:
            return {k: _encode(v, f"{path}[{k!r}]") for k, v in value.items()}
        return {
            TAG: "dict",
            "v": [
                [_encode(k, f"{path} key"), _encode(v, f"{path}[{k!r}]")] for k, v in value.items()
            ],
        }
    raise SerializationError(
        f"argument {path} of type {type(value).__qualname__} cannot be stored as JSON; "
        "pass plain data (str, int, float, bool, None, list, dict, datetime, UUID, Decimal, "
        "bytes, Enum ...) or declare the job with serializer='pickle'"
    )


def _find_enum(qualified: str) -> type[enum.Enum]:
    module_name, _, qualname = qualified.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
        raise SerializationError(
            f"stored Enum {qualified} is not loaded in this worker; import its module "
            "from the job's module (tasklet never imports modules named by the database)"
        )
    return obj


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(TAG)
    if tag is None:
        return {k: _decode(v) for k, v in value.items()}
    inner = value["v"]
    if tag == "tuple":
        return tuple(_decode(v) for v in inner)
    if tag == "set":
        return {_decode(v) for v in inner}
    if tag == "frozenset":
        return frozenset(_decode(v) for v in inner)
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in inner}
    if tag == "enum":
        return _find_enum(inner[0])(_decode(inner[1]))
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise SerializationError(f"unknown payload tag {tag!r}: was it written by a newer tasklet?")
    return decoder(inner)


def encode_json(arguments: Mapping[str, Any], max_bytes: int | None) -> dict[str, Any]:
    """Turn bound arguments into a JSON-ready dict, or raise naming the bad argument."""
    encoded = {name: _encode(value, repr(name)) for name, value in arguments.items()}
    if max_bytes is not None:
        size = len(json.dumps(encoded, separators=(",", ":")))
        _check_size(size, max_bytes)
    return encoded


def decode_json(payload: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return {name: _decode(value) for name, value in payload.items()}
    except SerializationError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SerializationError(f"stored arguments do not decode: {exc!r}") from exc


def encode_pickle(arguments: Mapping[str, Any], max_bytes: int | None) -> bytes:
    try:
        body: bytes = cloudpickle.dumps(dict(arguments))
    except Exception as exc:
        raise SerializationError(f"arguments cannot be pickled: {exc!r}") from exc
    blob = _PICKLE_MAGIC + PYTHON_VERSION.encode() + b"\n" + body
    if max_bytes is not None:
        _check_size(len(blob), max_bytes)
    return blob


def decode_pickle(blob: bytes) -> dict[str, Any]:
    header, _, body = blob.partition(b"\n")
    if not header.startswith(_PICKLE_MAGIC):
        raise SerializationError("stored pickle payload has no tasklet header; refusing to load it")
    written_by = header[len(_PICKLE_MAGIC) :].decode()
    if written_by != PYTHON_VERSION:
        raise SerializationError(
            f"pickled arguments were written by Python {written_by} and this worker runs "
            f"Python {PYTHON_VERSION}; run the job on a worker with Python {written_by}, "
            "or re-defer it from this version"
        )
    try:
        arguments = cloudpickle.loads(body)
    except Exception as exc:
        raise SerializationError(f"pickled arguments do not load: {exc!r}") from exc
    if not isinstance(arguments, dict):
        raise SerializationError("pickled payload is not an argument mapping")
    return arguments


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise PayloadTooLargeError(
            f"encoded arguments are {size} bytes, over the limit of {max_bytes}; store large "
            "data elsewhere and pass a reference, or raise max_payload_bytes in "
            "tasklet.configure()"
        )


def encode_result(value: Any) -> Any:
    """A job's return value for ``job_runs.result``, or None where JSON cannot carry it."""
    try:
        return _encode(value, "result")
    except SerializationError:
        return None
