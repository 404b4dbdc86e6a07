"""hoverlay pipeline (``hoverlay.pipeline``): images -> model -> activations -> a store + FAISS indexes.

``build`` (the Dask job), ``options`` (the declarations of ``hoverlay build`` / ``factorize``,
standard library only), ``models`` (spec strings -> torch modules, strict weights), ``indexing``,
``factorize``, ``progress``; every expected failure is a :class:`~hoverlay.pipeline.errors.PipelineError`.
Needs the ``[build]`` extra (torch, Dask).
"""
