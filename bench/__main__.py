"""Run the benchmarks: ``python -m bench [NAME ...] [--full]`` (``make bench`` runs them all).

Each writes ``bench/results/<name>*.json`` and prints its table. The default sizes fit a
2-core machine in about half an hour; ``--full`` adds the large cases quoted in
docs/performance.md (100k-image hover store, 10M patch vectors at D=112 and D=512), which
need ~40 GB of disk and an hour or more here. ``--workdir`` keeps the synthetic stores so a
rerun skips making them.
"""

from __future__ import annotations

import argparse
import os

NAMES = ("pipeline", "hover", "intrinsic", "index", "serving", "query")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)} (default: all)")
    p.add_argument("--full", action="store_true", help="also the large cases (hours, tens of GB)")
    p.add_argument("--workdir", default=None, help="folder for synthetic stores (kept between runs)")
    a = p.parse_args(argv)
    names = a.names or list(NAMES)
    unknown = set(names) - set(NAMES)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(NAMES)}")
    work = a.workdir
    if work:
        os.makedirs(work, exist_ok=True)

    def where(sub: str) -> list[str]:
        return ["--workdir", os.path.join(work, sub)] if work else []

    if "pipeline" in names:
        from bench import pipeline

        pipeline.main(where("pipeline"))
    if "hover" in names:
        from bench import hover

        hover.main(["--sizes", "1000,10000,100000" if a.full else "1000,10000",
                    *(["--stores", os.path.join(work, "hover")] if work else [])])
    if "intrinsic" in names:
        from bench import intrinsic

        intrinsic.main([])
    if "index" in names:
        from bench import index

        index.main(["--sizes", "100000,1000000,10000000@2G" if a.full else "100000,1000000", "--dim", "112",
                    *where("index")])
        index.main(["--sizes", "100000,1000000,10000000@6G" if a.full else "100000", "--dim", "512",
                    *where("index")])
    if "serving" in names:
        from bench import serving

        serving.main([])
    if "query" in names:
        from bench import query

        query.main(where("query"))


if __name__ == "__main__":
    main()
