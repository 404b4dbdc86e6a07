"""The options of ``hoverlay build`` / :func:`~hoverlay.pipeline.build.build` / a build config
file, and of ``hoverlay factorize`` / :func:`~hoverlay.pipeline.factorize.factorize`: one
declaration each (:class:`hoverlay.options.Option`).

Standard library only, so the command line can build its parsers without loading torch.
Values that only make sense against a model or a store (a layer name, a device present on this
machine) are checked by the build itself, still before it writes anything.
"""

from __future__ import annotations

from typing import Any

from hoverlay.options import (
    STORAGE_OPTIONS,
    ByteSize,
    Integer,
    Kind,
    Number,
    Option,
    OptionSet,
    Path,
    Switch,
    Text,
    TextList,
    _Invalid,
)

DEFAULT_MODEL = "efficientnet-lite0"
#: Refuse images with more pixels than this (Pillow's default bomb limit is ~89 Mpx).
MAX_PIXELS = 64_000_000

SCHEDULER = Text(choices=("threads", "sync", "processes"), pattern=r"(tcp|tls|ucx|inproc)://\S+|[\w.-]+:\d+",
                 described="threads, sync, processes or a scheduler address like tcp://host:8786")
DEVICE = Text(choices=("cpu", "cuda", "auto", "mps"), pattern=r"cuda:\d+",
              described="cpu, cuda, cuda:N, mps or auto")
SWEEP = Text(pattern=r"-?[0-9.]+:-?[0-9.]+:[0-9.]*[1-9][0-9.]*",
             described="start:stop:step with a positive step, e.g. 0:360:15")
MODEL = Text(pattern=r"efficientnet-lite0|(torchvision|timm|torchscript|python):\S+",
             described="efficientnet-lite0, torchvision:<name>, timm:<name>, torchscript:<path> or "
                       "python:<module>:<factory>")

#: ``stores.pixels.PIXEL_CODECS`` (repeated here: this module imports no Zarr; a test keeps them equal)
PIXEL_CODECS = ("jpeg", "webp", "avif", "zstd")


class Quality(Kind):
    """A pixel quality: an integer 1..100 (flag text or a number) or ``lossless``."""

    expected = "an integer 1..100 or 'lossless'"

    def from_text(self, text: str) -> int | str:
        text = text.strip().lower()
        return self.from_value(int(text) if text.isdigit() else text)

    def from_value(self, value: Any) -> int | str:
        if isinstance(value, str) and value.strip().lower() == "lossless":
            return "lossless"
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
            raise _Invalid
        return value


BUILD_OPTIONS = OptionSet((
    Option("images", Path(many=True), "folder (recursive; the parent folder name becomes the label), "
           "glob, .txt list file, or fsspec URL", metavar="SRC"),
    Option("store", Path(), "local path, file:// or fsspec URL (s3://…); created on first run",
           metavar="DST"),
    Option("model", MODEL, "the model: efficientnet-lite0 for a new store (offline, shipped weights), "
           "an existing store's own when not given (torchvision:googlenet is the paper's)",
           metavar="SPEC"),
    Option("weights", Text(), "torchvision weights: DEFAULT (downloads, or your torch cache), none "
           "(seeded random init) or a state-dict path (loaded strictly); the store's when not given",
           metavar="W"),
    Option("layers", TextList(), "comma-separated layer names (`hoverlay layers MODEL`); default: the "
           "model's three, or an existing store's", metavar="L1,L2"),
    Option("metadata", Path(), "CSV or Parquet file of your own columns, one row per image, keyed by "
           "'path' (relative to the source folder) or 'file' (file name); a 'label' column replaces "
           "the folder label (new stores; an existing store's columns must match)", metavar="FILE"),
    Option("size", Integer(), "model input size in px (default: the model's, or the store's)",
           metavar="S"),
    Option("batch_size", Integer(), "images per forward pass", default=16, metavar="B"),
    Option("chunk", Integer(), "images per partition and Zarr shard (new stores)", default=16,
           metavar="C"),
    Option("pixel_codec", Text(choices=PIXEL_CODECS), "how a new store keeps its pixels: jpeg "
           "(default), webp or avif (image codecs; zarr-python readers need hoverlay or imagecodecs-zarr), "
           "or zstd (lossless raw bytes, any Zarr v3 reader); an existing store keeps its own",
           metavar="CODEC"),
    Option("pixel_quality", Quality(), "quality 1..100 of jpeg, webp or avif pixels (default 90), or "
           "lossless (exact pixels, ~5x the bytes)", metavar="Q"),
    Option("scheduler", SCHEDULER, "threads, sync, processes (a local Dask cluster with a dashboard) "
           "or a scheduler address tcp://host:8786", default="threads"),
    Option("workers", Integer(), "parallel tasks (threads or local processes; default min(4, CPUs))",
           metavar="N"),
    Option("device", DEVICE, "cpu, cuda, cuda:N, mps or auto", default="cpu"),
    Option("index", Switch(), "build or extend the FAISS indexes", default=True,
           negative_flag="--no-index", negative_help="skip building and extending the FAISS indexes"),
    Option("index_memory", ByteSize(), "memory budget per FAISS index, e.g. 8G (default 40% of RAM): "
           "the most exact codes that fit; a budget below a layer's smallest index is refused before "
           "anything is written", metavar="BYTES"),
    Option("rebuild_index", Switch(), "retrain the indexes from scratch instead of extending them",
           default=False),
    Option("recall_k", Integer(), "k of the recall measured after each index build", default=10,
           metavar="K"),
    Option("max_pixels", Integer(), "refuse images with more pixels (decompression bombs)",
           default=MAX_PIXELS, metavar="PX"),
    Option("rotate", SWEEP, "also store rotated copies, degrees start:stop:step (e.g. 0:360:15)",
           metavar="A:B:S"),
    Option("scale", SWEEP, "also store centre-crop-rescaled copies, start:stop:step "
           "(e.g. 0.5:1.0:0.1)", metavar="A:B:S"),
    STORAGE_OPTIONS,
    Option("quiet", Switch(), "no progress bars (cron); the summary line is still printed",
           default=False, short="-q"),
    Option("progress_interval", Integer(minimum=0), "seconds between progress lines when not on a "
           "terminal (0: a line per update)",
           default=10, metavar="SECONDS"),
    Option("stop_after_waves", Integer(minimum=0), "stop after this many committed waves (tests: a "
           "build killed mid-way)", cli=False),
))

