"""`volplane check`: read-only invariants of a live cluster.

- `invariants.py`: pure functions over plain dicts (a `Snapshot`), one per invariant,
  each returning the violations it finds; the semantics come from the decision layer
  (pv/decide.py, pv/index.py, pools/{ledger,placement,slots}.py, attach/{desired,actual,
  reconcile,reports}.py), not re-implemented;
- `gather.py`: LISTs what the invariants read (through kube.py), nothing else;
- `report.py`: text and JSON renderings.
"""
