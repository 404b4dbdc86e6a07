"""Generated images (hoverlay.pipeline.feature_vis): classified as their target by the default
model, seeded, offline, and stored pixel for pixel."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hoverlay.pipeline.feature_vis import (
    GeneratedImages,
    class_index,
    generate_class_images,
    imagenet_categories,
    save_generated,
)


def test_imagenet_names_offline():
    names = imagenet_categories()
    assert len(names) == 1000 and names[285] == "Egyptian cat" and names[967] == "espresso"
    assert class_index("egyptian cat") == 285
    with pytest.raises(ValueError, match="no ImageNet class"):
        class_index("unicorn")


def test_bad_arguments_are_refused_before_any_work():
    with pytest.raises(ValueError):
        generate_class_images([])
    with pytest.raises(ValueError):
        generate_class_images([285], steps=8, refine=9)
    with pytest.raises(ValueError):
        generate_class_images([285], size=16)
    with pytest.raises(ValueError, match="0..999"):
        generate_class_images([1000])


@pytest.mark.slow
def test_generated_images_are_classified_as_their_class_top5():
    from hoverlay.pipeline.models import load_model

    model = load_model()
    flags = [p.requires_grad for p in model.module.parameters()]
    gen = generate_class_images(["Egyptian cat", "espresso"], model, seed=0)  # ~3 s each on two CPU cores
    assert gen.pixels.shape == (2, 224, 224, 3) and gen.pixels.dtype == np.uint8
    assert gen.classes == (285, 967)
    # the model's own verdict, recomputed here rather than trusted from the result
    logits = model.classify(gen.pixels)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert [c in row for c, row in zip(gen.classes, top5, strict=True)] == [True, True], top5
    assert gen.top5() and all(r < 5 for r in gen.ranks)
    assert [p.requires_grad for p in model.module.parameters()] == flags  # the shared model is left as it was
    # not noise: a generated image has structure at every scale (a 1/f spectrum), and differs per class
    assert float(gen.pixels.std()) > 20 and np.abs(gen.pixels[0].astype(int) - gen.pixels[1]).mean() > 20


def test_saved_images_are_the_stored_pixels(tmp_path):
    from hoverlay.pipeline.preprocess import load_pixels

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    gen = GeneratedImages(pixels, (285, 967), (0, 0), (0.9, 0.8), 1.0)
    paths = save_generated(gen, str(tmp_path / "gen"))
    assert [os.path.basename(p) for p in paths] == ["Egyptian_cat.png", "espresso.png"]
    for path, px in zip(paths, pixels, strict=True):
        with open(path, "rb") as f:
            np.testing.assert_array_equal(load_pixels(f.read(), 224), px)  # lossless, no resize
    with pytest.raises(ValueError):
        save_generated(gen, str(tmp_path / "x"), names=["one"])
