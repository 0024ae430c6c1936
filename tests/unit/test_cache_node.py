"""The cache node's command semantics without sockets (NodeCore + RESP codec)."""

from __future__ import annotations

import random

import hiredis
import pytest

from photostack.blocks.cache import (
    NodeConfig,
    NodeCore,
    PolicyName,
    RequestParser,
    RespProtocolError,
    Session,
    parse_memory,
)
from photostack.blocks.cache.testing import ManualClock


class Client:
    """Runs commands on a NodeCore and decodes replies with hiredis, like a client would."""

    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.pushed: list[object] = []
        self.session = Session(self._push)

    def _push(self, frame: bytes) -> None:
        reader = hiredis.Reader()
        reader.feed(frame)
        self.pushed.append(reader.gets())

    def raw(self, *args: str | bytes) -> bytes:
        encoded = [a.encode() if isinstance(a, str) else a for a in args]
        return self.core.execute(self.session, encoded)

    def __call__(self, *args: str | bytes) -> object:
        reader = hiredis.Reader()
        reader.feed(self.raw(*args))
        replies = []
        while (reply := reader.gets()) is not False:
            replies.append(reply)
        return replies[0] if len(replies) == 1 else replies


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def client(clock: ManualClock) -> Client:
    return Client(NodeCore(NodeConfig(), clock=clock, randbelow=random.Random(5).randrange))


def _err(reply: object) -> str:
    assert isinstance(reply, hiredis.ReplyError), reply
    return str(reply)


def test_set_get_with_options(client: Client, clock: ManualClock) -> None:
    assert client("SET", "k", "v") == b"OK"
    assert client("GET", "k") == b"v"
    assert client("SET", "k", "w", "NX") is None
    assert client("SET", "new", "w", "XX") is None
    assert client("SET", "k", "w", "XX", "GET") == b"v"
    assert client("SET", "t", "1", "PX", "1500") == b"OK"
    assert client("PTTL", "t") == 1500
    assert client("TTL", "t") == 2  # Redis rounds to the nearest second
    clock.advance(1.5)
    assert client("GET", "t") is None
    assert client("SET", "e", "1", "EX", "10") == b"OK"
    assert client("SET", "e", "2", "KEEPTTL") == b"OK"
    assert client("TTL", "e") == 10
    assert client("set", "e", "3") == b"OK"  # lower case works; plain SET drops the TTL
    assert client("TTL", "e") == -1
    assert client("TTL", "missing") == -2


def test_set_errors(client: Client) -> None:
    assert _err(client("SET", "k", "v", "EX", "0")) == "ERR invalid expire time in set"
    assert _err(client("SET", "k", "v", "EX", "x")) == "ERR value is not an integer or out of range"
    assert _err(client("SET", "k", "v", "NX", "XX")) == "ERR syntax error"
    assert _err(client("SET", "k", "v", "EX", "1", "PX", "5")) == "ERR syntax error"
    assert _err(client("SET", "k")) == "ERR wrong number of arguments for 'set' command"
    assert _err(client("NOPE", "a")).startswith("ERR unknown command 'NOPE'")


def test_del_mget_exists_dbsize_flushall(client: Client) -> None:
    client("SET", "a", "1")
    client("SET", "b", "2")
    assert client("MGET", "a", "x", "b") == [b"1", None, b"2"]
    assert client("EXISTS", "a", "x", "b") == 2
    assert client("DBSIZE") == 2
    assert client("DEL", "a", "x") == 1
    assert client("FLUSHALL") == b"OK"
    assert client("DBSIZE") == 0


def test_incr_family(client: Client) -> None:
    assert client("INCR", "n") == 1
    assert client("INCRBY", "n", "41") == 42
    assert client("DECR", "n") == 41
    client("SET", "s", "abc")
    assert _err(client("INCR", "s")) == "ERR value is not an integer or out of range"
    client("SET", "s", " 1")
    assert _err(client("INCR", "s")) == "ERR value is not an integer or out of range"
    client("SET", "big", str(2**63 - 1))
    assert _err(client("INCR", "big")) == "ERR increment or decrement would overflow"


def test_incr_keeps_the_ttl(client: Client) -> None:
    client("SET", "n", "1", "EX", "100")
    client("INCR", "n")
    assert client("TTL", "n") == 100


def test_expire_persist(client: Client, clock: ManualClock) -> None:
    client("SET", "k", "v")
    assert client("EXPIRE", "k", "5") == 1
    assert client("EXPIRE", "nope", "5") == 0
    assert client("PERSIST", "k") == 1
    assert client("TTL", "k") == -1
    assert client("EXPIRE", "k", "-1") == 1
    assert client("GET", "k") is None


