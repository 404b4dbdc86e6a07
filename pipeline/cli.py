"""The ``hoverlay`` command: thin argparse wrappers over Python functions.

Exit codes (documented in README): 0 success (images that failed to decode are reported in
the summary and the table, not fatal); 1 unexpected error; 2 bad usage or config; 3 store
locked by another build; 4 bad model, layer, source or store (mismatch, not a store, newer
format).

``serve`` imports the explorer lazily, so the explorer (which never imports torch) keeps
its own dependency direction; this module is only the console entry point.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from stores.errors import (
    FormatVersionError,
    NotAStoreError,
    OutOfRangeError,
    StoreLockedError,
    StoreMismatchError,
    UnknownLayerError,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED, EXIT_INPUT = 0, 1, 2, 3, 4


def _int_or_none(text: str | None) -> int | None:
    return None if text is None else int(text)


def _bytes(text: str) -> int:
    """'8G', '512M', '1000000' -> bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    t = text.strip().lower().rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    # defaults are None so that config-file values are only overridden by flags actually given
    p.add_argument("--images", help="folder, glob, list file (.txt) or fsspec URL of images")
    p.add_argument("--store", help="store path or fsspec URL (created if missing)")
    p.add_argument("--model", help="model spec (default efficientnet-lite0)")
    p.add_argument("--weights", help="DEFAULT, none or a state-dict path (torchvision models)")
    p.add_argument("--layers", help="comma-separated layer names (see `hoverlay layers MODEL`)")
    p.add_argument("--size", type=int, help="input size in px (default: the model's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--chunk", type=int, help="images per partition / Zarr shard (new stores)")
    p.add_argument("--scheduler", help="threads (default), sync, processes or tcp://host:8786")
    p.add_argument("--workers", type=int, help="parallel tasks (threads or local processes)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--index-memory", type=_bytes, help="memory budget for each index, e.g. 8G (default: 40%% of RAM); the most exact "
                        "codes that fit: float32, fp16, SQ8, SQ4, then OPQ+PQ, re-ranked exactly")
    p.add_argument("--no-index", dest="index", action="store_const", const=False,
                   help="skip building/extending FAISS indexes")
    p.add_argument("--rebuild-index", action="store_const", const=True,
                   help="retrain indexes from scratch instead of extending them")
    p.add_argument("--rotate", help="also store rotated copies, degrees start:stop:step (e.g. 0:360:15)")
    p.add_argument("--scale", help="also store centre-crop-rescaled copies, start:stop:step (e.g. 0.5:1.0:0.1)")
    p.add_argument("--quiet", "-q", action="store_const", const=True, help="no progress (cron)")
    p.add_argument("--config", help="TOML file with any of these options as keys")


def cmd_build(args: argparse.Namespace) -> int:
    from pipeline.build import build
    from pipeline.config import load_config, merge

    config = load_config(args.config) if args.config else {}
    flags = {k: getattr(args, k) for k in ("images", "store", "model", "weights", "layers", "size",
                                           "batch_size", "chunk", "scheduler", "workers", "device",
                                           "index_memory", "index", "rebuild_index", "quiet", "rotate",
                                           "scale")}
    options = merge(config, flags)
    missing = [k for k in ("images", "store") if not options.get(k)]
    if missing:
        print(f"hoverlay build: missing {' and '.join('--' + m for m in missing)} "
              f"(flag or config key)", file=sys.stderr)
        return EXIT_USAGE
    summary = build(**options)
    return EXIT_OK if summary is not None else EXIT_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.build import build
    from pipeline.demo import copy_demo_images
    from stores import open_store
    from stores.info import describe

    images = copy_demo_images(args.images)
    build(images, args.store, quiet=args.quiet)
    print(describe(open_store(args.store)))
    if args.no_serve:
        return EXIT_OK
    try:
        from explorer.serve import serve
    except ImportError:
        print("explorer not available; store built", file=sys.stderr)
        return EXIT_OK
    serve([args.store], port=args.port, address=args.address, show=False)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from stores import open_store
    from stores.info import describe

    for store in args.store:
        print(describe(open_store(store)))
    return EXIT_OK


def cmd_layers(args: argparse.Namespace) -> int:
    from pipeline.models import load_model

    adapter = load_model(args.model, args.weights)
    print(f"# {adapter.spec}: input {adapter.image_size}px; default layers: "
          f"{', '.join(adapter.default_layers)}")
    for name, shape in adapter.layer_shapes():
        if shape is None or (args.spatial and len(shape) != 3):
            continue
        dims = "x".join(map(str, shape))
        if len(shape) == 3:
            dims = f"D={shape[0]} H={shape[1]} W={shape[2]}"
        print(f"{name:<48} {dims}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from explorer.serve import main_serve

    return int(main_serve(args) or EXIT_OK)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hoverlay", description="Interactive similarity overlays at dataset scale")
    p.add_argument("--verbose", "-v", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="add images to a store and update its indexes")
    add_build_arguments(b)
    b.set_defaults(func=cmd_build)

    d = sub.add_parser("demo", help="build the demo store from scikit-image's images and serve it")
    d.add_argument("--store", default="demo-store")
    d.add_argument("--images", default="demo-images")
    d.add_argument("--no-serve", action="store_true", help="build and print info only")
    d.add_argument("--port", type=int, default=5006)
    d.add_argument("--address", default="127.0.0.1")
    d.add_argument("--quiet", "-q", action="store_true")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="describe a store: model, layers, geometry, images, indexes")
    i.add_argument("store", nargs="+")
    i.set_defaults(func=cmd_info)

    la = sub.add_parser("layers", help="list a model's layers with output shapes")
    la.add_argument("model", nargs="?", default="efficientnet-lite0")
    la.add_argument("--weights")
    la.add_argument("--spatial", action="store_true", help="only (D, H, W) outputs")
    la.set_defaults(func=cmd_layers)

    from pipeline.factorize import add_factorize_arguments, cmd_factorize

    f = sub.add_parser("factorize", help="NMF groups of a layer's patch activations, stored in the store")
    add_factorize_arguments(f)
    f.set_defaults(func=cmd_factorize)

    try:
        from explorer.serve import add_serve_arguments
    except ImportError:
        add_serve_arguments = None
    s = sub.add_parser("serve", help="serve the explorer for one or more stores")
    if add_serve_arguments is not None:
        add_serve_arguments(s)
    else:
        s.add_argument("store", nargs="+")
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.models import ModelSpecError
    from pipeline.sources import SourceError

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except StoreLockedError as exc:
        print(f"hoverlay: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except ConfigError as exc:
        print(f"hoverlay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelSpecError, UnknownLayerError, StoreMismatchError, NotAStoreError, FormatVersionError,
            OutOfRangeError, SourceError) as exc:
        print(f"hoverlay: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("hoverlay: interrupted; the last commit is intact, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
