"""The options of ``hoverlay export hits|vectors|fiftyone``: one declaration each
(:class:`hoverlay.options.Option`), so flags, their types and the README's tables cannot drift.

Standard library only (the parsers are built without reading a store). Values that only make
sense against a store (a layer name, an image id past the last one) are checked by the export
itself, still before it writes anything.
"""

from __future__ import annotations

from hoverlay.options import STORAGE_OPTIONS, Integer, Option, OptionSet, Path, Switch, Text

#: exports read and write local files only (the store itself may be a URL)
LOCAL_FILE = Text(described="a local file path")
LOCAL_FOLDER = Text(described="a local folder path")

STORE = Option("store", Path(), "store path or URL", metavar="STORE")

EXPORT_HITS_OPTIONS = OptionSet((
    STORE,
    Option("layer", Text(), "layer to search (`hoverlay info STORE` lists them); a queries file's "
           "layer column overrides it per row", metavar="L"),
    Option("image", Integer(minimum=0), "image id of the query patch (with --y and --x)", metavar="I"),
    Option("y", Integer(minimum=0), "row of the query patch in the layer's map", metavar="Y"),
    Option("x", Integer(minimum=0), "column of the query patch in the layer's map", metavar="X"),
    Option("queries", LOCAL_FILE, "CSV file of queries instead: a header and columns image,y,x "
           "(optionally layer), one query per row", metavar="CSV"),
    Option("k", Integer(), "hits per query", default=32, short="-k", metavar="K"),
    Option("out", LOCAL_FILE, "the hits file: .parquet (needs pyarrow: pip install 'hoverlay[export]') "
           "or .csv", metavar="FILE"),
    STORAGE_OPTIONS,
))

EXPORT_VECTORS_OPTIONS = OptionSet((
    STORE,
    Option("layer", Text(), "layer whose patch vectors are exported", metavar="L"),
    Option("out", LOCAL_FOLDER, "a new (or empty) folder for the shards and manifest.json", metavar="DIR"),
    Option("format", Text(choices=("npy", "parquet")), "npy: embeddings/*.npy + ids/*.npy (autofaiss "
           "embeddings=DIR/embeddings); parquet: *.parquet with an embedding column and the id "
           "columns image, y, x, patch_id (needs pyarrow)", default="npy"),
    Option("shard_size", Integer(), "vectors per shard", default=1_000_000, metavar="N"),
    Option("dtype", Text(choices=("float16", "float32")), "the stored float16 values as they are, or "
           "widened exactly to float32 (default: float16 for npy, float32 for parquet)"),
    STORAGE_OPTIONS,
))

EXPORT_FIFTYONE_OPTIONS = OptionSet((
    STORE,
    Option("name", Text(), "name of the FiftyOne dataset to create", metavar="NAME"),
    Option("hits", LOCAL_FILE, "a hits file of `hoverlay export hits` (.parquet or .csv): its patches "
           "become detections on their images", metavar="FILE"),
    Option("overwrite", Switch(), "replace an existing FiftyOne dataset of that name", default=False),
    STORAGE_OPTIONS,
))

#: subcommand -> (one-line help, its options)
EXPORTS: dict[str, tuple[str, OptionSet]] = {
    "hits": ("the top-k patches of one query, or of each query of a CSV, as Parquet or CSV",
             EXPORT_HITS_OPTIONS),
    "vectors": ("a layer's patch vectors with their ids as .npy or Parquet shards (autofaiss reads "
                "them)", EXPORT_VECTORS_OPTIONS),
    "fiftyone": ("a FiftyOne dataset of the store's source images, labels, metadata and hits "
                 "(needs fiftyone)", EXPORT_FIFTYONE_OPTIONS),
}
