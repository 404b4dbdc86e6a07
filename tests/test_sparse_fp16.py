"""Page vectors with the zeros left out (explorer/sparse_fp16.py): exact, and only when smaller."""

from __future__ import annotations

import numpy as np
import pytest

from hoverlay.explorer.sparse_fp16 import pack, unpack


@pytest.mark.parametrize("zeros", [0.0, 0.05, 0.1, 0.47, 0.9, 1.0])
def test_pack_round_trips_exactly_and_is_never_larger_than_the_dense_bits(zeros):
    rng = np.random.default_rng(3)
    values = rng.uniform(0, 1, (5, 7, 7, 24)).astype(np.float16)
    values[rng.uniform(size=values.shape) < zeros] = 0
    values.flat[:3] = (np.float16(-0.0), np.float16(np.inf), np.float16(6e-8))  # -0, inf, a subnormal
    bits, mask = pack(values)
    back = unpack(bits, mask, values.size)
    np.testing.assert_array_equal(back.view(np.uint16), values.reshape(-1).view(np.uint16))  # bit-exact
    dense = 2 * values.size
    assert 2 * bits.size + mask.size <= dense
    if zeros >= 0.1:  # more than 1/16 zeros: the bitmask pays for itself
        assert mask.size == (values.size + 7) // 8 and bits.size == np.count_nonzero(values.view(np.uint16))
    if zeros == 0.0:
        assert mask.size == 0 and bits.size == values.size


def test_the_mask_is_little_endian_one_bit_per_value():
    values = np.zeros(16, np.float16)
    values[[1, 8, 15]] = (1.0, 2.0, 3.0)
    bits, mask = pack(values)
    assert mask.tolist() == [0b00000010, 0b10000001]
    np.testing.assert_array_equal(bits.view(np.float16), [1.0, 2.0, 3.0])


def test_unpack_refuses_a_mask_that_does_not_match_the_values():
    bits, mask = pack(np.array([0, 0, 0, 1, 0, 0, 0, 0, 2, 0], np.float16))
    with pytest.raises(ValueError, match="marks 2 non-zero values, 1 were sent"):
        unpack(bits[:1], mask, 10)
    with pytest.raises(ValueError, match="hold 3 values, expected 4"):
        unpack(np.zeros(3, np.uint16), np.zeros(0, np.uint8), 4)


def test_a_packed_layer_holds_the_exact_values_and_norms_and_counts_its_bytes():
    from hoverlay.explorer.sparse_fp16 import PackedLayer

    rng = np.random.default_rng(3)
    vectors = np.maximum(rng.normal(size=(2, 3, 4, 8)), 0).astype(np.float16)  # rectified: ~half zeros
    norms = rng.random((2, 3, 4)).astype(np.float64)
    packed = PackedLayer.of(vectors, norms)
    assert packed.mask.size  # sparse enough to leave the zeros out
    np.testing.assert_array_equal(unpack(packed.bits, packed.mask, vectors.size), vectors.reshape(-1))
    assert packed.norms.dtype == np.float32 and packed.norms.shape == (24,)
    np.testing.assert_allclose(packed.norms, norms.reshape(-1), rtol=1e-7)
    assert packed.nbytes == packed.bits.nbytes + packed.mask.nbytes + packed.norms.nbytes < vectors.nbytes + 96
    assert PackedLayer.empty().nbytes == 0
