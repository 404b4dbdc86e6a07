"""Demo images: the natural images that ship inside scikit-image, sorted into label folders.

Nothing is downloaded: the files are copied from the installed ``skimage/data`` folder.
"""

from __future__ import annotations

import os
import shutil

DEMO_IMAGES: dict[str, list[str]] = {
    "animals": ["chelsea.png", "horse.png"],
    "people": ["astronaut.png", "camera.png"],
    "objects": ["coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png"],
    "science": ["hubble_deep_field.jpg", "ihc.png", "retina.jpg", "moon.png"],
    "textures": ["grass.png", "gravel.png", "brick.png"],
}


def skimage_data_dir() -> str:
    import skimage.data

    return os.path.dirname(skimage.data.__file__)


def copy_demo_images(dest: str | os.PathLike[str]) -> str:
    """Copy the demo images into ``dest/<label>/<file>`` (idempotent); returns ``dest``."""
    src_dir = skimage_data_dir()
    dest = os.fspath(dest)
    for label, files in DEMO_IMAGES.items():
        os.makedirs(os.path.join(dest, label), exist_ok=True)
        for name in files:
            src = os.path.join(src_dir, name)
            if not os.path.exists(src):
                continue  # an older scikit-image without this file: use the rest
            target = os.path.join(dest, label, name)
            if not os.path.exists(target):
                shutil.copyfile(src, target)
    return dest
