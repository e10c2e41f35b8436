"""Node status reports: what and when (volplane.attach.reports)."""

from __future__ import annotations

import pytest

from volplane.attach import actual as A
from volplane.attach import reports as R

from .world import (
    va,
)


# -- node status reports: coalesced per node ------------------------------------------------
def test_node_in_progress_counts_attaching_without_error_on_that_node():
    asw = A.build_asw([va("pv1", "n1", attached=False), va("pv2", "n2"),
                       va("pv3", "n3", attached=False, attach_error="no slot")],
                      pvs={}, nodes={})
    assert R.node_attach_in_progress(asw.values(), "n1")
    assert not R.node_attach_in_progress(asw.values(), "n2")   # attached
    assert not R.node_attach_in_progress(asw.values(), "n3")   # stuck: no outcome coming
    assert not R.node_attach_in_progress(asw.values(), "n4")
    # a volume wanted on the node with no attachment yet: more to report soon
    assert R.node_attach_in_progress(asw.values(), "n2", [("pv9", "n2")])
    assert not R.node_attach_in_progress(asw.values(), "n2", [("pv2", "n2"), ("pv9", "n1")])
    # (keys are volume identities: these PVs are unknown, so their names)


def test_node_report_debounces_and_one_report_covers_a_burst():
    sch = R.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    assert sch.changed("n1", 0.0, busy=True) == pytest.approx(0.1)
    assert sch.changed("n1", 0.05, busy=True) is None       # the queued report covers it
    assert sch.begin("n1", 0.1) is None                      # go
    assert sch.finish("n1", 0.15, wrote=True, busy=False) is None  # nothing new: done


def test_node_report_changes_during_a_write_get_one_follow_up_after_the_interval():
    sch = R.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    sch.changed("n1", 0.0, busy=True)
    assert sch.begin("n1", 0.1) is None
    for t in (0.11, 0.12, 0.13):
        assert sch.changed("n1", t, busy=True) is None        # in flight: accumulate
    # written at 0.1; more attachments under way: the next report not before 1.1
    assert sch.finish("n1", 0.2, wrote=True, busy=True) == pytest.approx(0.9)
    assert sch.changed("n1", 0.5, busy=True) is None          # covered by that one
    assert sch.begin("n1", 1.1) is None


def test_node_report_goes_out_after_the_debounce_once_the_node_is_quiet():
    sch = R.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    sch.changed("n1", 0.0, busy=True)
    sch.begin("n1", 0.1)
    sch.finish("n1", 0.12, wrote=True, busy=True)
    assert sch.changed("n1", 0.3, busy=True) == pytest.approx(0.8)   # at 1.1
    # the last attachment on the node finished: report it now, not at 1.1
    assert sch.changed("n1", 0.5, busy=False) == pytest.approx(0.0)
    assert sch.begin("n1", 0.5) is None
    sch.finish("n1", 0.55, wrote=True, busy=False)
    assert sch.begin("n1", 1.1) is None   # the superseded 1.1 entry: harmless, no change


def test_node_report_interval_applies_only_after_a_write():
    sch = R.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    sch.changed("n1", 0.0, busy=True)
    sch.begin("n1", 0.1)
    # nothing to write (the report already said so): no interval to keep
    assert sch.finish("n1", 0.12, wrote=False, busy=True) is None
    assert sch.changed("n1", 0.2, busy=True) == pytest.approx(0.1)


def test_node_report_forced_write_and_early_superseded_entries():
    sch = R.NodeReportSchedule(debounce=0.1, min_interval=1.0)
    assert sch.changed("n1", 0.0, busy=True) == pytest.approx(0.1)   # entry at 0.1
    assert sch.begin("n1", 0.05, force=True) is None                 # a detach: now
    sch.changed("n1", 0.06, busy=True)
    assert sch.finish("n1", 0.07, wrote=True, busy=True) == pytest.approx(0.98)  # at 1.05
    assert sch.begin("n1", 0.1) == pytest.approx(0.95)   # the 0.1 entry: not due, skip
    assert sch.begin("n1", 0.5, force=True) is None      # a detach never waits
    sch.finish("n1", 0.51, wrote=True, busy=False)
    sch.forget("n1")
    assert sch.begin("n1", 0.6) is None


