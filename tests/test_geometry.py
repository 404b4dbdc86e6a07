import numpy as np
import pytest

from hoverlay.stores import LayerGeometry, OutOfRangeError, patch_coords, patch_id

G = LayerGeometry(height=7, width=5, dim=3)


def test_patch_id_round_trip_at_edges():
    n = 4
    images, ys, xs = np.meshgrid([0, n - 1], [0, G.height - 1], [0, G.width - 1], indexing="ij")
    ids = patch_id(images.ravel(), ys.ravel(), xs.ravel(), G, n_images=n)
    assert ids.min() == 0 and ids.max() == n * G.height * G.width - 1
    back = patch_coords(ids, G, n_images=n)
    np.testing.assert_array_equal(back[0], images.ravel())
    np.testing.assert_array_equal(back[1], ys.ravel())
    np.testing.assert_array_equal(back[2], xs.ravel())


def test_all_ids_are_a_bijection():
    n = 3
    ids = np.arange(n * G.patches_per_image)
    i, y, x = patch_coords(ids, G, n)
    np.testing.assert_array_equal(patch_id(i, y, x, G, n), ids)


@pytest.mark.parametrize("args, bad", [((0, 7, 0), "y 7"), ((0, 0, -1), "x -1"), ((4, 0, 0), "image 4")])
def test_out_of_range_names_the_value(args, bad):
    with pytest.raises(OutOfRangeError, match=bad):
        patch_id(*args, G, n_images=4)


def test_ids_beyond_int64_are_out_of_range():
    with pytest.raises(OutOfRangeError, match="image 99999999999999999999"):
        patch_id(99999999999999999999, 0, 0, G)


def test_patch_coords_out_of_range():
    with pytest.raises(OutOfRangeError, match="patch id 140"):
        patch_coords(140, G, n_images=4)
    with pytest.raises(OutOfRangeError, match="patch id -1"):
        patch_coords([-1], G)
