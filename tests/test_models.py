"""Model adapters on real weights (the shipped default) and torchvision with weights=None."""

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from hoverlay.pipeline.models import ModelSpecError, load_model
from hoverlay.pipeline.preprocess import resize_center_crop
from hoverlay.stores import UnknownLayerError


@pytest.fixture(scope="module")
def default_model():
    return load_model()


def chelsea_pixels(size=224):
    return resize_center_crop(Image.fromarray(skimage.data.chelsea()), size)[None]


def test_default_model_classifies_chelsea_as_a_cat(default_model):
    logits = default_model.classify(chelsea_pixels())
    assert 281 <= int(logits.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_layer_listing_has_spatial_layers(default_model):
    shapes = dict(default_model.layer_shapes())
    spatial = {n: s for n, s in shapes.items() if s is not None and len(s) == 3 and s[1] > 1}
    assert len(spatial) >= 3
    for layer in default_model.default_layers:
        assert layer in spatial
    geo = default_model.layer_geometry(default_model.default_layers)
    assert [(g.height, g.width) for g in geo.values()] == [(28, 28), (14, 14), (7, 7)]
    assert geo["_blocks.10.add"].dim == 112


def test_stored_similarity_matches_float64_cosine_of_hooked_activations(default_model, demo_store):
    """The whole path (preprocess -> extract -> normalise -> fp16 Zarr) against an independent hook."""
    from hoverlay.stores import open_store

    reader = open_store(demo_store)
    table = reader.table()
    i = int(np.flatnonzero(np.char.find(table["source"].astype(str), "chelsea") >= 0)[0])
    captured = {}
    module = dict(default_model.module.named_modules())["_blocks.10"]  # its output is node _blocks.10.add
    handle = module.register_forward_hook(lambda m, inp, out: captured.setdefault("a", out.detach()))
    try:
        default_model.classify(reader.pixels([i]))
    finally:
        handle.remove()
    acts = captured["a"][0].double().permute(1, 2, 0).reshape(-1, 112).numpy()
    unit = acts / np.linalg.norm(acts, axis=1, keepdims=True)
    ref = unit @ unit.T  # float64 cosine between every pair of patches of the image
    stored = reader.vectors("_blocks.10.add", i).reshape(-1, 112).astype(np.float32)
    ours = stored @ stored.T
    assert np.abs(ours - ref).max() < 1e-3
    norms = reader.norms("_blocks.10.add", i).ravel()
    np.testing.assert_allclose(norms, np.linalg.norm(acts, axis=1), rtol=1e-4)


def test_torchvision_googlenet_without_weights():
    m = load_model("torchvision:googlenet", weights="none")
    geo = m.layer_geometry(m.default_layers)
    assert [(g.height, g.dim) for g in geo.values()] == [(28, 480), (14, 528), (7, 1024)]
    acts = m.extract(np.zeros((2, 224, 224, 3), np.uint8), ["inception4d"])
    assert acts["inception4d"].shape == (2, 14, 14, 528) and acts["inception4d"].dtype == np.float32


class _TwoMaps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = torch.relu(self.a(x))
        return {"early": a, "late": self.b(a)}


def test_torchscript_model_returns_named_maps(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.script(_TwoMaps()).save(str(path))
    m = load_model(f"torchscript:{path}")
    assert m.layer_names() == ["early", "late"] and m.default_layers == ["early", "late"]
    assert m.layer_geometry(["late"])["late"].as_dict() == {"height": 56, "width": 56, "dim": 6}


def test_bad_specs_and_layers_name_the_value():
    with pytest.raises(ModelSpecError, match="'resnet9000'"):
        load_model("torchvision:resnet9000", weights="none")
    with pytest.raises(ModelSpecError, match="'keras:foo'"):
        load_model("keras:foo")
    with pytest.raises(UnknownLayerError, match="'no_such_layer'"):
        load_model().check_layers(["no_such_layer"])
    with pytest.raises(ModelSpecError, match="'cuda:7'|'tpu'"):
        load_model(device="tpu")


def test_device_selection_on_a_cpu_machine():
    from hoverlay.pipeline.models import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelSpecError, match="'cuda'"):
            resolve_device("cuda")
        with pytest.raises(ModelSpecError, match="'cuda'"):
            load_model(device="cuda")
    m = load_model(device="auto")
    acts = m.extract(np.zeros((1, 224, 224, 3), np.uint8), m.default_layers[:1])
    assert next(m.module.parameters()).device.type == expected
    assert acts[m.default_layers[0]].dtype == np.float32  # stores get float32 whatever the device
