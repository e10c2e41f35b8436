#!/usr/bin/env python3
"""volplane vs the upstream controllers, same API server, same machine, same run.

    make bench             # full size
    make bench QUICK=1     # every workload at a tenth of the size, a few minutes
    .venv/bin/python hack/bench/run.py --workloads w1,w4 --sides volplane,floor

Runs on its own local control plane (VOLPLANE_CLUSTER=bench unless set), never two
controllers at once. Prints a table, writes bench/results/<timestamp>.json and
bench/results/latest.json (quick runs: latest-quick.json). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib  # noqa: E402

RESULTS = lib.REPO / "bench" / "results"
ALL_WORKLOADS = ("w1", "w4", "w5", "w2", "w3")
ALL_SIDES = ("upstream-default", "upstream-unthrottled", "volplane", "volplane-0.2", "floor")

# name -> full size; QUICK is a tenth
SIZES = {"w1": 1000, "w2": 1000, "w3": 500, "w5": 10_000}

W5_TARGETS = {"rss_mib": "≤1.0x", "ready_after_s": "≤2x"}  # vs upstream (kcm)
TARGETS = {
    "w1": {"upstream-default": 0.1, "upstream-unthrottled": 1.0, "floor": 1.5},
    "w2": {"upstream-default": 0.5},
    "w3": {"upstream-default": 0.5},
    "w5": {"upstream-default": 1.0},
}


def _fmt(v, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        v = f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v}{unit}"


def _ratio(a, b):
    if a is None or b in (None, 0) or (isinstance(b, float) and math.isnan(b)):
        return None
    return a / b


def table(results: dict) -> str:
    """One row per (workload, metric); columns per side plus volplane's ratios."""
    rows: list[list[str]] = []
    head = ["workload", "metric", "upstream default", "upstream unthrottled", "volplane",
            "volplane 0.2", "write floor", "vp/up-def", "vp/up-unthr", "vp/floor", "vp/0.2",
            "target"]
    for w in ("w1", "w2", "w3"):
        res = results.get(w)
        if not res or not isinstance(res, dict) or "sides" not in res:
            continue
        sides = res["sides"]
        n = res.get("n")

        def get(side, path, sides=sides):
            r = sides.get(side)
            if not r or not r.get("correct"):
                return None
            v = r
            for p in path:
                v = (v or {}).get(p) if isinstance(v, dict) else None
            return v

        metrics = [
            ("wall s", ("wall_s",), True),
            ("p50 s", ("latency", "p50_s"), False),
            ("p95 s", ("latency", "p95_s"), False),
            ("p99 s", ("latency", "p99_s"), False),
            ("API requests", ("requests", "controller", "total"), False),
            ("API writes", ("requests", "controller", "writes"), False),
            ("RSS MiB (peak)", ("memory", "hwm_mib"), False),
            ("controller CPU s", ("cpu_s", "controller"), False),
            ("apiserver CPU s", ("cpu_s", "kube-apiserver"), False),
        ]
        for label, path, is_target in metrics:
            vals = {s: get(s, path) for s in ALL_SIDES}
            vp = vals["volplane"]
            ratios = [_ratio(vp, vals["upstream-default"]),
                      _ratio(vp, vals["upstream-unthrottled"]),
                      _ratio(vp, vals["floor"]), _ratio(vp, vals["volplane-0.2"])]
            target = ""
            if is_target:
                t = TARGETS.get(w, {})
                target = ", ".join(f"{k.replace('upstream-', 'up-')}≤{v}" for k, v in t.items())
            rows.append([f"{w.upper()} n={n}", label, *(_fmt(vals[s]) for s in ALL_SIDES),
                         *(_fmt(r) + ("x" if r is not None else "") for r in ratios), target])
        bad = [s for s, r in sides.items() if not r.get("correct")]
        if bad:
            rows.append([f"{w.upper()} n={n}", "FAILED/INCORRECT", *(
                "FAIL" if s in bad else "" for s in ALL_SIDES), "", "", "", "", ""])
    w4 = results.get("w4")
    if w4 and "points" in w4:
        for p in w4["points"]:
            rows.append([f"W4 {p['pvs']} PVs", "µs/claim index (brute)", "", "",
                         f"{p['index_us_per_claim']:.1f}", "", f"({p['brute_us_per_claim']:.0f})",
                         "", "", "", "", ""])
        rows.append(["W4", f"scaling {w4['scaling_of']}", "", "", f"{w4['scaling']}x", "", "",
                     "", "", "", "", "≤2x"])
    w5 = results.get("w5")
    if w5 and "sides" in w5:
        s = w5["sides"]
        objs = f"W5 {w5.get('objects', '')}"
        up = s.get("upstream-default") or {}
        v02 = s.get("volplane-0.2") or {}
        for variant, note in (("volplane", ""), ("volplane-nofast", " [Kopf's event path]"),
                              ("volplane-nopatch", " [Kopf barrier unpatched]"),
                              ("volplane-list", " [paginated LIST]")):
            vp = s.get(variant)
            if vp is None:
                continue
            if not vp.get("correct"):
                rows.append([objs, f"volplane{note}", "", "", "FAIL: " + "; ".join(
                    vp.get("errors", []))[:60], "", "", "", "", "", "", ""])
                continue
            def row(label, pick, key, vp=vp, note=note):
                a, b, c = pick(up), pick(vp), pick(v02) if v02.get("correct") else None
                rows.append([objs, label + note, _fmt(a), "", _fmt(b), _fmt(c), "",
                             _fmt(_ratio(b, a)) + "x", "", "", _fmt(_ratio(b, c)) + "x",
                             W5_TARGETS.get(key, "")])
            for label, key in (("RSS MiB (steady)", "rss_mib"), ("RSS MiB (peak)", "hwm_mib")):
                row(label, lambda r, key=key: (r.get("memory") or {}).get(key), key)
            row("start → caches synced s", lambda r: r.get("ready_after_s"), "ready_after_s")
            row("controller CPU s (start+settle)",
                lambda r: (r.get("cpu_s") or {}).get("controller"), "cpu")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


