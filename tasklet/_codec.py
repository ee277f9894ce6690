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
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

import cloudpickle  # type: ignore[import-untyped,unused-ignore]

from .errors import PayloadTooLargeError, SerializationError

TAG: Final = "__tasklet__"


def _unserializable(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _compact_encoder() -> Callable[[Any], str]:
    """JSON text without spaces, as tasklet stores and sends it.

    ``JSONEncoder.encode`` builds its C encoder afresh on every call, which was
    half of the 4.5 µs it takes for a one-argument job; this one is built once.
    It skips the check for circular containers: every value it is given has
    been walked by ``_encode`` or built by tasklet. Other Pythons than CPython
    may have no C encoder: they get the standard one.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return json.JSONEncoder(separators=(",", ":")).encode
    encode = make(
        None, _unserializable, json.encoder.encode_basestring_ascii, None, ":", ",",
        False, False, True,
    )  # fmt: skip

    def compact(value: Any) -> str:
        return "".join(encode(value, 0))

    return compact


compact_json: Final = _compact_encoder()

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
    if 1e-4 <= value < 1e16:  # the common case, decided without formatting the number
        return True
    return math.isfinite(value) and "e" not in repr(value) and math.copysign(1.0, value) > 0


class _Unencodable(Exception):
    """A value JSON cannot carry; ``where`` is filled in on the way out (errors only)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.where = ""


def _each(items: list[Any] | tuple[Any, ...], where: Callable[[int], str]) -> list[Any]:
    try:
        return [_encode(v) for v in items]
    except _Unencodable as error:  # find which element, to name it (error path only)
        for i, item in enumerate(items):
            try:
                _encode(item)
            except _Unencodable:
                error.where = where(i) + error.where
                break
        raise


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        # jsonb refuses the NUL character: carry such a string as its NUL-separated parts.
        return value if "\x00" not in value else {TAG: "str", "v": value.split("\x00")}
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {TAG: "enum", "v": [f"{cls.__module__}:{cls.__qualname__}", _encode(value.value)]}
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if _exact_in_jsonb(value) else {TAG: "float", "v": repr(value)}
    encoder = _SIMPLE_ENCODERS.get(type(value))
    if encoder is not None:
        tag, fn = encoder
        return {TAG: tag, "v": fn(value)}
    if isinstance(value, list):
        return _each(value, lambda i: f"[{i}]")
    if isinstance(value, tuple):
        return {TAG: "tuple", "v": _each(value, lambda i: f"[{i}]")}
    if isinstance(value, set | frozenset):
        tag = "frozenset" if isinstance(value, frozenset) else "set"
        return {TAG: tag, "v": _each(list(value), lambda i: "{}")}
    if isinstance(value, dict):
        keys = list(value)
        if all(isinstance(k, str) and "\x00" not in k for k in keys) and TAG not in value:
            encoded = _each(list(value.values()), lambda i: f"[{keys[i]!r}]")
            return dict(zip(keys, encoded, strict=True))
        pairs = _each([[k, v] for k, v in value.items()], lambda i: f"[{keys[i]!r}]")
        return {TAG: "dict", "v": pairs}
    raise _Unencodable(value)


def _encode_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return {name: _encode(value) for name, value in arguments.items()}
    except _Unencodable as error:
        for name, value in arguments.items():
            try:
                _encode(value)
            except _Unencodable:
                path = repr(name) + error.where
                break
        else:  # pragma: no cover - the loop above always finds it
            path = "?"
        raise SerializationError(
            f"argument {path} of type {type(error.value).__qualname__} cannot be stored as "
            "JSON; pass plain data (str, int, float, bool, None, list, dict, datetime, UUID, "
            "Decimal, bytes, Enum ...) or declare the job with serializer='pickle'"
        ) from None


_CONTAINER_TAGS = frozenset({"tuple", "set", "frozenset", "dict", "enum"})


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
    return _untag({k: _decode(v) for k, v in value.items()})


def encode_json(arguments: Mapping[str, Any], max_bytes: int | None) -> dict[str, Any]:
    """Turn bound arguments into a JSON-ready dict, or raise naming the bad argument."""
    return encode_json_text(arguments, max_bytes)[0]


def encode_json_text(
    arguments: Mapping[str, Any], max_bytes: int | None
) -> tuple[dict[str, Any], str]:
    """:func:`encode_json`, and the JSON text it stores (checked against ``max_bytes``)."""
    encoded = _encode_arguments(arguments)
    text = compact_json(encoded)
    if max_bytes is not None:
        _check_size(len(text), max_bytes)
    return encoded, text


def encode_json_many(
    arguments: Sequence[Mapping[str, Any]], max_bytes: int | None
) -> tuple[list[dict[str, Any]], str]:
    """:func:`encode_json` for many jobs at once, and the JSON array of them all.

    The array is encoded once: it serves the size check (one for all, when it can)
    and is what a bulk insert sends.
    """
    encoded = [_encode_arguments(a) for a in arguments]
    text = compact_json(encoded)
    if max_bytes is not None and len(text) > max_bytes:
        for payload in encoded:  # some row may be over the limit: find it
            _check_size(len(compact_json(payload)), max_bytes)
    return encoded, text


def decode_json(payload: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return {name: _decode(value) for name, value in payload.items()}
    except SerializationError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SerializationError(f"stored arguments do not decode: {exc!r}") from exc


def _untag(value: dict[str, Any]) -> Any:
    """One JSON object, its members already decoded: a tagged one becomes its value."""
    tag = value.get(TAG)
    if tag is None:
        return value
    if tag not in _CONTAINER_TAGS and tag not in _DECODERS:
        raise SerializationError(f"unknown payload tag {tag!r}: was it written by a newer tasklet?")
    inner = value["v"]
    if tag == "tuple":
        return tuple(inner)
    if tag == "set":
        return set(inner)
    if tag == "frozenset":
        return frozenset(inner)
    if tag == "dict":
        return {k: v for k, v in inner}
    if tag == "enum":
        return _find_enum(inner[0])(inner[1])
    return _DECODERS[tag](inner)


# Tags are undone as the parser builds each object, innermost first: one pass in C.
_parse_tagged: Final = json.JSONDecoder(object_hook=_untag).decode


def decode_json_text(text: str) -> Any:
    """Stored JSON text, parsed and its tags decoded in one pass (see :func:`decode_json`)."""
    try:
        return _parse_tagged(text)
    except SerializationError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
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
        return _encode(value)
    except _Unencodable:
        return None
