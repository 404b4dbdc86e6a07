"""Model adapters on real weights (the shipped default) and torchvision with weights=None."""

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from hoverlay.pipeline.models import ModelSpecError, list_layers, load_model
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


def test_default_layers_are_non_negative_feature_maps_at_three_resolutions(default_model):
    infos = {i.name: i for i in default_model.survey()}
    assert default_model.default_layers == ["_blocks.5._swish", "_blocks.11._swish", "_swish_1"]
    geo = default_model.layer_geometry(default_model.default_layers)
    assert [(g.height, g.width) for g in geo.values()] == [(28, 28), (14, 14), (7, 7)]
    assert all(infos[n].non_negative for n in default_model.default_layers)
    # the old hand-kept defaults are residual adds and a batch norm: signed
    assert not infos["_blocks.10.add"].non_negative and not infos["_blocks.15._bn2"].non_negative
    acts = default_model.extract(chelsea_pixels(), default_model.default_layers)
    assert all(float(a.min()) >= 0 for a in acts.values())


def test_stored_similarity_matches_float64_cosine_of_hooked_activations(default_model, demo_store):
    """The whole path (preprocess -> extract -> normalise -> fp16 Zarr) against an independent hook."""
    from hoverlay.stores import open_store

    reader = open_store(demo_store)
    table = reader.table()
    i = int(np.flatnonzero(np.char.find(table["source"].astype(str), "chelsea") >= 0)[0])
    layer = "_blocks.11._swish"  # node _blocks.11._swish is the first call of that ReLU6 module
    captured = {}
    module = dict(default_model.module.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, inp, out: captured.setdefault("a", out.detach().clone()))
    try:
        default_model.classify(reader.pixels([i]))
    finally:
        handle.remove()
    d = reader.geometry(layer).dim
    acts = captured["a"][0].double().permute(1, 2, 0).reshape(-1, d).numpy()
    unit = acts / np.maximum(np.linalg.norm(acts, axis=1, keepdims=True), 1e-12)
    ref = unit @ unit.T  # float64 cosine between every pair of patches of the image
    stored = reader.vectors(layer, i).reshape(-1, d).astype(np.float32)
    ours = stored @ stored.T
    assert np.abs(ours - ref).max() < 1e-3
    norms = reader.norms(layer, i).ravel()
    np.testing.assert_allclose(norms, np.linalg.norm(acts, axis=1), rtol=1e-4)


def test_torchvision_googlenet_without_weights():
    m = load_model("torchvision:googlenet", weights="none")
    assert m.default_layers == ["inception3b", "inception4e", "inception5b"]
    geo = m.layer_geometry(m.default_layers)
    assert [(g.height, g.dim) for g in geo.values()] == [(28, 480), (14, 832), (7, 1024)]
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


# ------------------------------------------------------------------ defaults of every model kind
@pytest.mark.parametrize("spec, sides", [
    ("torchvision:resnet18", [28, 14, 7]),
    ("torchvision:googlenet", [28, 14, 7]),
    ("timm:resnet10t", [22, 11, 6]),  # timm's data config: 176 px
])
def test_cnn_defaults_are_non_negative_at_the_three_coarsest_resolutions(spec, sides):
    m = load_model(spec, weights="none")
    geo = m.layer_geometry(m.default_layers)
    assert [g.height for g in geo.values()] == sides
    assert all(m.layer_info(layer).non_negative for layer in m.default_layers)
    acts = m.extract(chelsea_pixels(m.image_size), m.default_layers)
    assert all(float(a.min()) >= 0 for a in acts.values())  # the survey's sign holds on a photo


@pytest.mark.parametrize("spec, blocks", [
    ("torchvision:vit_b_16", [f"encoder.layers.encoder_layer_{i}" for i in (3, 7, 11)]),
    ("timm:vit_tiny_patch16_224", [f"blocks.{i}" for i in (3, 7, 11)]),
])
def test_token_models_default_to_encoder_blocks_at_three_depths(spec, blocks):
    m = load_model(spec, weights="none")
    assert m.default_layers == blocks
    geo = m.layer_geometry(m.default_layers)
    assert {(g.height, g.width) for g in geo.values()} == {(14, 14)}
    # no feature map of a ViT is non-negative (GELU, LayerNorm, residual adds): signed defaults
    # are the only choice, and the listing says which layers are token grids
    assert not any(i.non_negative for i in m.survey() if i.feature_map)
    listing = "\n".join(list_layers(spec))
    assert "tokens (1 dropped)" in listing
    assert f"* {blocks[0]}" in listing or f"({blocks[0]})" in listing
    assert "conv_proj" not in m.default_layers and "x" not in m.default_layers


