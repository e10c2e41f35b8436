"""The watch layer's bookkeeping without Kopf: listers, derived indexes, listeners.

Kopf itself is exercised by every e2e test (it feeds every cache); these pin what
volplane adds on top: the write-through overlay, the (key, old, new) the listeners get,
and the derived index functions.
"""

import kopf
import pytest

from volplane import kinds
from volplane.informers import Informers, Lister, handler_id


def pv(name, rv, claim=None, **spec):
    body = {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": str(rv),
                         "managedFields": [{"manager": "x"}],
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}",
                                         "keep": "me"}},
            "spec": dict(spec)}
    if claim:
        body["spec"]["claimRef"] = {"namespace": claim[0], "name": claim[1]}
    return body


def test_feed_slims_and_listeners_get_old_and_new():
    inf = Informers()
    pvs = inf.lister(kinds.PVS)
    seen = []
    inf.listen(kinds.PVS, lambda k, old, new: seen.append(
        (k, old and old["metadata"]["resourceVersion"],
         new and new["metadata"]["resourceVersion"])))
    inf.feed(pv("a", 5))
    inf.feed(pv("a", 6, x=1))
    assert "managedFields" not in pvs["a"]["metadata"]
    assert pvs["a"]["metadata"]["annotations"] == {"keep": "me"}
    assert pvs["a"]["spec"] == {"x": 1}
    inf.delete(kinds.PVS, "a")
    assert "a" not in pvs and len(pvs) == 0
    assert seen == [("a", None, "5"), ("a", "5", "6"), ("a", "6", None)]


def test_derived_index_follows_the_objects():
    inf = Informers()
    by_claim = inf.index(kinds.PVS_BY_CLAIM)
    inf.feed(pv("a", 1, claim=("ns", "c1")))
    inf.feed(pv("b", 1, claim=("ns", "c1")))
    assert sorted(by_claim.get("ns/c1")) == ["a", "b"]
    inf.feed(pv("a", 2, claim=("ns", "c2")))       # claimRef moved
    assert by_claim.get("ns/c1") == ["b"] and by_claim.get("ns/c2") == ["a"]
    inf.feed(pv("b", 2))                            # unclaimed: filed nowhere
    inf.delete(kinds.PVS, "a")
    assert by_claim.keys() == []


def test_written_objects_are_visible_until_the_watch_catches_up():
    inf = Informers()
    pvs = inf.lister(kinds.PVS)
    inf.feed(pv("a", 5))
    mine = pvs.put(pv("a", 7, x=2))               # the response of our write
    assert pvs["a"] is mine and "managedFields" not in mine["metadata"]
    inf.feed(pv("a", 6))                            # an older event: still ours
    assert pvs["a"]["metadata"]["resourceVersion"] == "7"
    inf.feed(pv("a", 7, x=2))                       # the watch brings our write
    assert pvs["a"] is not mine and pvs["a"]["spec"] == {"x": 2}
    assert pvs.pending() == []


def test_created_objects_are_listed_and_found_by_index_before_the_watch():
    inf = Informers()
    pvs = inf.lister(kinds.PVS)
    by_claim = inf.index(kinds.PVS_BY_CLAIM)
    pvs.put(pv("new", 3, claim=("ns", "c")))
    assert "new" in pvs and list(pvs) == ["new"] and len(pvs) == 1
    assert by_claim.get("ns/c") == ["new"]
    inf.feed(pv("new", 3, claim=("ns", "c")))
    assert by_claim.get("ns/c") == ["new"] and len(pvs) == 1


def test_gone_hides_the_object_until_deleted_or_recreated():
    inf = Informers()
    pvs = inf.lister(kinds.PVS)
    inf.feed(pv("a", 5))
    pvs.gone("a")
    assert pvs.get("a") is None and "a" not in pvs and len(pvs) == 0 and list(pvs) == []
    inf.feed(pv("a", 9))                            # re-created (newer): visible again
    assert pvs["a"]["metadata"]["resourceVersion"] == "9"
    pvs.gone("a")
    inf.delete(kinds.PVS, "a")
    assert pvs.get("a") is None and pvs._overlay == {}


def test_overlay_entries_the_watch_never_confirms_expire():
    now = [0.0]
    lister = Lister(kinds.PVS, clock=lambda: now[0])
    lister.put(pv("ghost", 1))
    now[0] = 1000.0
    lister.caught_up("other", 1)
    assert lister.get("ghost") is None


@pytest.mark.parametrize("claim,want", [
    ({"status": {"phase": "Bound"}, "spec": {"storageClassName": "a"}}, ()),
    ({"status": {"phase": "Pending"}, "spec": {"storageClassName": "a"}}, ("a",)),
    ({"spec": {}}, ("",)),
    ({"metadata": {"annotations": {"volume.beta.kubernetes.io/storage-class": "b"}},
      "spec": {"storageClassName": "a"}}, ("b",)),
])
def test_unbound_claims_by_class(claim, want):
    assert kinds.unbound_claim_class_keys(claim) == want


