"""The one Kopf patch: the index barrier keeps its meaning and wakes waiters only on a flip."""

import asyncio

from kopf._cogs.aiokits.aiotoggles import ToggleSet

from volplane import kopf_patches


def test_the_pinned_kopf_is_the_one_patched():
    """Fails when the pinned Kopf changes (version or the patched methods' source):
    then re-check the barrier's cost, and drop or re-pin the patch."""
    assert kopf_patches.kopf_version() == kopf_patches.PATCHED_VERSION
    assert kopf_patches.original_source_digest() == kopf_patches.PINNED_DIGEST
    assert kopf_patches.apply()


def _wakeups(patched: bool, n: int = 200) -> tuple[int, bool]:
    if patched:
        kopf_patches.apply()
    else:
        kopf_patches.revert()

    async def body():
        barrier = ToggleSet(all)
        toggles = [await barrier.make_toggle(name=f"obj{i}") for i in range(n)]
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
        early = waiter.done()             # must stay closed: one object still unindexed
        await barrier.drop_toggle(toggles[-1])
        await asyncio.wait_for(waiter, 1)  # and now it opens
        return woken, early

    try:
        return asyncio.run(body())
    finally:
        kopf_patches.apply()


def test_barrier_opens_only_when_the_last_object_is_indexed_and_wakes_once():
    assert _wakeups(patched=True) == (1, False)     # one flip, one wake-up
    woken, early = _wakeups(patched=False)          # Kopf's own: one per object
    assert (woken, early) == (200, False)
