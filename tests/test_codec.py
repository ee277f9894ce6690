"""Job arguments: readable, lossless JSON by default; pickle when a job asks for it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import sys
import threading
import uuid
from decimal import Decimal
from typing import Any

import cloudpickle
import pytest
import sqlalchemy as sa

import tasklet
from tasklet import (
    PayloadTooLargeError,
    SerializationError,
    _codec,
    _config,
    job,
    storage,
)
from tasklet._database import Database
from tasklet.schema import jobs
from tests.support import Backend, count_jobs, get_row


class Color(enum.Enum):
    RED = "red"
    BLUE = (0, 0, 255)


class Level(enum.IntEnum):
    LOW = 1


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


PARIS_SUMMER = dt.timezone(dt.timedelta(hours=2))

#: Values the JSON serializer must carry without loss, each of its exact type.
LOSSLESS: dict[str, Any] = {
    "aware-datetime": dt.datetime(2030, 6, 1, 12, 30, 15, 123456, tzinfo=PARIS_SUMMER),
    "utc-datetime": dt.datetime(2030, 6, 1, 12, 30, tzinfo=dt.UTC),
    "naive-datetime": dt.datetime(2030, 6, 1, 12, 30, 15, 7),
    "date": dt.date(2030, 6, 1),
    "time": dt.time(23, 59, 58, 999999),
    "aware-time": dt.time(8, 0, tzinfo=PARIS_SUMMER),
    "timedelta": dt.timedelta(days=-3, seconds=5, microseconds=17),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": Decimal("1234567890.123456789012345678900"),
    "decimal-nan": Decimal("NaN"),
    "bytes": b"\x00\xff binary \x80",
    "enum": Color.RED,
    "enum-with-tuple-value": Color.BLUE,
    "int-enum": Level.LOW,
    "tuple": (1, "two", (3.5, None)),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a", "b"}),
    "dict-with-int-keys": {1: "one", 2: {3: "three"}},
    "dict-with-tuple-keys": {(1, 2): "pair"},
    "nested": {"users": [{"id": 1, "seen": dt.date(2030, 1, 1)}], "tags": ("a",)},
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "-0.0": -0.0,
    "huge-float": 1e16,
    "tiny-float": 5e-324,
    "float": 0.1,
    "big-int": 2**70,
    "bool": True,
    "none": None,
    "unicode": "héllo ✓ 🚀",
    "string-with-nul": "a\x00b",
    "user-dict-with-tag-key": {"__tasklet__": "datetime", "v": "2030-01-01T00:00:00"},
    "user-dict-with-tag-key-and-nested-dict": {"__tasklet__": {"__tasklet__": "x"}},
}


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down; NaN equals NaN, -0.0 differs from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return bool(a == b) and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, Decimal):
        return str(a) == str(b)
    if isinstance(a, dt.datetime | dt.time):
        return bool(a == b) and a.utcoffset() == b.utcoffset()
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        # Key order is not part of a dict's value (PostgreSQL's jsonb does not keep it).
        b_keys = {k: k for k in b}
        return len(a) == len(b) and all(
            k in b_keys and same(k, b_keys[k]) and same(v, b[k]) for k, v in a.items()
        )
    return bool(a == b)


# ----------------------------------------------------------------------- JSON


def test_json_payload_is_readable_in_the_database(db: Database) -> None:
    @job
    def welcome(user_id: int, email: str, tags: list[str], at: dt.datetime) -> None: ...

    at = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
    handle = welcome.defer(user_id=5, email="ada@example.com", tags=["new"], at=at)

    with db.begin(read_only=True) as conn:
        raw = conn.execute(
            sa.select(sa.cast(jobs.c.args, sa.Text()), jobs.c.args_pickle).where(
                jobs.c.id == handle.id
            ),
            execution_options=db.execution_options,
        ).one()
    text, pickled = raw
    assert pickled is None
    assert json.loads(text) == {
        "user_id": 5,
        "email": "ada@example.com",
        "tags": ["new"],
        "at": {"__tasklet__": "datetime", "v": "2030-06-01T12:00:00+00:00"},
    }


@pytest.mark.parametrize("value", list(LOSSLESS.values()), ids=list(LOSSLESS))
def test_value_survives_encoding_to_json_text_and_back(value: Any) -> None:
    text = json.dumps(_codec.encode_json({"value": value}, None), allow_nan=False)

    decoded = _codec.decode_json(json.loads(text))["value"]

    assert same(decoded, value), f"{value!r} came back as {decoded!r}"


def test_every_value_survives_a_round_trip_through_the_database(db: Database) -> None:
    @job
    def keep(value: Any) -> None: ...

    handles = keep.defer_many([{"value": v} for v in LOSSLESS.values()])

    changed = {}
    for (label, value), handle in zip(LOSSLESS.items(), handles, strict=True):
        row = get_row(db, handle.id)
        decoded = keep.decode(row.serializer, row.args, row.args_pickle)["value"]
        if not same(decoded, value):
            changed[label] = (value, decoded)
    assert not changed, f"changed by the round trip: {changed}"


def test_every_value_survives_a_claim_as_json_text(db: Database) -> None:
    @job
    def keep(value: Any) -> None: ...

    keep.defer_many([{"value": v} for v in LOSSLESS.values()])
    claimed = storage.jobs_claim(
        db, worker_id="w", queues=None, names=[keep.name], limit=len(LOSSLESS)
    )

    assert all(isinstance(row.args, str) for row in claimed)
    decoded = [keep.decode(row.serializer, row.args, row.args_pickle)["value"] for row in claimed]
    changed = {
        label: (value, got)
        for (label, value), got in zip(LOSSLESS.items(), decoded, strict=True)
        if not same(got, value)
    }
    assert not changed, f"changed by the claim: {changed}"


def test_unencodable_argument_raises_serialization_error_naming_it(db: Database) -> None:
    @job
    def keep(value: Any, other: int) -> None: ...

    with pytest.raises(SerializationError, match=r"argument 'value' of type object"):
        keep.defer(value=object(), other=1)
    assert count_jobs(db) == 0


def test_unencodable_nested_value_is_named_by_its_path(db: Database) -> None:
    @job
    def keep(value: Any) -> None: ...

    with pytest.raises(SerializationError, match=r"'value'\['a'\]\[1\]"):
        keep.defer(value={"a": [1, object()]})
    assert count_jobs(db) == 0


def test_serialization_error_is_a_type_error() -> None:
    assert issubclass(SerializationError, TypeError)


def test_unknown_tag_in_a_stored_payload_is_refused() -> None:
    with pytest.raises(SerializationError, match="unknown payload tag"):
        _codec.decode_json({"value": {"__tasklet__": "martian", "v": 1}})


def test_unknown_tag_in_stored_json_text_is_refused() -> None:
    with pytest.raises(SerializationError, match="unknown payload tag"):
        _codec.decode_json_text('{"value": {"__tasklet__": "martian", "v": 1}}')


def test_malformed_tagged_value_in_json_text_is_a_serialization_error() -> None:
    with pytest.raises(SerializationError, match="do not decode"):
        _codec.decode_json_text('{"value": {"__tasklet__": "datetime", "v": "not a date"}}')


# --------------------------------------------------------------------- pickle


def test_pickle_serializer_stores_bytes_and_no_json(db: Database) -> None:
    @job(serializer="pickle")
    def draw(point: Point) -> None: ...

    row = get_row(db, draw.defer(point=Point(1, 2)).id)

    assert row.serializer == "pickle"
    assert row.args is None
    assert isinstance(row.args_pickle, bytes)
    assert row.args_pickle.startswith(b"tasklet-pickle/")


def test_pickle_serializer_round_trips_what_json_cannot_carry(db: Database) -> None:
    @job(serializer="pickle")
    def draw(point: Point, scale: Any) -> None: ...

    handle = draw.defer(point=Point(1, 2), scale=lambda x: x * 3)

    row = get_row(db, handle.id)
    decoded = draw.decode(row.serializer, row.args, row.args_pickle)
    assert decoded["point"] == Point(1, 2)
    assert decoded["scale"](2) == 6


def test_pickle_encoding_and_decoding_round_trips_an_object() -> None:
    blob = _codec.encode_pickle({"point": Point(3, 4)}, None)

    assert _codec.decode_pickle(blob) == {"point": Point(3, 4)}


def test_decode_refuses_a_pickled_payload_for_a_job_not_declared_pickle() -> None:
    @job
    def draw(point: Any) -> None: ...

    blob = _codec.encode_pickle({"point": Point(1, 2)}, None)

    with pytest.raises(SerializationError, match="serializer='pickle'"):
        draw.decode("pickle", None, blob)


def test_decode_pickle_refuses_a_blob_written_by_another_python_version() -> None:
    blob = b"tasklet-pickle/2.7\n" + cloudpickle.dumps({"point": Point(1, 2)})
    running = f"{sys.version_info.major}.{sys.version_info.minor}"

    with pytest.raises(SerializationError) as caught:
        _codec.decode_pickle(blob)
    message = str(caught.value)
    assert "written by Python 2.7" in message
    assert f"runs Python {running}" in message


def test_decode_pickle_refuses_a_blob_without_tasklet_header() -> None:
    with pytest.raises(SerializationError, match="no tasklet header"):
        _codec.decode_pickle(cloudpickle.dumps({"point": 1}))


def test_unpicklable_argument_raises_serialization_error(db: Database) -> None:
    @job(serializer="pickle")
    def keep(value: Any) -> None: ...

    with pytest.raises(SerializationError, match="cannot be pickled"):
        keep.defer(value=threading.Lock())
    assert count_jobs(db) == 0


# -------------------------------------------------------------- payload limit


def configure_limit(backend: Backend, max_payload_bytes: int) -> Database:
    tasklet.configure(backend.url, schema=backend.schema, max_payload_bytes=max_payload_bytes)
    return _config.database()


def test_json_payload_over_max_payload_bytes_is_refused_and_nothing_inserted(
    backend: Backend,
) -> None:
    db = configure_limit(backend, 200)

    @job
    def keep(value: str) -> None: ...

    keep.defer(value="x" * 100)
    with pytest.raises(PayloadTooLargeError, match="over the limit of 200"):
        keep.defer(value="x" * 300)
    assert count_jobs(db) == 1


def test_pickle_payload_over_max_payload_bytes_is_refused_and_nothing_inserted(
    backend: Backend,
) -> None:
    db = configure_limit(backend, 500)

    @job(serializer="pickle")
    def keep(value: bytes) -> None: ...

    with pytest.raises(PayloadTooLargeError, match="max_payload_bytes"):
        keep.defer(value=b"x" * 1000)
    assert count_jobs(db) == 0


def test_defer_many_with_one_payload_over_the_limit_inserts_nothing(backend: Backend) -> None:
    db = configure_limit(backend, 200)

    @job
    def keep(value: str) -> None: ...

    with pytest.raises(PayloadTooLargeError):
        keep.defer_many([{"value": "small"}, {"value": "x" * 300}])
    assert count_jobs(db) == 0
