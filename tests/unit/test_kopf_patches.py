"""The Kopf barrier patch keeps the barrier's meaning and wakes waiters only on a flip."""

import asyncio

from kopf._cogs.aiokits.aiotoggles import ToggleSet

from volplane import kopf_patches


def test_patch_applies_to_the_pinned_kopf():
    assert kopf_patches.apply()


def test_barrier_opens_only_when_the_last_object_is_indexed_and_wakes_rarely():
    kopf_patches.apply()

    async def body():
        barrier = ToggleSet(all)
        toggles = [await barrier.make_toggle(name=f"obj{i}") for i in range(200)]
        woken = 0
        orig = barrier._condition.notify_all

        def counting_notify_all():
            nonlocal woken
            woken += 1
            orig()

        barrier._condition.notify_all = counting_notify_all
        waiter = asyncio.create_task(barrier.wait_for(True))
        await asyncio.sleep(0)
        for t in toggles[:-1]:
            await barrier.drop_toggle(t)
        await asyncio.sleep(0)
        assert not waiter.done()          # one object still unindexed
        await barrier.drop_toggle(toggles[-1])
        await asyncio.wait_for(waiter, 1)  # and now it opens
        assert woken == 1                  # one flip, one wake-up (was 200)

    asyncio.run(body())
