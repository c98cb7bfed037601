"""`HiredisPacker` against redis-py's own packer (the reference): the same bytes for every command
a worker sends, the same errors for what redis-py refuses, and a live client that uses it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer
from redis.exceptions import DataError

from driftline.shared import redis_clients
from driftline.shared.redis_clients import HiredisPacker

_encode = Encoder("utf-8", "strict", False).encode
REFERENCE = HiredisRespSerializer(PythonRespSerializer(6000, _encode).pack, _encode)  # redis-py's default
PURE_PYTHON = PythonRespSerializer(6000, _encode)  # redis-py without hiredis: chunks, same protocol

arguments = st.one_of(
    st.text(),
    st.binary(max_size=200),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 5e-324, 1e16, 1e-7, 0.1 + 0.2, math.pi]),
)
names = st.sampled_from(["HSET", "EVAL", "CONFIG GET", b"CLIENT SETINFO", b"PING", "hgetall"])


@settings(max_examples=400, deadline=None)
@given(names, st.lists(arguments, max_size=40))
def test_same_bytes_as_redis_py(name, args):
    ours = HiredisPacker().pack(name, *args)
    assert ours == REFERENCE.pack(name, *args)
    assert b"".join(ours) == b"".join(PURE_PYTHON.pack(name, *args))


def test_a_large_value_is_packed_whole_as_redis_py_does():
    blob = bytes(range(256)) * 100  # over redis-py's 6,000-byte chunking cutoff
    assert HiredisPacker().pack("SET", "k", blob) == REFERENCE.pack("SET", "k", blob)


@pytest.mark.parametrize("odd", [True, False])
def test_a_bool_is_refused_as_redis_py_refuses_it(odd):
    with pytest.raises(DataError) as ours:
        HiredisPacker().pack("SET", "k", odd)
    with pytest.raises(DataError) as theirs:
        REFERENCE.pack("SET", "k", odd)
    assert str(ours.value) == str(theirs.value)


def test_other_types_go_through_redis_pys_packer():
    for value in (bytearray(b"ab"), memoryview(b"cd")):
        assert b"".join(HiredisPacker().pack("SET", "k", value)) == b"".join(REFERENCE.pack("SET", "k", value))
    with pytest.raises(DataError, match="NoneType"):
        HiredisPacker().pack("SET", "k", None)
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate, strict as redis-py's encoder
        HiredisPacker().pack("SET", "k", "\ud800")


def test_a_one_node_client_packs_with_it(redis_url):
    client = redis_clients.connect(redis_url)
    assert isinstance(client.connection_pool.connection_kwargs["command_packer"], HiredisPacker)
    pipe = client.pipeline(transaction=False)
    pipe.hset("packer:test", mapping={"x": 0.1, "n": 3, "s": "é", "b": b"\x00\xff"})
    pipe.hgetall("packer:test")
    pipe.delete("packer:test")
    assert pipe.execute()[1] == {b"x": b"0.1", b"n": b"3", b"s": "é".encode(), b"b": b"\x00\xff"}


@pytest.mark.parametrize("url, options", [("redis://127.0.0.1:6379/0?encoding=latin-1", {}),
                                          ("redis://127.0.0.1:6379/0", {"encoding_errors": "replace"})])
def test_a_client_that_encodes_text_otherwise_keeps_redis_pys_packer(url, options):
    client = redis_clients.connect(url, **options)  # no connection is made yet
    assert "command_packer" not in client.connection_pool.connection_kwargs