def test_pod_keys_and_slim_pod():
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"x": "y"}},
           "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}],
                    "volumes": [{"name": "a", "persistentVolumeClaim": {"claimName": "c1"}},
                                {"name": "e", "ephemeral": {"volumeClaimTemplate": {}}},
                                {"name": "h", "hostPath": {"path": "/"}}]},
           "status": {"phase": "Running",
                      "containerStatuses": [{"state": {"running": {}}}]}}
    assert kinds.pod_claim_keys(pod) == ("ns/c1", "ns/p-e")
    assert kinds.pod_node_keys(pod) == ("n1",)
    slim = kinds.slim_pod(pod)
    assert slim["status"] == {"phase": "Running", "containersRunning": True}
    assert "containers" not in slim["spec"] and "labels" not in slim["metadata"]
    assert kinds.pod_claim_keys(slim) == ("ns/c1", "ns/p-e")


def test_kopf_registration_has_one_index_and_one_event_handler_per_kind():
    inf = Informers()
    inf.index(kinds.PVS_BY_CLAIM)
    inf.lister(kinds.PVCS)
    registry = kopf.OperatorRegistry()
    inf.register(registry)
    ids = {h.id for h in registry._indexing.get_all_handlers()}
    assert ids == {handler_id("persistentvolumes"), handler_id("persistentvolumeclaims")}
    watching = {h.id for h in registry._watching.get_all_handlers()}
    assert watching == {handler_id("persistentvolumes.events"),
                        handler_id("persistentvolumeclaims.events")}
    # nothing that would make Kopf write to the objects (annotations, finalizers)
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()


def test_one_index_per_kind_files_the_object_and_its_derived_keys():
    from volplane.informers import index_object
    out = index_object(pv("a", 1, claim=("ns", "c1")), kinds.PVS, [kinds.PVS_BY_CLAIM])
    assert set(out) == {"a", ("pvs-by-claim", "ns/c1")}
    assert out[("pvs-by-claim", "ns/c1")] == "a"
    assert "managedFields" not in out["a"]["metadata"]
    assert set(index_object(pv("b", 1), kinds.PVS, [kinds.PVS_BY_CLAIM])) == {"b"}


def test_listers_see_only_objects_not_derived_keys():
    inf = Informers()
    pvs = inf.lister(kinds.PVS)
    inf.index(kinds.PVS_BY_CLAIM)
    inf.feed(pv("a", 1, claim=("ns", "c1")))
    assert list(pvs) == ["a"] and len(pvs) == 1 and [k for k, _ in pvs.items()] == ["a"]


# -- deletions seen by the watch: tombstones ------------------------------------------------------
def _va(name, rv, uid="u1", **status):
    return {"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
            "metadata": {"name": name, "uid": uid, "resourceVersion": str(rv)},
            "spec": {"nodeName": "n"}, "status": status}


class Clock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def test_a_response_older_than_a_watched_deletion_does_not_bring_the_object_back():
    """A GET answered before the DELETE but processed after the DELETED event (both in
    flight in one event loop) would put the deleted object back (issue 15)."""
    inf = Informers()
    vas = inf.lister(kinds.VOLUME_ATTACHMENTS)
    inf.feed(_va("x", 5, attached=True))
    inf.delete(kinds.VOLUME_ATTACHMENTS, "x", rv=7)
    assert "x" not in vas
    vas.put(_va("x", 6, attached=True))                 # the lagging GET response
    assert "x" not in vas and vas.get("x") is None and vas.pending() == []
    assert list(vas) == [] and len(vas) == 0
    vas.put(_va("x", 10, uid="u2"))                     # a new incarnation of the name
    assert vas["x"]["metadata"]["uid"] == "u2"


def test_a_deletion_of_an_older_incarnation_keeps_the_newer_one():
    """The old attachment's DELETED event arrives after its successor (same name) was
    created and written through: the successor stays (listeners may be told of the
    deletion; they only enqueue the key, and its sync reads the successor)."""
    inf = Informers()
    vas = inf.lister(kinds.VOLUME_ATTACHMENTS)
    by_node = inf.index(kinds.ATTACHMENTS_BY_NODE)
    inf.feed(_va("x", 5, uid="u1"))
    vas.put(_va("x", 10, uid="u2"))
    inf.delete(kinds.VOLUME_ATTACHMENTS, "x", rv=7)
    assert vas["x"]["metadata"]["uid"] == "u2"
    assert by_node.get("n") == ["x"]
    vas.put(_va("x", 11, uid="u2", attached=True))
    assert vas["x"]["status"] == {"attached": True}


def test_deletion_tombstones_expire():
    clock = Clock()
    inf = Informers(clock=clock)
    vas = inf.lister(kinds.VOLUME_ATTACHMENTS)
    inf.feed(_va("x", 5))
    inf.delete(kinds.VOLUME_ATTACHMENTS, "x", rv=7)
    clock.t = 400.0
    inf.feed(_va("y", 8))
    inf.delete(kinds.VOLUME_ATTACHMENTS, "y", rv=9)     # pruning happens on insert
    assert "x" not in vas._deleted and "y" in vas._deleted
    vas.put(_va("x", 6))                                # tombstone gone: accepted again
    assert "x" in vas
