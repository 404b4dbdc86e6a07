"""hoverlay explorer (``hoverlay.explorer``): similarity overlays that follow the pointer, with Panel.

``kernels`` (numpy only) and ``engine`` (numpy + stores) import no UI library; ``app`` builds
the Panel app (``create_app``), ``serve`` serves it and ``options`` declares the ``hoverlay
serve`` flags without Panel. Nothing here imports torch.
"""
