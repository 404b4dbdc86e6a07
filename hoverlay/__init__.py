"""hoverlay: interactive similarity overlays of neural-network activations at dataset scale.

The installed namespace maps the project's three folders to subpackages (see pyproject.toml):

- :mod:`hoverlay.stores` (``stores/``): the on-disk contract, no torch and no Panel;
- :mod:`hoverlay.pipeline` (``pipeline/``): the offline build (torch, Dask);
- :mod:`hoverlay.explorer` (``explorer/``): the Panel app (never torch).

This package itself holds only what sits above or below all three: the command line
(:mod:`hoverlay.cli`, which imports a subcommand's code only when it runs), and two leaf
modules every subpackage may use, :mod:`hoverlay.errors` (exit codes) and
:mod:`hoverlay.options` (typed option declarations). Importing it imports nothing else.
"""

__version__ = "0.2.0"
