"""W4: matching cost per claim, pure Python, no API server.

`VolumeIndex.find_best_match` (the controller's lookup) against `brute_force_match`
(the plain scan, the semantic reference) on the same PV populations of 1k, 10k and
100k volumes. The population is a mix a real cluster could have: 3 classes, 2
volume modes, 3 access-mode sets, sizes from 1Gi to 1Ti, 40 % of the PVs bound to
claims, 3 % Released, 10 % labelled tier=gold. The claims: random class, modes
and size; 5 % with a selector (tier=gold); some ask for more than any PV offers.

Reported per population size: microseconds per claim for each (best of several
repeats, to shave off the noise of a shared machine), the index's build cost per
PV, and the scaling ratio cost(largest) / cost(smallest), target <= 2. Every
answer of the index is checked against the brute-force answer on a sample.
"""

from __future__ import annotations

import random
import time
from typing import Any

from volplane.pv.index import VolumeIndex, brute_force_match

CLASSES = ("fast", "standard", "slow")
MODES = (["ReadWriteOnce"], ["ReadWriteOnce", "ReadOnlyMany"], ["ReadWriteMany"])
SIZES_GI = (1, 2, 4, 8, 10, 16, 20, 32, 50, 64, 100, 128, 200, 256, 500, 512, 1024)


def volumes(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        r = rnd.random()
        spec: dict[str, Any] = {
            "capacity": {"storage": f"{rnd.choice(SIZES_GI)}Gi"},
            "accessModes": list(rnd.choice(MODES)),
            "storageClassName": rnd.choice(CLASSES),
            "volumeMode": "Block" if rnd.random() < 0.1 else "Filesystem",
        }
        phase = "Available"
        if r < 0.40:
            spec["claimRef"] = {"namespace": f"ns-{i % 50}", "name": f"bound-{i}",
                                "uid": f"uid-bound-{i}"}
            phase = "Bound"
        elif r < 0.43:
            spec["claimRef"] = {"namespace": f"ns-{i % 50}", "name": f"gone-{i}",
                                "uid": f"uid-gone-{i}"}
            phase = "Released"
        labels = {"tier": "gold"} if rnd.random() < 0.10 else {"tier": "bronze"}
        out.append({"apiVersion": "v1", "kind": "PersistentVolume",
                    "metadata": {"name": f"pv-{i:06d}", "labels": labels},
                    "spec": spec, "status": {"phase": phase}})
    return out


def claims(m: int, seed: int = 2) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for i in range(m):
        size = rnd.choice(SIZES_GI) if rnd.random() < 0.97 else 4096
        spec: dict[str, Any] = {
            "accessModes": list(rnd.choice(MODES[:2]) if rnd.random() < 0.95 else MODES[2]),
            "storageClassName": rnd.choice(CLASSES),
            "resources": {"requests": {"storage": f"{size}Gi"}},
        }
        if rnd.random() < 0.05:
            spec["selector"] = {"matchLabels": {"tier": "gold"}}
        out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"namespace": f"app-{i % 20}", "name": f"claim-{i}",
                                 "uid": f"uid-claim-{i}"},
                    "spec": spec, "status": {"phase": "Pending"}})
    return out


def _per_call(fn, items, repeats: int) -> float:
    """Best-of-`repeats` mean seconds per item."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, (time.perf_counter() - t0) / len(items))
    return best


def run(sizes: tuple[int, ...] = (1_000, 10_000, 100_000), quick: bool = False
        ) -> dict[str, Any]:
    cl = claims(2000)
    points = []
    for n in sizes:
        vols = volumes(n)
        t0 = time.perf_counter()
        index = VolumeIndex(vols)
        build = (time.perf_counter() - t0) / n
        fast = _per_call(index.find_best_match, cl, repeats=3 if quick else 5)
        # brute force sorts and scans everything for each claim: a handful is plenty
        k = max(3, min(len(cl), (300_000 if not quick else 100_000) // n))
        sample = cl[:k]
        answers: list = []
        brute = _per_call(lambda c, a=answers, v=vols: a.append(brute_force_match(c, v).volume),
                          sample, repeats=1 if n > 10_000 else 2)
        name = lambda v: (v or {}).get("metadata", {}).get("name")  # noqa: E731
        mismatches = sum(1 for c, b in zip(sample, answers[:len(sample)], strict=True)
                         if name(index.find_best_match(c).volume) != name(b))
        matched = sum(1 for c in cl[:500] if index.find_best_match(c).volume is not None)
        points.append({
            "pvs": n, "index_us_per_claim": round(fast * 1e6, 2),
            "brute_us_per_claim": round(brute * 1e6, 1),
            "speedup": round(brute / fast, 1), "index_build_us_per_pv": round(build * 1e6, 2),
            "claims_timed": len(cl), "brute_claims_timed": k, "mismatches": mismatches,
            "match_rate": round(matched / 500, 3),
        })
    scaling = points[-1]["index_us_per_claim"] / points[0]["index_us_per_claim"]
    return {
        "points": points,
        "scaling": round(scaling, 2),
        "scaling_of": f"{sizes[-1]} / {sizes[0]} PVs",
        "target": "index cost per claim at the largest size <= 2x the smallest",
        "met": scaling <= 2.0,
        "correct": all(p["mismatches"] == 0 for p in points),
    }


if __name__ == "__main__":
    import json
    print(json.dumps(run(quick=True), indent=1))
