"""Renderings of a check Report: text for people, JSON for tools."""

from __future__ import annotations

import json

from .invariants import INVARIANTS, Report, Violation

_NOUNS = (("pvs", "PVs"), ("pvcs", "claims"), ("pods", "pods"), ("nodes", "nodes"),
          ("vas", "attachments"), ("pools", "pools"), ("allocations", "allocations"))


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def text(report: Report) -> str:
    objs = ", ".join(f"{report.counts.get(k, 0)} {noun}" for k, noun in _NOUNS)
    lines = [f"volplane check: {len(report.checked)} invariants over {objs}"]
    by_inv: dict[str, list[Violation]] = {}
    for v in report.violations:
        by_inv.setdefault(v.invariant, []).append(v)
    for inv in report.checked:
        found = by_inv.get(inv, [])
        group = INVARIANTS[inv][0]
        lines.append(f"{'FAIL' if found else 'ok':<5} {group:<12} {inv}"
                     + (f" ({len(found)})" if found else ""))
        for v in found:
            lines.append(f"      - {v.message}" + (f"  [age {_age(v.age)}]"
                                                   if v.age is not None else ""))
    tail = (f" ({len(report.excluded)} more on excluded objects)" if report.excluded else "")
    if report.ok:
        lines.append(f"all invariants hold{tail}")
    else:
        lines.append(f"{len(report.violations)} violation(s){tail}")
    return "\n".join(lines)


def as_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, sort_keys=True)
