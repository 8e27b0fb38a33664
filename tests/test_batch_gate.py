"""The gate in front of Serve's batcher (deployments/detector.py ``BatchGate``), driven without Ray.

Serve seals a batch as soon as its wait timeout passes and queues it for its concurrency semaphore,
so under load it formed batches of one or two behind the running one. Behind the gate, the items
that arrive while every engine slot is busy wait, and go in together when a batch ends.
"""

from __future__ import annotations

import asyncio

from deployments.detector import BatchGate


def test_items_wait_while_the_slot_is_busy_and_enter_together_when_it_frees():
    async def scenario() -> None:
        gate = BatchGate(max_batch_size=4, slots=1)
        for key in (1, 2):  # the engine is free: up to a batch goes straight in
            await gate.enter(key)
        gate.started([1, 2])  # Serve sealed [1, 2]: the only slot is busy now
        waiting = [asyncio.ensure_future(gate.enter(k)) for k in range(10, 16)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiting)  # nothing more goes into Serve's batcher meanwhile
        gate.ended()
        await asyncio.sleep(0)
        assert [w.done() for w in waiting] == [True] * 4 + [False] * 2  # the next batch: 4, first come first
        gate.started([10, 11, 12, 13])
        gate.ended()
        await asyncio.sleep(0)
        assert all(w.done() for w in waiting)

    asyncio.run(scenario())


def test_a_cancelled_or_failed_item_gives_its_place_back():
    async def scenario() -> None:
        gate = BatchGate(max_batch_size=2, slots=1)
        await gate.enter(1)
        await gate.enter(2)
        blocked = asyncio.ensure_future(gate.enter(3))
        await asyncio.sleep(0)
        assert not blocked.done()
        gate.leave(1)  # item 1 failed (or its client went away) before any batch took it
        await asyncio.sleep(0)
        assert blocked.done()
        cancelled = asyncio.ensure_future(gate.enter(4))
        await asyncio.sleep(0)
        cancelled.cancel()
        gate.leave(4)  # what Batcher.submit's finally does
        gate.leave(2)
        gate.leave(3)
        await gate.enter(5)  # every place is free again: no leak blocks later items
        await gate.enter(6)

    asyncio.run(scenario())


def test_raising_the_batch_size_or_the_slots_lets_waiting_items_in():
    async def scenario() -> None:
        gate = BatchGate(max_batch_size=1, slots=1)
        await gate.enter(1)
        more = [asyncio.ensure_future(gate.enter(k)) for k in (2, 3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in more)
        gate.set_limits(max_batch_size=3, slots=1)
        await asyncio.sleep(0)
        assert all(w.done() for w in more)

    asyncio.run(scenario())
