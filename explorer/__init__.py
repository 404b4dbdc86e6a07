"""hoverlay explorer: similarity overlays that follow the pointer, served with Panel.

``explorer.kernels`` (numpy only) and ``explorer.engine`` (numpy + stores) import no UI
library; ``explorer.app`` builds the Panel app (``create_app``) and ``explorer.serve`` serves it.
Nothing here imports torch.
"""
