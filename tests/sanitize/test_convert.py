"""The conversion table on pickles made here: numpy 1.x names, stdlib values, what is refused.

The reader and the converter need no torch; the pickles are made with the real classes."""

from __future__ import annotations

import argparse
import collections
import datetime
import enum
import pathlib
import pickle

import pytest

from surgery.formats.torch_pickle import unpickle
from surgery.sanitizing.convert import convert
from surgery.sanitizing.read import EVERY_GLOBAL, called_globals


def _converted(obj, protocol: int = 2, rewrite: tuple[bytes, bytes] | None = None):
    data = pickle.dumps(obj, protocol=protocol)
    if rewrite:
        data = data.replace(*rewrite)
    got = unpickle(data, "test", EVERY_GLOBAL).obj
    return got, convert(got)


def test_numpy_1_names_convert_like_numpy_2_ones():
    np = pytest.importorskip("numpy")
    obj = {"s": np.float32(1.5), "a": np.arange(3, dtype=np.int16)}
    # numpy 1.x pickles name numpy.core.multiarray; GLOBAL opcodes are text lines, so the rename is exact
    _, (out, notes) = _converted(obj, rewrite=(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert out["s"] == 1.5 and notes.converted == {"s": "numpy.float32", "a": "numpy.ndarray (int16, shape [3])"}
    assert out["a"].data == np.arange(3, dtype=np.int16).tobytes()


def test_stdlib_values():
    obj = {"when": datetime.datetime(2024, 5, 1, 12, 30), "day": datetime.date(2024, 5, 1),
           "took": datetime.timedelta(minutes=2), "path": pathlib.PurePosixPath("a/b"),
           "win": pathlib.PureWindowsPath("C:/x/y"), "count": collections.Counter("aab"),
           "od": collections.OrderedDict(a=1), "sl": slice(1, 5), "fs": frozenset({3}), "ns": argparse.Namespace(x=[1])}
    _, (out, notes) = _converted(obj)
    assert out["when"] == "2024-05-01T12:30:00" and out["day"] == "2024-05-01" and out["took"] == 120.0
    assert out["path"] == "a/b" and out["win"] == "C:\\x\\y"
    assert out["count"] == {"a": 2, "b": 1} and type(out["count"]) is collections.Counter
    assert type(out["od"]) is collections.OrderedDict and out["sl"] == (1, 5, None) and out["fs"] == {3}
    assert out["ns"] == {"x": [1]}
    assert notes.converted["sl"] == "slice" and notes.converted["win"] == "pathlib.PureWindowsPath"
    assert not notes.dropped


class Color(enum.Enum):
    RED = 1


def test_an_instance_built_by_a_call_is_code_and_a_plain_instance_is_data():
    got, (out, notes) = _converted({"c": Color.RED, "ns": argparse.Namespace(a=1)})
    assert called_globals(got) == {f"{__name__}.Color"}  # refused by read_source unless allowed
    assert "c" in notes.dropped and out == {"ns": {"a": 1}}


def test_a_shared_dropped_value_is_listed_at_every_place():
    # pickle memoizes one Enum member: openff-nagl-models' layers all share ActivationFunction.ReLU
    got, (out, notes) = _converted({"layers": [{"act": Color.RED, "n": i} for i in range(3)]})
    assert out == {"layers": [{"n": 0}, {"n": 1}, {"n": 2}]}
    assert set(notes.dropped) == {f"layers[{i}].act" for i in range(3)}
    assert len(set(notes.dropped.values())) == 1


def test_shared_values_stay_shared_and_cycles_end():
    shared = [1, 2]
    loop: list = []
    loop.append(loop)
    _, (out, _) = _converted({"a": shared, "b": shared, "loop": loop})
    assert out["a"] is out["b"] and out["loop"][0] is out["loop"]


def test_a_malformed_record_of_a_known_type_is_dropped_with_why():
    obj = {"when": datetime.datetime(2024, 5, 1), "gap": datetime.timedelta(days=1), "ok": 1}
    data = pickle.dumps(obj, protocol=2)
    # a datetime whose month byte is 13 (its bytes travel as UTF-8 text), a timedelta of 2**31 - 1 days
    data = data.replace(b"\x07\xc3\xa8\x05\x01", b"\x07\xc3\xa8\x0d\x01")
    data = data.replace(b"K\x01K\x00K\x00", b"J\xff\xff\xff\x7fK\x00K\x00")
    got = unpickle(data, "test", EVERY_GLOBAL).obj
    out, notes = convert(got)
    assert out == {"ok": 1} and set(notes.dropped) == {"when", "gap"}
    assert "malformed" in notes.dropped["when"] and "malformed" in notes.dropped["gap"]
