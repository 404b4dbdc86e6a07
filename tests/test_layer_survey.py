"""The layer survey's rules on made-up outputs: no torch, no model."""

import numpy as np
import pytest

from hoverlay.pipeline.layer_survey import (
    INPUT,
    MAP,
    OTHER,
    PADDING,
    TOKENS,
    LayerInfo,
    block_stack,
    choose_defaults,
    classify_output,
    depth_picks,
    module_output_names,
    nearest_non_negative,
    token_grid,
    tokens_to_grid,
)

rng = np.random.default_rng(0)


def _map(name, side, d=4, non_negative=True):
    return LayerInfo(name, (d, side, side), MAP, (side, side, d), 0, non_negative)


def test_classify_outputs():
    relu = np.maximum(rng.normal(size=(3, 8, 14, 14)), 0)
    info = classify_output("relu", relu, batch=3, input_side=224)
    assert (info.kind, info.grid, info.non_negative) == (MAP, (14, 14, 8), True)
    assert not classify_output("add", relu - 0.5, batch=3, input_side=224).non_negative
    padded = np.pad(relu, ((0, 0), (0, 0), (1, 1), (1, 1)))
    assert classify_output("pad", padded, batch=3, input_side=224).kind == PADDING
    assert classify_output("x", rng.normal(size=(3, 3, 224, 224)), batch=3, input_side=224).kind == INPUT
    weight = rng.normal(size=(8, 3, 3, 3))  # a parameter: no batch dimension of 3
    assert classify_output("w", weight, batch=3, input_side=224).kind == OTHER
    attention = rng.random((3, 4, 197, 197))  # heads x tokens x tokens: finer than half the input
    assert classify_output("attn", attention, batch=3, input_side=224).kind == OTHER
    assert classify_output("qkv", rng.normal(size=(3, 197, 3, 64)), batch=3, input_side=224).kind == OTHER
    tokens = classify_output("blk", rng.normal(size=(3, 197, 16)), batch=3, input_side=224)
    assert (tokens.kind, tokens.grid, tokens.prefix_tokens) == (TOKENS, (14, 14, 16), 1)
    assert classify_output("pooled", rng.normal(size=(3, 16)), batch=3, input_side=224).kind == OTHER
    assert classify_output("none", None, batch=3, input_side=224).kind == OTHER


def test_a_token_layer_is_non_negative_by_its_grid_tokens_alone():
    t = np.abs(rng.normal(size=(3, 197, 8)))
    t[:, 0] = -1.0  # the class token may be signed: it is dropped
    assert classify_output("t", t, batch=3, input_side=224).non_negative


def test_token_grids():
    assert token_grid(196) == (14, 0) and token_grid(197) == (14, 1)
    assert token_grid(201) == (14, 5) and token_grid(261) == (16, 5)  # class + 4 registers
    assert token_grid(3) is None
    assert token_grid(14 * 14 + 17) is None  # more than 16 prefix tokens is not a grid
    t = rng.normal(size=(2, 197, 5))
    grid = tokens_to_grid(t)
    np.testing.assert_array_equal(grid[:, 3, 4], t[:, 1 + 3 * 14 + 4])
    with pytest.raises(ValueError, match="prefix"):
        tokens_to_grid(t, prefix_tokens=2)
    with pytest.raises(ValueError, match="square grid"):
        tokens_to_grid(rng.normal(size=(1, 14 * 14 + 17, 2)))


def test_cnn_defaults_take_the_last_non_negative_map_at_the_three_coarsest_sides():
    infos = [_map("stem", 112), _map("s2", 56), _map("s3.relu", 28), _map("s3.add", 28, non_negative=False),
             _map("s4.relu", 14), _map("s4.add", 14, non_negative=False),
             _map("s5.add", 7, non_negative=False), _map("s5.bn", 7, non_negative=False),
             LayerInfo("pool", (4, 1, 1), MAP, (1, 1, 4), 0, True)]
    assert [i.name for i in choose_defaults(infos)] == ["s3.relu", "s4.relu", "s5.bn"]


def test_single_resolution_defaults_follow_the_block_stack():
    infos = [_map("embed", 14, non_negative=False)] + [_map(f"b{i}.add", 14, non_negative=False) for i in range(12)]
    blocks = [_map(f"blocks.{i}", 14, non_negative=False) for i in range(12)]
    assert [i.name for i in choose_defaults(infos, blocks)] == ["blocks.3", "blocks.7", "blocks.11"]
    # no stack: maps at three depths of the one resolution
    assert [i.name for i in choose_defaults(infos)] == ["b2.add", "b7.add", "b11.add"]
    # two resolutions and no stack: one per resolution, finest first
    assert [i.name for i in choose_defaults([_map("a", 28), _map("b", 14)])] == ["a", "b"]
    assert choose_defaults([]) == []


def test_block_stack_and_depth_picks():
    children = [("", [("embed", "Conv2d"), ("encoder", "Encoder")]),
                ("encoder.layers", [(f"encoder_layer_{i}", "EncoderBlock") for i in range(12)]),
                ("layer1", [("0", "BasicBlock"), ("1", "BasicBlock")])]
    stack = block_stack(children)
    assert stack[0] == "encoder.layers.encoder_layer_0" and len(stack) == 12
    assert block_stack([("layer1", [("0", "B"), ("1", "B")])]) == []  # two is no stack
    assert depth_picks(list("abcdef")) == ["b", "d", "f"]
    assert depth_picks(["a", "b"]) == ["a", "b"]


def test_nearest_non_negative_layer():
    infos = [_map("a.relu", 14), _map("a.add", 14, non_negative=False), LayerInfo("w", (3,), OTHER),
             _map("b.relu", 14), _map("c.relu", 7)]
    assert nearest_non_negative(infos, "a.add").name == "a.relu"  # 1 node away; b.relu is 2
    infos2 = [_map("x.add", 7, non_negative=False), _map("y.relu", 14)]
    assert nearest_non_negative(infos2, "x.add").name == "y.relu"  # none at 7x7: any resolution
    assert nearest_non_negative(infos2, "missing") is None
    assert nearest_non_negative([_map("s", 7, non_negative=False)], "s") is None


def test_module_output_names():
    nodes = ["conv1", "layer4.0.relu", "layer4.1.conv1", "layer4.1.relu_1", "inception5b.cat", "fc"]
    modules = {"conv1", "layer4", "layer4.0", "layer4.1", "layer4.1.conv1", "inception5b", "fc"}
    names = module_output_names(nodes, modules)
    assert names["layer4.1.relu_1"] == "layer4" and names["inception5b.cat"] == "inception5b"
    assert names["layer4.0.relu"] == "layer4.0" and "conv1" not in names


def test_one_sided_padding_is_padding_too():
    relu = np.maximum(rng.normal(size=(3, 8, 14, 14)), 0) + 0.01
    same = np.pad(relu, ((0, 0), (0, 0), (0, 1), (0, 1)))  # TensorFlow "same" padding, stride 2
    assert classify_output("pad", same, batch=3, input_side=224).kind == PADDING
    assert classify_output("relu", relu, batch=3, input_side=224).kind == MAP
