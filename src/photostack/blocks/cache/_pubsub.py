"""Channel subscriptions for the cache node (PUBLISH / SUBSCRIBE / UNSUBSCRIBE, no patterns)."""

from __future__ import annotations

from collections.abc import Callable

from photostack.blocks.cache._resp import bulk, push

__all__ = ["PubSub", "Subscriber"]


class Subscriber:
    """One connection's side of pub/sub: its channels and how to push bytes to it."""

    __slots__ = ("channels", "push", "resp3")

    def __init__(self, push: Callable[[bytes], None]) -> None:
        self.push = push
        self.channels: set[bytes] = set()
        self.resp3 = False  # RESP3 connections get push frames


class PubSub:
    def __init__(self) -> None:
        self._channels: dict[bytes, set[Subscriber]] = {}

    def channel_count(self) -> int:
        return len(self._channels)

    def subscribe(self, subscriber: Subscriber, channel: bytes) -> None:
        subscriber.channels.add(channel)
        self._channels.setdefault(channel, set()).add(subscriber)

    def unsubscribe(self, subscriber: Subscriber, channel: bytes) -> None:
        subscriber.channels.discard(channel)
        members = self._channels.get(channel)
        if members is not None:
            members.discard(subscriber)
            if not members:
                del self._channels[channel]

    def drop(self, subscriber: Subscriber) -> None:
        """Forget a closed connection."""
        for channel in list(subscriber.channels):
            self.unsubscribe(subscriber, channel)

    def publish(self, channel: bytes, message: bytes) -> int:
        """Push ``message`` to every subscriber of ``channel``; how many received it."""
        members = self._channels.get(channel)
        if not members:
            return 0
        parts = [b"$7\r\nmessage\r\n", bulk(channel), bulk(message)]
        frame2 = b"*3\r\n" + b"".join(parts)
        frame3 = push(parts)
        for member in members:
            member.push(frame3 if member.resp3 else frame2)
        return len(members)
