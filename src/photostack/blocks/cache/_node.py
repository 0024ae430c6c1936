"""The cache node's command semantics, without sockets: arguments in, RESP reply bytes out.

:class:`NodeCore` holds the keyspace (a :class:`BoundedCache` of bytes bounded by
``maxmemory``), pub/sub and counters; the server module only feeds it parsed requests. Replies
and error texts follow Redis, so redis-py and redis-cli treat the node like Redis for these
commands. Values are strings only, so WRONGTYPE never arises; INCR on a non-integer string
answers Redis's ``ERR value is not an integer or out of range``.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable

from photostack.blocks.cache._bounded import BoundedCache, Clock, make_policy
from photostack.blocks.cache._errors import CacheFullError, UnknownPolicyError
from photostack.blocks.cache._policy import PolicyName, RandBelow, parse_policy_name
from photostack.blocks.cache._pubsub import PubSub
from photostack.blocks.cache._resp import (
    OK,
    PONG,
    bulk,
    bulk_array,
    error,
    integer,
    mapping,
    simple,
    verbatim,
)
from photostack.blocks.cache._session import (
    INT64,
    NodeConfig,
    Session,
    human_bytes,
    parse_int,
    parse_memory,
)

__all__ = ["NodeCore"]

_ERR_INT = error("ERR value is not an integer or out of range")
_ERR_SYNTAX = error("ERR syntax error")
_ERR_OOM = error("OOM command not allowed when used memory > 'maxmemory'.")
_SUBSCRIBED_ALLOWED = frozenset({b"SUBSCRIBE", b"UNSUBSCRIBE", b"PING", b"QUIT", b"RESET"})
_CONFIG_PARAMS = ("maxmemory", "maxmemory-policy")
# Clients decide features by this field; the node implements a subset of Redis 6.2's commands.
_COMPAT_VERSION = "6.2.0"


Handler = Callable[[Session, list[bytes]], bytes]


class NodeCore:
    def __init__(
        self,
        config: NodeConfig,
        *,
        clock: Clock = time.monotonic,
        randbelow: RandBelow | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._randbelow = randbelow
        self._policy_name = config.policy
        self._maxmemory = config.maxmemory_bytes
        self.cache: BoundedCache[bytes, bytes] = BoundedCache(
            make_policy(config.policy, randbelow),
            max_bytes=config.maxmemory_bytes or None,
            sizer=_entry_size,
            clock=clock,
            randbelow=randbelow,
        )
        self.pubsub = PubSub()
        self.started_at = clock()
        self.connected_clients = 0
        self.total_connections = 0
        self.total_commands = 0
        table: dict[bytes, tuple[Handler, int]] = {
            b"GET": (self._get, 2),
            b"SET": (self._set, -3),
            b"DEL": (self._del, -2),
            b"MGET": (self._mget, -2),
            b"EXISTS": (self._exists, -2),
            b"EXPIRE": (self._expire, 3),
            b"PERSIST": (self._persist, 2),
            b"TTL": (self._ttl, 2),
            b"PTTL": (self._pttl, 2),
            b"TYPE": (self._type, 2),
            b"INCR": (self._incr, 2),
            b"INCRBY": (self._incrby, 3),
            b"DECR": (self._decr, 2),
            b"DECRBY": (self._decrby, 3),
            b"PING": (self._ping, -1),
            b"ECHO": (self._echo, 2),
            b"INFO": (self._info, -1),
            b"DBSIZE": (self._dbsize, 1),
            b"FLUSHALL": (self._flushall, -1),
            b"FLUSHDB": (self._flushall, -1),
            b"SELECT": (self._select, 2),
            b"PUBLISH": (self._publish, 3),
            b"SUBSCRIBE": (self._subscribe, -2),
            b"UNSUBSCRIBE": (self._unsubscribe, -1),
            b"CONFIG": (self._config, -2),
            b"CLIENT": (self._client, -2),
            b"COMMAND": (self._command, -1),
            b"QUIT": (self._quit, 1),
            b"HELLO": (self._hello, -1),
        }
        self._table = {**table, **{name.lower(): entry for name, entry in table.items()}}

    @property
    def policy_name(self) -> PolicyName:
        return self._policy_name

    def execute(self, session: Session, args: list[bytes]) -> bytes:
        """Run one request; the reply (pub/sub messages go through the session's push)."""
        self.total_commands += 1
        entry = self._table.get(args[0])
        if entry is None:
            entry = self._table.get(args[0].upper())
            if entry is None:
                name = args[0].decode(errors="replace")
                rest = " ".join(f"'{a.decode(errors='replace')}'" for a in args[1:])
                return error(f"ERR unknown command '{name}', with args beginning with: {rest}")
        handler, arity = entry
        count = len(args)
        if count != arity if arity > 0 else count < -arity:
            name = args[0].decode(errors="replace").lower()
            return error(f"ERR wrong number of arguments for '{name}' command")
        if (
            session.subscriber.channels
            and not session.resp3
            and args[0].upper() not in _SUBSCRIBED_ALLOWED
        ):
            name = args[0].decode(errors="replace").lower()
            return error(
                f"ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / "
                "PING / QUIT / RESET are allowed in this context"
            )
        return handler(session, args)

    def sweep(self) -> int:
        """One active-expiry cycle (the server calls it every ``active_expire_interval_s``)."""
        return self.cache.sweep()

    def disconnect(self, session: Session) -> None:
        self.pubsub.drop(session.subscriber)

    # -- strings ----------------------------------------------------------------------------

    def _get(self, session: Session, args: list[bytes]) -> bytes:
        value = self.cache.get(args[1])
        return session.null if value is None else bulk(value)

    def _mget(self, session: Session, args: list[bytes]) -> bytes:
        get = self.cache.get
        return bulk_array([get(key) for key in args[1:]], session.null)

    def _set(self, session: Session, args: list[bytes]) -> bytes:
        key, value = args[1], args[2]
        ttl_s: float | None = None
        keep_ttl = nx = xx = want_old = False
        i = 3
        while i < len(args):
            option = args[i].upper()
            if option in (b"EX", b"PX") and ttl_s is None and not keep_ttl and i + 1 < len(args):
                amount = parse_int(args[i + 1])
                if amount is None:
                    return _ERR_INT
                if amount <= 0:
                    return error("ERR invalid expire time in set")
                ttl_s = amount if option == b"EX" else amount / 1000
                i += 2
                continue
            if option == b"NX" and not xx:
                nx = True
            elif option == b"XX" and not nx:
                xx = True
            elif option == b"KEEPTTL" and ttl_s is None:
                keep_ttl = True
            elif option == b"GET":
                want_old = True
            else:
                return _ERR_SYNTAX
            i += 1
        cache = self.cache
        old: bytes | None = None
        if nx or xx or want_old:
            old = cache.peek(key)
            if (nx and old is not None) or (xx and old is None):
                return session.bulk(old) if want_old else session.null
        try:
            cache.put(key, value, ttl_s, keep_ttl=keep_ttl)
        except CacheFullError:
            return _ERR_OOM
        return session.bulk(old) if want_old else OK

    def _del(self, session: Session, args: list[bytes]) -> bytes:
        delete = self.cache.delete
        return integer(sum(1 for key in args[1:] if delete(key)))

    def _exists(self, session: Session, args: list[bytes]) -> bytes:
        return integer(sum(1 for key in args[1:] if key in self.cache))

    def _type(self, session: Session, args: list[bytes]) -> bytes:
        return simple(b"string" if args[1] in self.cache else b"none")

    def _incr(self, session: Session, args: list[bytes]) -> bytes:
        return self._add(args[1], 1)

    def _decr(self, session: Session, args: list[bytes]) -> bytes:
        return self._add(args[1], -1)

    def _incrby(self, session: Session, args: list[bytes]) -> bytes:
        delta = parse_int(args[2])
        return _ERR_INT if delta is None else self._add(args[1], delta)

    def _decrby(self, session: Session, args: list[bytes]) -> bytes:
        delta = parse_int(args[2])
        return _ERR_INT if delta is None else self._add(args[1], -delta)

    def _add(self, key: bytes, delta: int) -> bytes:
        old = self.cache.peek(key)
        current = 0 if old is None else parse_int(old)
        if current is None:
            return _ERR_INT
        result = current + delta
        if not -INT64 <= result < INT64:
            return error("ERR increment or decrement would overflow")
        try:
            self.cache.put(key, b"%d" % result, keep_ttl=True)
        except CacheFullError:
            return _ERR_OOM
        return integer(result)

    # -- expiry -----------------------------------------------------------------------------

    def _expire(self, session: Session, args: list[bytes]) -> bytes:
        seconds = parse_int(args[2])
        if seconds is None:
            return _ERR_INT
        return integer(1 if self.cache.expire(args[1], seconds) else 0)

    def _persist(self, session: Session, args: list[bytes]) -> bytes:
        try:
            had_ttl = self.cache.expires_in(args[1]) is not None
        except KeyError:
            return integer(0)
        if had_ttl:
            self.cache.expire(args[1], None)
        return integer(1 if had_ttl else 0)

    def _remaining_ms(self, key: bytes) -> int:
        try:
            left_s = self.cache.expires_in(key)
        except KeyError:
            return -2
        return -1 if left_s is None else max(0, round(left_s * 1000))

    def _ttl(self, session: Session, args: list[bytes]) -> bytes:
        ms = self._remaining_ms(args[1])
        return integer(ms if ms < 0 else (ms + 500) // 1000)

    def _pttl(self, session: Session, args: list[bytes]) -> bytes:
        return integer(self._remaining_ms(args[1]))

    # -- server -----------------------------------------------------------------------------

    def _ping(self, session: Session, args: list[bytes]) -> bytes:
        if len(args) > 2:
            return error("ERR wrong number of arguments for 'ping' command")
        if session.subscriber.channels and not session.resp3:
            return bulk_array([b"pong", args[1] if len(args) == 2 else b""])
        return bulk(args[1]) if len(args) == 2 else PONG

    def _echo(self, session: Session, args: list[bytes]) -> bytes:
        return bulk(args[1])

    def _dbsize(self, session: Session, args: list[bytes]) -> bytes:
        return integer(len(self.cache))

    def _flushall(self, session: Session, args: list[bytes]) -> bytes:
        if len(args) > 2 or (len(args) == 2 and args[1].upper() not in (b"ASYNC", b"SYNC")):
            return _ERR_SYNTAX
        self.cache.clear()
        return OK

    def _select(self, session: Session, args: list[bytes]) -> bytes:
        index = parse_int(args[1])
        if index is None:
            return _ERR_INT
        return OK if index == 0 else error("ERR DB index is out of range")

    def _quit(self, session: Session, args: list[bytes]) -> bytes:
        session.closing = True
        return OK

    def _hello(self, session: Session, args: list[bytes]) -> bytes:
        """HELLO [protover [SETNAME name]]: redis-py 8 opens every connection with HELLO 3."""
        if len(args) >= 2:
            version = parse_int(args[1])
            if version is None:
                return error("ERR Protocol version is not an integer or out of range")
            if version not in (2, 3):
                return error("NOPROTO unsupported protocol version")
            rest = [a.upper() for a in args[2:]]
            if rest and not (rest[0] == b"SETNAME" and len(rest) == 2):
                return _ERR_SYNTAX
            if rest:
                session.name = args[3]
            session.use_protocol(version)
        pairs = [
            (b"server", bulk(b"redis")),
            (b"version", bulk(_COMPAT_VERSION.encode())),
            (b"proto", integer(3 if session.resp3 else 2)),
            (b"id", integer(id(session))),
            (b"mode", bulk(b"standalone")),
            (b"role", bulk(b"master")),
            (b"modules", b"*0\r\n"),
        ]
        return mapping([(bulk(k), v) for k, v in pairs], resp3=session.resp3)

    def _command(self, session: Session, args: list[bytes]) -> bytes:
        return b"*0\r\n"  # no command docs: redis-cli then simply shows no hints

    def _client(self, session: Session, args: list[bytes]) -> bytes:
        sub = args[1].upper()
        if sub == b"SETNAME" and len(args) == 3:
            session.name = args[2]
            return OK
        if sub == b"GETNAME" and len(args) == 2:
            return session.bulk(session.name or None)
        if sub == b"SETINFO" and len(args) == 4:
            return OK
        if sub == b"ID" and len(args) == 2:
            return integer(id(session))
        return error(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'.")

    def _info(self, session: Session, args: list[bytes]) -> bytes:
        stats = self.cache.stats
        used = self.cache.bytes_used
        keys = len(self.cache)
        sections = {
            "server": [
                f"redis_version:{_COMPAT_VERSION}",
                "server_name:photostack-cache-node",
                "redis_mode:standalone",
                f"process_id:{os.getpid()}",
                f"tcp_port:{self.config.port}",
                f"uptime_in_seconds:{int(self._clock() - self.started_at)}",
            ],
            "clients": [f"connected_clients:{self.connected_clients}"],
            "memory": [
                f"used_memory:{used}",
                f"used_memory_human:{human_bytes(used)}",
                f"maxmemory:{self._maxmemory}",
                f"maxmemory_human:{human_bytes(self._maxmemory)}",
                f"maxmemory_policy:{self._policy_name.value}",
            ],
            "stats": [
                f"total_connections_received:{self.total_connections}",
                f"total_commands_processed:{self.total_commands}",
                f"expired_keys:{stats.expirations}",
                f"evicted_keys:{stats.evictions}",
                f"keyspace_hits:{stats.hits}",
                f"keyspace_misses:{stats.misses}",
                f"pubsub_channels:{self.pubsub.channel_count()}",
            ],
            "keyspace": (
                [f"db0:keys={keys},expires={self.cache.expiring_count},avg_ttl=0"] if keys else []
            ),
        }
        wanted = [a.decode(errors="replace").lower() for a in args[1:]]
        if not wanted or any(w in ("all", "default", "everything") for w in wanted):
            wanted = list(sections)
        lines: list[str] = []
        for name in wanted:
            if name in sections:
                lines += [f"# {name.capitalize()}", *sections[name], ""]
        text = "\r\n".join(lines).encode()
        return verbatim(text) if session.resp3 else bulk(text)

    def _config(self, session: Session, args: list[bytes]) -> bytes:
        sub = args[1].upper()
        if sub == b"GET" and len(args) >= 3:
            values = {
                "maxmemory": str(self._maxmemory),
                "maxmemory-policy": self._policy_name.value,
            }
            found: dict[str, bytes] = {}
            for raw in args[2:]:
                pattern = raw.decode(errors="replace").lower()
                for name in _CONFIG_PARAMS:
                    if fnmatch.fnmatchcase(name, pattern):
                        found[name] = values[name].encode()
            pairs = [(bulk(name.encode()), bulk(value)) for name, value in found.items()]
            return mapping(pairs, resp3=session.resp3)
        if sub == b"SET" and len(args) >= 4 and len(args) % 2 == 0:
            return self._config_set(args[2:])
        if sub == b"RESETSTAT" and len(args) == 2:
            self.cache.stats.hits = self.cache.stats.misses = 0
            self.cache.stats.evictions = self.cache.stats.expirations = 0
            self.total_commands = 0
            return OK
        return error(f"ERR unknown subcommand or wrong number of arguments for '{sub.decode()}'")

    def _config_set(self, pairs: list[bytes]) -> bytes:
        memory, policy = self._maxmemory, self._policy_name
        for raw_name, raw_value in zip(pairs[::2], pairs[1::2], strict=True):
            name, value = raw_name.decode(errors="replace").lower(), raw_value.decode()
            try:
                if name == "maxmemory":
                    memory = parse_memory(value)
                elif name == "maxmemory-policy":
                    policy = parse_policy_name(value)
                else:
                    return error(
                        f"ERR Unknown option or number of arguments for CONFIG SET - '{name}'"
                    )
            except (ValueError, UnknownPolicyError) as exc:
                return error(f"ERR Invalid argument '{value}' for CONFIG SET '{name}' - {exc}")
        if policy is not self._policy_name:
            self.cache.set_policy(make_policy(policy, self._randbelow))
            self._policy_name = policy
        if memory != self._maxmemory:
            self.cache.resize(max_entries=None, max_bytes=memory or None)
            self._maxmemory = memory
        return OK

    # -- pub/sub ----------------------------------------------------------------------------

    def _publish(self, session: Session, args: list[bytes]) -> bytes:
        return integer(self.pubsub.publish(args[1], args[2]))

    def _subscribe(self, session: Session, args: list[bytes]) -> bytes:
        sub = session.subscriber
        replies = []
        for channel in args[1:]:
            self.pubsub.subscribe(sub, channel)
            replies.append(
                session.frame([bulk(b"subscribe"), bulk(channel), integer(len(sub.channels))])
            )
        return b"".join(replies)

    def _unsubscribe(self, session: Session, args: list[bytes]) -> bytes:
        sub = session.subscriber
        channels = args[1:] or sorted(sub.channels)
        if not channels:
            return session.frame([bulk(b"unsubscribe"), session.null, integer(0)])
        replies = []
        for channel in channels:
            self.pubsub.unsubscribe(sub, channel)
            replies.append(
                session.frame([bulk(b"unsubscribe"), bulk(channel), integer(len(sub.channels))])
            )
        return b"".join(replies)


def _entry_size(key: object, value: object) -> int:
    return len(key) + len(value)  # type: ignore[arg-type]
