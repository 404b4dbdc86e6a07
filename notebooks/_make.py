"""Writes the five notebooks (one per section of the paper) from the cell sources below.

Run ``python notebooks/_make.py`` after editing; CI executes the notebooks (tests/test_notebooks.py).
Kept as code so that reviews see plain Python, not JSON.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''\
import os, numpy as np
from IPython.display import Image, display
DATA = os.environ.get("HOVERLAY_NB_DATA", os.path.abspath("_data"))
os.makedirs(DATA, exist_ok=True)'''

FIGURE = '''\
from hoverlay.explorer.export import blend_tile
from PIL import Image as PILImage
import io

def show_row(pixels, maps, clim=(0, 1), palette=None, size=160, alpha=0.6):
    """Static figure: images with their similarity maps, side by side (no kernel needed to view)."""
    import colorcet
    palette = palette or list(colorcet.fire)
    tiles = [PILImage.fromarray(blend_tile(p, m, clim, palette, alpha)).resize((size, size))
             for p, m in zip(pixels, maps)]
    row = PILImage.new("RGB", (len(tiles) * (size + 4), size), "white")
    for i, t in enumerate(tiles):
        row.paste(t, (i * (size + 4), 0))
    buf = io.BytesIO(); row.save(buf, "PNG"); display(Image(buf.getvalue()))'''

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_basic_examples": [
        ("md", "# 1. Basic examples\n\nBuild a store from the demo images with the offline default "
               "model (EfficientNet-Lite0), hover a patch, see how similar every other patch is."),
        ("code", SETUP),
        ("code", '''\
from hoverlay.pipeline.build import build
from hoverlay.pipeline.demo import copy_demo_images
from hoverlay.stores import open_store

images = copy_demo_images(os.path.join(DATA, "demo-images"))
store = os.path.join(DATA, "demo.zarr")
summary = build(images, store, quiet=True)
reader = open_store(store)
print(summary.line()); print(reader)'''),
        ("code", FIGURE),
        ("md", "The query: the left eye of the cat (patch y=5, x=4 of the 14x14 layer). One matmul "
               "gives its cosine similarity with every patch of every image on the page."),
        ("code", '''\
from hoverlay.explorer.kernels import page_block, similarity_map, QueryVector
layer = "_blocks.11._swish"
table = reader.table()
cat = int(np.flatnonzero([("chelsea" in s) for s in table["source"]])[0])
page = np.flatnonzero(table.ok)[:6]
q = reader.vectors(layer, cat)[5, 4].astype(np.float32)
block = page_block(reader.vectors(layer, page), reader.norms(layer, page))
maps = similarity_map(QueryVector(q, float(reader.norms(layer, cat)[5, 4])), block)
print({str(table["source"][i]).rsplit("/", 1)[-1]: round(float(m.max()), 3) for i, m in zip(page, maps)})
show_row(reader.pixels(page), maps)'''),
        ("md", "The same query at three layers (coarser layers see larger parts):"),
        ("code", '''\
from hoverlay.explorer.kernels import map_patch
row_maps, row_px = [], []
for l in reader.layers:
    g = reader.geometry(l)
    y, x = (int(v) for v in map_patch(5, 4, (14, 14), (g.height, g.width)))
    v = reader.vectors(l, cat)
    row_maps.append(v.astype(np.float32) @ v[y, x].astype(np.float32))
    row_px.append(reader.pixels(cat))
show_row(row_px, row_maps)'''),
        ("md", "Interactive version (needs a running kernel): hover any tile."),
        ("code", '''\
import panel as pn
pn.extension()
from hoverlay.explorer.app import create_app
create_app(store)'''),
    ],
    "02_class_similarities": [
        ("md", "# 2. Class similarities: natural vs altered images\n\nWe generate altered copies "
               "(colour-inverted, posterised, noise) of natural images, store everything with labels "
               "from folders, and compare how similar each class's patches are to a natural query."),
        ("code", SETUP),
        ("code", '''\
import shutil
from PIL import Image as PILImage, ImageOps
from hoverlay.pipeline.demo import copy_demo_images
from hoverlay.pipeline.build import build
from hoverlay.stores import open_store

src = copy_demo_images(os.path.join(DATA, "demo-images"))
classes = os.path.join(DATA, "classes")
rng = np.random.default_rng(0)
for label in ("natural", "inverted", "posterized", "noise"):
    os.makedirs(os.path.join(classes, label), exist_ok=True)
for name in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"):
    path = next(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs if f == name)
    img = PILImage.open(path).convert("RGB")
    stem = name.split(".")[0]
    img.save(os.path.join(classes, "natural", stem + ".png"))
    ImageOps.invert(img).save(os.path.join(classes, "inverted", stem + ".png"))
    ImageOps.posterize(img, 2).save(os.path.join(classes, "posterized", stem + ".png"))
    noisy = np.clip(np.asarray(img, float) + rng.normal(0, 60, np.asarray(img).shape), 0, 255)
    PILImage.fromarray(noisy.astype(np.uint8)).save(os.path.join(classes, "noise", stem + ".png"))
store = os.path.join(DATA, "classes.zarr")
build(classes, store, quiet=True)
reader = open_store(store)
table = reader.table()
print(sorted(set(table["label"])))'''),
        ("code", FIGURE),
        ("code", '''\
layer = "_blocks.11._swish"
labels = np.asarray(table["label"], dtype=str)
nat = np.flatnonzero(labels == "natural")
cat = int([i for i in nat if "chelsea" in table["source"][i]][0])
q = reader.vectors(layer, cat)[5, 4].astype(np.float32)   # the cat's eye
rows = {}
for label in ("natural", "inverted", "posterized", "noise"):
    ids = np.flatnonzero(labels == label)
    sims = reader.vectors(layer, ids).astype(np.float32) @ q
    rows[label] = float(sims.reshape(len(ids), -1).max(axis=1).mean())
print("mean best-patch cosine to the cat's eye, by class:", {k: round(v, 3) for k, v in rows.items()})
chelseas = [int(i) for i in range(len(labels)) if "chelsea" in table["source"][i]]
show_row(reader.pixels(chelseas), [reader.vectors(layer, i).astype(np.float32) @ q for i in chelseas])'''),
    ],
    "03_geometric_transformations": [
        ("md", "# 3. Geometric transformations\n\n`build(..., rotate=..., scale=...)` stores rotated and "
               "rescaled copies of each image with their transform in the table. For a hovered patch we "
               "follow its corresponding patch in every copy and plot similarity against angle/scale."),
        ("code", SETUP),
        ("code", '''\
from hoverlay.pipeline.build import build
from hoverlay.pipeline.demo import copy_demo_images
from hoverlay.stores import open_store
from hoverlay.stores.transforms import copies_of, sweep_similarity, map_patch

src = copy_demo_images(os.path.join(DATA, "demo-images"))
store = os.path.join(DATA, "sweep.zarr")
build(os.path.join(src, "animals", "chelsea.png"), store, rotate="0:360:30", scale="0.5:1.0:0.1", quiet=True)
reader = open_store(store)
t = reader.table()
print(reader.n_images, "images:", list(zip(t["transform"], t["param"]))[:6], "...")'''),
        ("code", '''\
layer = "_blocks.11._swish"
ids = copies_of(t["base_id"], 0)
rot = [i for i in ids if t["transform"][i] == "rotate"]
sca = [i for i in ids if t["transform"][i] == "scale"]
base = reader.vectors(layer, 0)
patches = {"nose (discriminative)": (10, 8), "eye (discriminative)": (5, 4), "fur (texture)": (2, 2),
           "border (corner)": (0, 13)}
curves = {}
for name, (y, x) in patches.items():
    curves[name] = sweep_similarity(base, [reader.vectors(layer, int(i)) for i in rot],
                                    t["transform"][rot], t["param"][rot], y, x)
angles = t["param"][rot]
for name, c in curves.items():
    print(f"{name:22s} mean over angles: {np.nanmean(c):.3f}   at 90/180/270: "
          f"{[round(float(v), 3) for v, a in zip(c, angles) if a in (90, 180, 270)]}")'''),
        ("md", "The paper's observations, checked as numbers (the verdicts are computed, not written "
               "in advance): (1) discriminative parts lose similarity faster under rotation than "
               "texture; (2) patches at the border suffer from the zero padding at off-axis angles; "
               "(3) large scale changes lower similarity."),
        ("code", '''\
mean = {n: float(np.nanmean(c)) for n, c in curves.items()}
off_axis = np.isin(angles, [30, 60, 120, 150, 210, 240, 300, 330])
border, centre = curves["border (corner)"], curves["eye (discriminative)"]
print("(1) nose vs fur under rotation:", round(mean["nose (discriminative)"], 3), "vs", round(mean["fur (texture)"], 3),
      "->", "reproduced" if mean["nose (discriminative)"] < mean["fur (texture)"] else "NOT reproduced on this image/layer")
print("(2) border patch, off-axis vs right angles:", round(float(np.nanmean(border[off_axis])), 3), "vs",
      round(float(np.nanmean(border[~off_axis])), 3), "(NaN = rotated off the canvas)")
'''),
        ("code", '''\
scales = t["param"][sca]
by_scale = {}
for name, (y, x) in patches.items():
    by_scale[name] = sweep_similarity(base, [reader.vectors(layer, int(i)) for i in sca], t["transform"][sca], scales, y, x)
    print(f"{name:22s} by scale {dict(zip(np.round(scales, 2).tolist(), np.round(by_scale[name], 3).tolist()))}")
eye = by_scale["eye (discriminative)"]
print("(3) eye at zoom x2 vs x1.1:", round(float(eye[0]), 3), "vs", round(float(eye[-1]), 3), "->",
      "reproduced" if eye[0] < eye[-1] else "NOT reproduced")
import holoviews as hv
hv.extension("bokeh")
hv.Overlay([hv.Curve((angles, c), "angle", "cosine", label=n) for n, c in curves.items()]).opts(
    width=600, height=300, legend_position="bottom_left")'''),
    ],
    "04_factorization": [
        ("md", "# 4. Matrix factorisation\n\nNon-negative factorisation of a layer's patch activations "
               "groups patches into k parts; `hoverlay factorize` fits it minibatch by minibatch over "
               "the store's chunks and stores each patch's group."),
        ("code", SETUP),
        ("code", '''\
from hoverlay.pipeline.build import build
from hoverlay.pipeline.demo import copy_demo_images
from hoverlay.pipeline.factorize import factorize
from hoverlay.stores import open_store
from hoverlay.stores.groups import read_groups

images = copy_demo_images(os.path.join(DATA, "demo-images"))
store = os.path.join(DATA, "demo.zarr")
build(images, store, quiet=True)
summary = factorize(store, "_blocks.11._swish", k=6, quiet=True)
print({k: summary[k] for k in ("k", "reconstruction_error", "group_sizes") if k in summary})
reader = open_store(store)
groups, meta = read_groups(reader, "_blocks.11._swish", np.arange(min(6, reader.n_images)))
print(groups.shape, meta["k"], meta["negative"])'''),
        ("code", '''\
from hoverlay.explorer.export import blend_tile
from PIL import Image as PILImage
import io
palette = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33"]
tiles = [PILImage.fromarray(blend_tile(reader.pixels(i), groups[i].astype(float), (0, 6), palette, 0.55)).resize((160, 160))
         for i in range(len(groups))]
row = PILImage.new("RGB", (len(tiles) * 164, 160), "white")
for i, tile in enumerate(tiles): row.paste(tile, (i * 164, 0))
buf = io.BytesIO(); row.save(buf, "PNG"); display(Image(buf.getvalue()))'''),
    ],
    "05_comparing_architectures": [
        ("md", "# 5. Comparing architectures and supervision\n\nTwo stores from the same images: the "
               "ImageNet-trained EfficientNet-Lite0 and an untrained (seeded random) ResNet-18 — the "
               "supervision contrast of the paper, offline. Images are paired by content hash."),
        ("code", SETUP),
        ("code", '''\
from hoverlay.pipeline.build import build
from hoverlay.pipeline.demo import copy_demo_images
from hoverlay.stores import open_store

images = copy_demo_images(os.path.join(DATA, "demo-images"))
a = os.path.join(DATA, "demo.zarr")
b = os.path.join(DATA, "resnet18-untrained.zarr")
build(images, a, quiet=True)
build(images, b, model="torchvision:resnet18", weights="none", layers=["layer3"], quiet=True)
ra, rb = open_store(a), open_store(b)
hb = {h: i for i, h in enumerate(rb.table()["hash"])}
pairs = [(i, hb[h]) for i, h in enumerate(ra.table()["hash"]) if h in hb]
print(len(pairs), "images in both stores")'''),
        ("code", FIGURE),
        ("code", '''\
cat_a = next(i for i, s in enumerate(ra.table()["source"]) if "chelsea" in s)
cat_b = hb[ra.table()["hash"][cat_a]]
ids_a = [p[0] for p in pairs[:5]]; ids_b = [p[1] for p in pairs[:5]]
qa = ra.vectors("_blocks.11._swish", cat_a)[5, 4].astype(np.float32)
qb = rb.vectors("layer3", cat_b)[5, 4].astype(np.float32)
ma = [ra.vectors("_blocks.11._swish", i).astype(np.float32) @ qa for i in ids_a]
mb = [rb.vectors("layer3", i).astype(np.float32) @ qb for i in ids_b]
print("trained:   mean cosine to the eye", round(float(np.mean([m.mean() for m in ma])), 3))
print("untrained: mean cosine to the eye", round(float(np.mean([m.mean() for m in mb])), 3))
show_row(ra.pixels(ids_a), ma)
show_row(rb.pixels(ids_b), mb)'''),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                                 for kind, src in cells])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, os.path.join(HERE, f"{name}.ipynb"))


if __name__ == "__main__":
    main()