@pytest.mark.parametrize("spec, block", [
    ("timm:vit_tiny_patch16_224", "blocks.7"),
    ("torchvision:vit_b_16", "encoder.layers.encoder_layer_7"),
])
def test_token_grid_vectors_equal_a_forward_hook_without_the_class_token(spec, block):
    m = load_model(spec, weights="none")
    pixels = chelsea_pixels(m.image_size)
    captured = {}
    module = dict(m.module.named_modules())[block]
    handle = module.register_forward_hook(lambda mod, inp, out: captured.setdefault("t", out.detach().clone()))
    try:
        m.classify(pixels)
    finally:
        handle.remove()
    tokens = captured["t"]
    assert tokens.shape[1] == 197  # 1 class token + 14 x 14 patches
    expected = tokens[:, 1:].reshape(1, 14, 14, -1).numpy()
    got = m.extract(pixels, [block])[block]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_timm_model_uses_its_own_data_config():
    import timm

    m = load_model("timm:vit_tiny_patch16_224", weights="none")
    cfg = timm.data.resolve_data_config({}, model=m.module)
    assert m.image_size == cfg["input_size"][1] == 224
    assert m.preprocessing()["normalization"] == {"kind": "mean-std", "mean": list(cfg["mean"]),
                                                  "std": list(cfg["std"])}
    r = load_model("timm:resnet10t", weights="none")
    assert r.image_size == 176
    again = load_model("timm:resnet10t", weights="none")
    assert again is r  # cached, and seeded: a second process builds the same network


def test_timm_state_dict_file_loads_strictly(tmp_path):
    import timm
    from safetensors.torch import save_file

    from hoverlay.pipeline.models import WeightsError

    net = timm.create_model("resnet10t", pretrained=False)
    with torch.no_grad():
        net.fc.bias.fill_(0.25)
    path = tmp_path / "r10.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    m = load_model("timm:resnet10t", weights=str(path))
    assert float(m.module.fc.bias[0]) == 0.25 and m.describe()["weights"] == str(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable state dict"):
        load_model("timm:resnet10t", weights=str(bad))
    with pytest.raises(ModelSpecError, match="'resnet10x'"):
        load_model("timm:resnet10x", weights="none")


@pytest.mark.parametrize("env, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "refused"),  # nothing listens on the discard port
])
def test_timm_pretrained_weights_offline_is_one_line_at_once(tmp_path, env, reason):
    import os
    import subprocess
    import sys
    import time

    full = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hoverlay", "layers", "timm:resnet10t", "--weights", "DEFAULT"],
                          capture_output=True, text=True, env=full, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "timm:resnet10t" in err[0] and str(tmp_path / "hf") in err[0], proc.stderr
    assert reason in err[0] and "--weights none" in err[0]
    assert time.perf_counter() - t0 < 60  # not a minute of retries


def test_a_timm_vit_builds_a_store_of_token_grids(generated_images, tmp_path):
    from hoverlay.pipeline.build import build
    from hoverlay.stores import open_store

    images = generated_images(3)
    store = str(tmp_path / "vit.zarr")
    build(images, store, model="timm:vit_tiny_patch16_224", weights="none", quiet=True, index=False,
          pixel_codec="zstd")  # lossless: the test re-runs the model on the stored pixels
    reader = open_store(store)
    assert reader.layers == ["blocks.3", "blocks.7", "blocks.11"]
    assert {(g.height, g.width, g.dim) for g in map(reader.geometry, reader.layers)} == {(14, 14, 192)}
    assert reader.attrs.preprocessing["normalization"]["kind"] == "mean-std"
    m = load_model("timm:vit_tiny_patch16_224", weights="none")
    acts = m.extract(reader.pixels([0]), ["blocks.7"])["blocks.7"][0]
    stored = reader.vectors("blocks.7", 0).astype(np.float32) * reader.norms("blocks.7", 0)[..., None]
    np.testing.assert_allclose(stored, acts, rtol=2e-3, atol=2e-3 * float(np.abs(acts).max()))
