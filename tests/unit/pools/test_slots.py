"""The device-slot ledger of pool attachments (volplane.pools.slots)."""

from __future__ import annotations

from volplane.pools import slots as S

DRIVER = S.POOL_DRIVER


# -- slot ledger ---------------------------------------------------------------------------
def slot_va(name, node_name, pool, slot, attacher=DRIVER):
    v = {"metadata": {"name": name, "annotations": {}},
         "spec": {"attacher": attacher, "nodeName": node_name,
                  "source": {"persistentVolumeName": name}}}
    if slot is not None:
        v["metadata"]["annotations"] = {S.POOL_ANNOTATION: pool, S.SLOT_ANNOTATION: str(slot)}
    return v


def test_slot_ledger_counts_per_node_and_pool():
    vas = [slot_va("a", "n1", "p", 0), slot_va("b", "n1", "p", 2), slot_va("c", "n2", "p", 1),
           slot_va("d", "n1", "q", 1), slot_va("e", "n1", "p", None),
           slot_va("f", "n1", "p", 1, attacher="other.csi")]
    used = S.slots_in_use(vas, "n1", "p")
    assert used == {0: "a", 2: "b"}
    assert S.free_slot(used, 16) == 1
    assert S.free_slot({0: "a", 1: "b"}, 2) is None
    assert S.free_slot([], 0) is None


def test_slot_ledger_duplicate_holder_is_decided_by_name():
    vas = [slot_va("zz", "n1", "p", 3), slot_va("aa", "n1", "p", 3)]
    assert S.slots_in_use(vas, "n1", "p") == {3: "aa"}


def test_allocating_one_at_a_time_never_double_allocates():
    vas, slots = [], 5
    for i in range(7):
        used = S.slots_in_use(vas, "n1", "p")
        got = S.free_slot(used, slots)
        if i < slots:
            assert got is not None and got not in used
            vas.append(slot_va(f"v{i}", "n1", "p", got))
        else:
            assert got is None
    held = [S.slot_of(v)[1] for v in vas]
    assert sorted(held) == list(range(slots))
    vas.pop(2)  # one attachment gone: its slot is the next one handed out
    assert S.free_slot(S.slots_in_use(vas, "n1", "p"), slots) == 2


def test_pool_helpers():
    assert S.pool_of_handle("pool-a/pvc-1") == "pool-a"
    assert S.pool_of_handle("nohandle") is None
    assert S.device_path("pool-a", 3) == "/dev/volplane/pool-a/slot-3"
    assert S.slots_per_node({"spec": {"slotsPerNode": 4}}) == 4
    assert S.slots_per_node({"spec": {}}) == 16
    assert S.no_slot_message("n1", 16, 16, "p") == (
        "node n1 has no free device slot (16/16 in use on pool p)")
