"""The pipeline's expected failures: one base class, each subclass with its exit code.

Every class here derives from :class:`PipelineError` (itself a
:class:`hoverlay.errors.HoverlayError`), so the command line turns any of them into one line
and the exit code of :data:`hoverlay.errors.EXIT_CODES` that the class names.
"""

from __future__ import annotations

from hoverlay.errors import EXIT_INPUT, EXIT_USAGE, HoverlayError


class PipelineError(HoverlayError):
    """Base class of the pipeline's expected failures."""

    exit_code = EXIT_INPUT


class ModelSpecError(PipelineError, ValueError):
    """A model spec, device or layer choice that cannot be resolved."""


class WeightsError(ModelSpecError):
    """Weights that cannot be loaded: not downloaded (offline), missing file, mismatched keys."""


class SourceError(PipelineError, ValueError):
    """An image source that names nothing usable (missing, or holding no images)."""


class BuildUsageError(PipelineError, ValueError):
    """A combination of build arguments that cannot work (the user has to change the call)."""

    exit_code = EXIT_USAGE
