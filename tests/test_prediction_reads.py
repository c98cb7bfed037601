"""`CoalescedReads` on a real Redis: concurrent requests share round trips, one in flight at a
time, each request gets its own key's hash, and a failed round trip fails its whole batch."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio

from driftline.prediction.reads import CoalescedReads


def test_reads_wait_for_the_round_trip_in_flight_and_go_together(redis_url, redis_client):
    keys = [f"reads-test:{{e{i}}}" for i in range(20)]
    for i, key in enumerate(keys):
        redis_client.hset(key, mapping={"n": i})

    async def scenario():
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            reads = CoalescedReads(client)
            alone = await reads.read(keys[0])  # an idle service: at once, alone
            assert (alone, reads.round_trips) == ({b"n": b"0"}, 1)
            waiting = []
            for key in keys:  # one request a loop iteration, as requests trickle in under load
                waiting.append(asyncio.ensure_future(reads.read(key)))
                await asyncio.sleep(0)
            got = await asyncio.gather(*waiting)
            assert got == [{b"n": str(i).encode()} for i in range(20)]
            assert reads.reads == 21
            # The first leaves alone; the rest wait while a round trip is out, which spans several
            # loop iterations even when Redis answers at once (a round trip per read made it 20).
            assert reads.round_trips - 1 <= 8, reads.round_trips
            before = reads.round_trips
            assert await reads.read("reads-test:{nobody}") == {} and reads.round_trips == before + 1
        finally:
            await client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        redis_client.delete(*keys)


def test_a_failed_round_trip_fails_its_batch_and_the_next_one_goes():
    async def scenario():
        client = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens
        reads = CoalescedReads(client)
        first = asyncio.ensure_future(reads.read("a"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(reads.read("b"))  # waits for the first's round trip
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, redis.ConnectionError) for r in results), results
        assert reads.round_trips == 2  # the waiting read was sent after the failure, not dropped
        await client.aclose()

    asyncio.run(scenario())
