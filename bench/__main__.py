"""Run every benchmark: ``python -m bench`` (or ``make bench``)."""

from bench import pipeline

if __name__ == "__main__":
    pipeline.main([])
    try:
        from bench import hover
    except ImportError:
        hover = None
    if hover is not None:
        hover.main([])
