"""Shared benchmark plumbing: a results table on stdout and JSON in bench/results/."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def machine() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
    """Print rows as an aligned table and write them (plus machine facts) to results/<name>.json."""
    os.makedirs(RESULTS, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(f[i]) for f in fmt)) for i, c in enumerate(cols)]
    print(f"\n== {name}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for f in fmt:
        print("  ".join(v.ljust(w) for v, w in zip(f, widths, strict=True)))
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as fh:
        json.dump({"name": name, "machine": machine(), "rows": rows, **(extra or {})}, fh, indent=2)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
