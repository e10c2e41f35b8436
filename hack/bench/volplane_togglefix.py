"""`volplane` with a prototype fix for Kopf's start-up cost (benchmark variant only).

Kopf holds every handler until all indexes are populated: during the initial
LIST it adds one toggle per object to a ToggleSet and drops it once the object
is indexed, and every add/drop calls notify_all() on the Condition that each of
the N per-object workers waits on. That is O(N^2) wake-ups before the first
handler runs (kopf/_cogs/aiokits/aiotoggles.py, ToggleSet.make_toggle /
drop_toggle; kopf/_core/reactor/queueing.py makes a toggle per object key).
The waiters only care about the aggregate state, so notifying only when the
aggregate flips is equivalent and O(N). This wrapper patches exactly that and
then runs volplane's CLI unchanged; W5 runs it beside plain volplane to show
what the fix is worth. It is not part of the operator.
"""

import os
import sys

# volplane's CLI sets $KUBECONFIG before importing kopf (the kubernetes package reads
# it at import time); this wrapper imports kopf first, so do the same here.
if "--kubeconfig" in sys.argv:
    os.environ["KUBECONFIG"] = os.path.abspath(sys.argv[sys.argv.index("--kubeconfig") + 1])

import kopf._cogs.aiokits.aiotoggles as toggles  # noqa: E402


async def make_toggle(self, _val=False, *, name=None):
    toggle = toggles.Toggle(_val, name=name, condition=self._condition)
    async with self._condition:
        before = self.is_on()
        self._toggles.add(toggle)
        if self.is_on() != before:
            self._condition.notify_all()
    return toggle


async def drop_toggle(self, toggle):
    async with self._condition:
        before = self.is_on()
        self._toggles.discard(toggle)
        if self.is_on() != before:
            self._condition.notify_all()


async def drop_toggles(self, items):
    async with self._condition:
        before = self.is_on()
        self._toggles.difference_update(items)
        if self.is_on() != before:
            self._condition.notify_all()


toggles.ToggleSet.make_toggle = make_toggle
toggles.ToggleSet.drop_toggle = drop_toggle
toggles.ToggleSet.drop_toggles = drop_toggles

from volplane.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