def test_info_counts_hits_misses_and_evictions(clock: ManualClock) -> None:
    client = Client(NodeCore(NodeConfig(maxmemory_bytes=100, policy=PolicyName.LRU), clock=clock))
    for i in range(20):
        client("SET", f"key{i}", "x" * 10)
    client("GET", "key19")
    client("GET", "key0")
    info = client("INFO")
    assert isinstance(info, bytes)
    fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
    assert fields["keyspace_hits"] == "1"
    assert fields["keyspace_misses"] == "1"
    assert int(fields["evicted_keys"]) == 20 - 6  # six entries of 15 bytes fit in 100
    assert int(fields["used_memory"]) <= 100
    assert fields["maxmemory_policy"] == "allkeys-lru"
    assert fields["db0"].startswith("keys=6,")


def test_config_get_set(client: Client) -> None:
    assert client("CONFIG", "GET", "maxmemory*") == [
        b"maxmemory",
        b"0",
        b"maxmemory-policy",
        b"allkeys-lru",
    ]
    assert client("CONFIG", "SET", "maxmemory", "1mb", "maxmemory-policy", "mru") == b"OK"
    assert client("CONFIG", "GET", "maxmemory") == [b"maxmemory", b"1048576"]
    assert client("CONFIG", "GET", "maxmemory-policy") == [b"maxmemory-policy", b"mru"]
    assert _err(client("CONFIG", "SET", "maxmemory-policy", "volatile-lru")).startswith(
        "ERR Invalid argument"
    )
    assert _err(client("CONFIG", "SET", "appendonly", "yes")).startswith("ERR Unknown option")


def test_noeviction_answers_oom(client: Client) -> None:
    client("CONFIG", "SET", "maxmemory", "10", "maxmemory-policy", "noeviction")
    assert client("SET", "a", "12345") == b"OK"
    assert _err(client("SET", "b", "123456")).startswith("OOM ")


def test_pubsub_in_resp2_and_resp3(client: Client) -> None:
    subscriber = Client(client.core)
    assert subscriber("SUBSCRIBE", "ch", "other") == [
        [b"subscribe", b"ch", 1],
        [b"subscribe", b"other", 2],
    ]
    assert _err(subscriber("GET", "k")).startswith("ERR Can't execute 'get'")
    assert subscriber("PING") == [b"pong", b""]
    assert client("PUBLISH", "ch", "hello") == 1
    assert subscriber.pushed == [[b"message", b"ch", b"hello"]]
    assert subscriber("UNSUBSCRIBE") == [[b"unsubscribe", b"ch", 1], [b"unsubscribe", b"other", 0]]
    assert client("PUBLISH", "ch", "nobody") == 0

    resp3 = Client(client.core)
    hello = resp3("HELLO", "3")
    assert isinstance(hello, dict)
    assert hello[b"proto"] == 3
    assert resp3.raw("GET", "missing") == b"_\r\n"
    resp3("SUBSCRIBE", "ch")
    assert resp3("GET", "missing") is None  # RESP3 allows commands while subscribed
    client("PUBLISH", "ch", "x")
    assert resp3.pushed == [[b"message", b"ch", b"x"]]
    assert resp3.raw("UNSUBSCRIBE", "ch").startswith(b">3\r\n")
    assert _err(resp3("HELLO", "4")).startswith("NOPROTO")


def test_quit_marks_the_session_closing(client: Client) -> None:
    assert client("QUIT") == b"OK"
    assert client.session.closing


def test_request_parser_handles_pipelines_and_partial_reads() -> None:
    parser = RequestParser()
    wire = b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*3\r\n$3\r\nSET\r\n$1\r\nk"
    parser.feed(wire)
    assert parser.next_request() == [b"PING"]
    assert parser.next_request() == [b"GET", b"k"]
    assert parser.next_request() is None
    parser.feed(b"\r\n$1\r\nv\r\n")
    assert parser.next_request() == [b"SET", b"k", b"v"]
    bad = RequestParser()
    bad.feed(b"PING\r\n")
    with pytest.raises(RespProtocolError):
        bad.next_request()
    bad = RequestParser()
    bad.feed(b":1\r\n")
    with pytest.raises(RespProtocolError):
        bad.next_request()


def test_parse_memory() -> None:
    assert parse_memory("100") == 100
    assert parse_memory("1kb") == 1024
    assert parse_memory("1K") == 1000
    assert parse_memory("2gb") == 2 * 1024**3
    with pytest.raises(ValueError, match="memory"):
        parse_memory("lots")
