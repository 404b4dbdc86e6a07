"""The schema of ``index/<layer>.json``: what an index was built from, how it searches, how good it is.

The json beside each FAISS file is part of the store contract: the build writes it, the
explorer and ``hoverlay info`` read it (is the index stale? which codes? which nprobe? the
recall it was measured at?). It used to be a free-form dict filled from three modules; now it
is :class:`IndexMeta`, read and written only here (:meth:`IndexMeta.from_json` validates every
field, so a damaged or hand-edited file is a :class:`~hoverlay.stores.errors.StoreError`
naming the file and the field, never a KeyError later). Fields are documented in
docs/store-format.md. ``schema_version`` 1 is also what files without the field (written
before the schema existed) hold.

Version 2 added ``choice`` (which codes the build chose, the bytes it counted against the
budget, and why) and ``tuned.ef_search`` (HNSW graphs). Every version-1 field kept its meaning,
so version-1 files are read as they are (the new fields absent); a hoverlay that reads only
version 1 refuses version-2 files with "upgrade hoverlay" instead of failing on an unknown field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import FormatVersionError, StoreError

INDEX_META_VERSION = 2


@dataclass
class RecallRecord:
    """recall@k of index search + exact re-rank against an exact scan, on held-out queries."""

    k: int
    value: float                 # nan when no query could be held out
    queries: int
    exact_index: bool
    p50_ms: float = math.nan     # one query at a time on one thread, at this build
    measured: str = ""


@dataclass
class TuneRecord:
    """What tuning chose, and on which evidence (the probe's mean and its lower bound)."""

    nprobe: int | None
    rerank_factor: int
    recall: float
    lower_bound: float
    target_recall: float
    rule: str = ""
    ef_search: int | None = None  # HNSW graphs: efSearch (version 2)


@dataclass
class RerankRecord:
    """The fp16 re-rank file beside a compressed index (``index/<layer>.f16``)."""

    rows: int
    dtype: str = "float16"
    file: str = ""
    store_created: str = ""  # the store instance the rows were read from (StoreAttrs.created)


@dataclass
class ChoiceRecord:
    """Why the build chose these codes (version 2): the bytes it counted against the budget —
    the index *and* the fp16 re-rank file — and the reason in words."""

    factory: str
    reason: str
    index_bytes: int             # estimated size of the .faiss file (what a loaded index holds)
    rerank_bytes: int            # the re-rank file (0: exact codes, or re-rank reads the store)
    budget: int | None           # --index-memory (or the default share of RAM); None: no limit
    rerank_file: bool = True     # False: the file did not fit, re-rank reads the Zarr store
    ef_construction: int | None = None  # HNSW graphs

    @property
    def total_bytes(self) -> int:
        return self.index_bytes + self.rerank_bytes


@dataclass
class IndexMeta:
    factory: str
    dim: int
    metric: str = "inner_product"
    params: dict[str, Any] = field(default_factory=dict)  # FAISS search parameters (nprobe, …)
    images_indexed: int = 0      # rows 0..images_indexed of the store are in the index
    ntotal: int = 0              # vectors in the .faiss file (a mismatch means stale)
    nlist: int | None = None
    memory_budget: int | None = None
    train_points: int | None = None
    trained_on: str | None = None  # cpu | gpu
    kmeans: str | None = None      # "two-level" past TWO_LEVEL_FROM lists
    rerank_factor: int | None = None  # candidates per wanted hit, when tuning raised it
    built: str = ""
    build_seconds: float | None = None
    build_phases: dict[str, float] = field(default_factory=dict)
    recall: RecallRecord | None = None
    tuned: TuneRecord | None = None
    rerank: RerankRecord | None = None
    choice: ChoiceRecord | None = None
    schema_version: int = INDEX_META_VERSION

    @property
    def rerank_rows(self) -> int:
        return self.rerank.rows if self.rerank is not None else 0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Any, where: str) -> IndexMeta:
        """Validate a parsed ``index/<layer>.json``; ``where`` names the file in errors."""
        if not isinstance(data, dict):
            raise StoreError(f"index metadata {where} is not a JSON object")
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or not 1 <= version <= INDEX_META_VERSION:
            raise FormatVersionError(f"index metadata {where} has schema_version {version!r}; this "
                                     f"hoverlay reads 1..{INDEX_META_VERSION}: upgrade hoverlay")
        return _build(cls, data, where)


_NESTED = {"recall": RecallRecord, "tuned": TuneRecord, "rerank": RerankRecord, "choice": ChoiceRecord}
_NUMBER = (int, float)


def _build(kind: type, data: dict[str, Any], where: str, prefix: str = "") -> Any:
    """``kind(**data)`` with every field's type checked (JSON numbers: int or float)."""
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise StoreError(f"index metadata {where}: unknown field {prefix + unknown[0]!r}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise StoreError(f"index metadata {where}: field {prefix + name!r} is missing")
            continue
        value = data[name]
        nested = _NESTED.get(name) if not prefix else None
        if nested is not None and value is not None:
            if not isinstance(value, dict):
                raise StoreError(f"index metadata {where}: {name!r} is not an object")
            value = _build(nested, value, where, prefix=f"{name}.")
        elif not _type_ok(str(f.type), value):
            raise StoreError(f"index metadata {where}: field {prefix + name!r} = {value!r} is not "
                             f"{f.type}")
        values[name] = value
    return kind(**values)


def _type_ok(annotation: str, value: Any) -> bool:
    if value is None:
        return "None" in annotation
    if isinstance(value, bool):
        return annotation.startswith("bool")
    if annotation.startswith("int"):
        return isinstance(value, int)
    if annotation.startswith("float"):
        return isinstance(value, _NUMBER)
    if annotation.startswith("str"):
        return isinstance(value, str)
    if annotation.startswith("dict"):
        return isinstance(value, dict)
    return True
