"""hoverlay stores: the on-disk contract between the pipeline and the explorer.

No torch and no Panel here: everything is Zarr v3, numpy and FAISS. See
``docs/store-format.md`` for the layout this package reads and writes.

This module and the public submodules (``reader``, ``writer``, ``index``, ``search``, ``urls``,
``groups``, ``info``, …) are the contract; modules whose names start with ``_`` are private to
the package, and nothing outside it imports them (tests/test_dependencies.py checks).
"""

from .errors import (
    BadURLError,
    CorruptStoreError,
    FormatVersionError,
    IndexBudgetError,
    NotAStoreError,
    OutOfRangeError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    UnknownLayerError,
)
from .format import FORMAT_VERSION, STATUS_FAILED, STATUS_OK, StoreAttrs
from .geometry import LayerGeometry, patch_coords, patch_id
from .index import PatchIndex, choose_factory, search_reranked
from .index_meta import IndexMeta
from .reader import StoreReader, open_store
from .table import ImageTable
from .urls import filesystem, is_local, normalize_url
from .vectors import normalize_patches
from .writer import StoreWriter, create_store

__all__ = [
    "BadURLError", "CorruptStoreError", "IndexBudgetError", "IndexMeta", "filesystem", "is_local", "normalize_url",
    "FORMAT_VERSION", "STATUS_FAILED", "STATUS_OK", "FormatVersionError", "ImageTable",
    "LayerGeometry", "NotAStoreError", "OutOfRangeError", "PatchIndex", "StoreAttrs",
    "StoreError", "StoreLockedError", "StoreMismatchError", "StoreReader", "StoreWriter",
    "UnknownLayerError", "choose_factory", "create_store", "normalize_patches", "open_store",
    "patch_coords", "patch_id", "search_reranked",
]