FACTORIZE_OPTIONS = OptionSet((
    Option("store", Path(), "store path or fsspec URL"),
    Option("layer", Text(), "layer name, as in `hoverlay info`"),
    Option("k", Integer(), "number of groups (NMF components)", default=6),
    Option("images", Text(), "which images: all (default), label=animals[,people][&transform=none], "
           "or ids like 0-99,120; failed images are always left out (group -1)"),
    Option("negative", Text(choices=("clip", "shift", "error")), "negative activations (layers "
           "without ReLU): clip = NMF of ReLU(a), the dropped mass fraction is reported; shift = add "
           "a per-channel offset so the minimum is 0; error = refuse", default="clip"),
    Option("batch_images", Integer(), "images per minibatch: memory is about this many images' "
           "activations", default=64),
    Option("epochs", Integer(), "at most this many fitting passes (stops early when components "
           "settle)", default=3),
    Option("tol", Number(), "stop fitting once the components move less than this (relative) "
           "over a pass", default=1e-3),
    Option("seed", Integer(minimum=None), "random seed", default=0),
    STORAGE_OPTIONS,
    Option("quiet", Switch(), "no progress bars (cron)", default=False, short="-q"),
))

#: ``hoverlay query IMAGE`` / :func:`~hoverlay.pipeline.query.query_image` (IMAGE is positional).
QUERY_OPTIONS = OptionSet((
    Option("store", Path(), "store path or fsspec URL to search", metavar="STORE"),
    Option("layer", Text(), "layer to query (default: the store's last, deepest)", metavar="L"),
    Option("y", Integer(minimum=0), "query patch row in the layer's grid (with --x; default: the "
           "centre cell)", metavar="Y"),
    Option("x", Integer(minimum=0), "query patch column in the layer's grid (with --y)", metavar="X"),
    Option("box", Text(pattern=r"\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*", described="x0,y0,x1,y1 "
           "(four integers)"), "query with the mean vector of a region, x0,y0,x1,y1 in the image "
           "file's pixels (re-normalised)", metavar="X0,Y0,X1,Y1"),
    Option("k", Integer(), "hits to return", default=32, short="-k"),
    Option("out", Path(), "also write the hits to a .parquet or .csv file", metavar="FILE"),
    Option("device", DEVICE, "cpu, cuda, cuda:N, mps or auto", default="cpu"),
    Option("max_bytes", ByteSize(), "refuse larger image files", default=32 * 2**20, metavar="BYTES"),
    Option("max_pixels", Integer(), "refuse images with more pixels (decompression bombs)",
           default=MAX_PIXELS, metavar="PX"),
    STORAGE_OPTIONS,
))
