"""docs/performance.png from bench/results/*.json: latency vs store size (log-log), drawn with Pillow.

    python -m bench.plot
"""

from __future__ import annotations

import json
import math
import os

from PIL import Image, ImageDraw

from bench.common import RESULTS

OUT = os.path.join(os.path.dirname(__file__), "..", "docs", "performance.png")


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(json.load(f)["rows"])


def series() -> dict[str, list[tuple[float, float]]]:
    """name -> [(patch vectors or images, p50 ms)] from whatever results exist."""
    out: dict[str, list[tuple[float, float]]] = {}
    hover = os.path.join(RESULTS, "hover.json")
    if os.path.exists(hover):
        rows = _rows(hover)
        out["hover: server work per hover (x = images)"] = [(r["images"], r["hover_p50_ms"]) for r in rows]
    for name in sorted(os.listdir(RESULTS)):
        if name.startswith("index_d") and name.endswith(".json"):
            rows = _rows(os.path.join(RESULTS, name))
            dim, _, kind = name.removeprefix("index_d").removesuffix(".json").partition("_")
            data = ", isotropic worst case" if kind == "isotropic" else ""
            out[f"top-32 + re-rank, D={dim}{data} (x = patch vectors)"] = [(r["vectors"], r["p50_ms"]) for r in rows]
    return out


def main() -> None:
    data = series()
    w, h, m = 900, 420, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [x for s in data.values() for x, _ in s] or [1, 10]
    ys = [y for s in data.values() for _, y in s] or [1, 10]
    x0, x1 = math.log10(min(xs)) - 0.2, math.log10(max(xs)) + 0.2
    y0, y1 = math.log10(min(min(ys), 1.0)) - 0.2, math.log10(max(max(ys), 100.0)) + 0.2

    def px(x: float, y: float) -> tuple[float, float]:
        return (m + (math.log10(x) - x0) / (x1 - x0) * (w - 2 * m),
                h - m - (math.log10(y) - y0) / (y1 - y0) * (h - 2 * m))

    d.rectangle([m, m, w - m, h - m], outline="black")
    for e in range(math.ceil(x0), math.floor(x1) + 1):
        x, _ = px(10 ** e, 10 ** y0)
        d.line([x, h - m, x, h - m + 5], fill="black")
        d.text((x - 12, h - m + 8), f"1e{e}", fill="black")
    for e in range(math.ceil(y0), math.floor(y1) + 1):
        _, y = px(10 ** x0, 10 ** e)
        d.line([m - 5, y, m, y], fill="black")
        d.text((m - 45, y - 6), f"{10 ** e:g} ms", fill="black")
    for target, label in ((5, "P2 target 5 ms"), (10, "P4 target 10 ms")):
        _, y = px(10 ** x0, target)
        d.line([m, y, w - m, y], fill=(200, 200, 200))
        d.text((w - m - 110, y - 14), label, fill=(120, 120, 120))
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for i, (name, pts) in enumerate(data.items()):
        c = colours[i % len(colours)]
        pts = sorted(pts)
        if len(pts) > 1:
            d.line([px(x, y) for x, y in pts], fill=c, width=3)
        for x, y in pts:
            cx, cy = px(x, y)
            d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=c)
        d.text((m + 10, m + 10 + 16 * i), f"— {name}", fill=c)
    d.text((m, 20), "p50 latency vs store size (log-log), 2-core machine", fill="black")
    img.save(OUT)
    print(f"wrote {os.path.abspath(OUT)}")


if __name__ == "__main__":
    main()