async def clean_all(env: lib.Env) -> None:
    """Every workload's leftovers (an interrupted run), so each starts from a clean slate."""
    import w1_static
    import w2_provision
    import w3_attach
    import w5_memory
    async with env.api() as api:
        for ns, w in ((w1_static.NS, "w1"), (w5_memory.NS, "w5")):
            await lib.clean(api, namespaces=(ns,), pv_label=f"{lib.WORKLOAD}={w}")
        try:
            await w3_attach.teardown(api, 0)
        except lib.ApiError as e:
            if e.status != 404:
                raise
        await lib.clean(api, namespaces=(w3_attach.NS,), pv_label=f"{lib.WORKLOAD}=w3")
        await w2_provision.clean(api)


async def main_async(args) -> dict:
    quick = args.quick
    workloads = [w for w in ALL_WORKLOADS if w in args.workloads.split(",")]
    include = set(args.sides.split(","))
    scale = 10 if quick else 1
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": quick,
        "machine": lib.machine(), "notes": [],
    }
    env = None
    if "volplane-0.2" in include and any(w != "w4" for w in workloads):
        results["volplane_0_2"] = {"commit": lib.V02_COMMIT,
                                   "executable": str(lib.ensure_volplane_02())}
    needs_cluster = any(w != "w4" for w in workloads)
    if needs_cluster:
        env = lib.Env()
        results["kubernetes"] = env.k8s_version
        async with env.api() as api:
            await lib.install_accounting(env, api)
        lib.log("cleaning leftovers of earlier runs")
        await clean_all(env)
        if args.clean_only:
            return results
    for w in workloads:
        t0 = time.monotonic()
        lib.log(f"=== {w.upper()} ===")
        try:
            if w == "w1":
                import w1_static
                n = args.n or SIZES["w1"] // scale
                results["w1"] = {"n": n, "sides": await w1_static.run(env, n, include)}
            elif w == "w4":
                import w4_match
                results["w4"] = w4_match.run(quick=quick)
            elif w == "w5":
                import w5_memory
                n = args.n or SIZES["w5"] // scale
                results["w5"] = await w5_memory.run(env, n, include, quick=quick)
            elif w == "w2":
                import w2_provision
                n = args.n or SIZES["w2"] // scale
                results["w2"] = {"n": n, "sides": await w2_provision.run(env, n, include)}
            elif w == "w3":
                import w3_attach
                n = args.n or SIZES["w3"] // scale
                results["w3"] = {"n": n, "sides": await w3_attach.run(env, n, include)}
        except Exception as e:  # one broken workload must not lose the others' numbers
            import traceback
            traceback.print_exc()
            results[w] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        results.setdefault("durations_s", {})[w] = round(time.monotonic() - t0, 1)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["loadavg_at_end"] = os.getloadavg()
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tenth of the size")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    p.add_argument("--sides", default=",".join(ALL_SIDES),
                   help="subset of " + ",".join(ALL_SIDES) + ",volplane-unthrottled,"
                        "volplane-w32,floor-32 (32 workers / 32 concurrent claims: W1),"
                        "volplane-nofast (Kopf's per-object event path, kopf_fastpath off: "
                        "W1, W5),volplane-nopatch (Kopf's barrier unpatched: W5),volplane-list "
                        "(paginated LIST instead of a streamed initial listing: W5); "
                        "volplane-0.2 is commit " + lib.V02_COMMIT + ", built on first use")
    p.add_argument("--n", type=int, default=0, help="override the size of W1/W2/W3/W5")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--clean-only", action="store_true",
                   help="remove every workload's objects from the bench cluster and exit")
    args = p.parse_args()
    results = asyncio.run(main_async(args))
    if args.clean_only:
        return 0
    text = table(results)
    results["table"] = text.splitlines()
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        complete = set(args.workloads.split(",")) >= set(ALL_WORKLOADS) and \
            set(args.sides.split(",")) >= set(ALL_SIDES) and not args.n
        part = "" if complete else "-partial-" + args.workloads.replace(",", "")
        name = f"{stamp}{'-quick' if args.quick else ''}{part}.json"
        body = json.dumps(results, indent=1, default=str) + "\n"
        (RESULTS / name).write_text(body)
        if complete:  # latest*.json always hold a whole run
            (RESULTS / ("latest-quick.json" if args.quick else "latest.json")).write_text(body)
        lib.log(f"results: bench/results/{name}")
    print()
    print(text)
    failed = [w for w in ALL_WORKLOADS if isinstance(results.get(w), dict) and (
        "error" in results[w] or any(not r.get("correct", True)
                                     for r in (results[w].get("sides") or {}).values())
        or results[w].get("correct") is False)]
    if failed:
        print(f"\nFAILED or incorrect: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
