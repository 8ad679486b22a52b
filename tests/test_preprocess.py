import numpy as np
import pytest

from cloudmask.dataset import preprocess
from cloudmask.dataset.preprocess import Geometry


def test_reference_geometry_numbers():
    g = Geometry()
    assert g.train_crop == (slice(88, 1112), slice(110, 1390))
    assert g.train_grid == (4, 5) and g.patches_per_train_image == 20
    assert g.stride == 176 and g.test_grid == (7, 9) and g.patches_per_test_image == 63
    assert g.test_padding == ((56, 56), (82, 82))
    assert g.stitch_offset == (16, 42)


def test_train_patches_shape_and_row_major_slices():
    rng = np.random.default_rng(0)
    x = rng.random((1200, 1500, 9), dtype=np.float32)
    p = preprocess.train_patches(x)
    assert p.shape == (20, 256, 256, 9)
    crop = x[88:1112, 110:1390]
    for k in range(20):
        i, j = divmod(k, 5)
        np.testing.assert_array_equal(p[k], crop[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256])


def test_masks_work_too():
    m = (np.random.default_rng(1).random((1200, 1500, 1)) > 0.5).astype(np.uint8)
    assert preprocess.train_patches(m).shape == (20, 256, 256, 1)
    t = preprocess.test_patches(m)
    assert t.shape == (63, 256, 256, 1) and t.dtype == np.uint8
    np.testing.assert_array_equal(preprocess.stitch(t), m)


def test_test_patches_padding_and_stride():
    x = np.random.default_rng(2).random((1200, 1500, 9)).astype(np.float32) + 1.0  # no zeros inside
    p = preprocess.test_patches(x)
    assert p.shape == (63, 256, 256, 9)
    # first patch: 56 zero rows on top, 82 zero columns on the left, then the image
    assert np.all(p[0, :56] == 0) and np.all(p[0, :, :82] == 0)
    np.testing.assert_array_equal(p[0, 56:, 82:], x[:200, :174])
    # patch (1, 2) starts at padded (176, 352) -> image (120, 270)
    np.testing.assert_array_equal(p[1 * 9 + 2], x[120:376, 270:526])
    # last patch: zeros at the bottom and right
    assert np.all(p[-1, -56:] == 0) and np.all(p[-1, :, -82:] == 0)


def test_stitch_inverts_test_patches_exactly():
    x = np.random.default_rng(3).standard_normal((1200, 1500, 9)).astype(np.float32)
    np.testing.assert_array_equal(preprocess.stitch(preprocess.test_patches(x)), x)


def test_stitch_takes_each_pixel_from_exactly_one_patch_centre():
    # Mark every patch with its index; the stitched map must equal the analytic tile owner of each pixel.
    g = Geometry()
    patches = np.repeat(np.arange(63, dtype=np.float32)[:, None, None, None], 256, 1).repeat(256, 2)
    owner = preprocess.stitch(patches)[..., 0]
    rows = (np.arange(1200) + 16) // 176
    cols = (np.arange(1500) + 42) // 176
    np.testing.assert_array_equal(owner, rows[:, None] * 9 + cols[None, :])
    assert g.test_grid == (7, 9)


@pytest.mark.parametrize("h, w, patch, overlap", [(1200, 1500, 128, 32), (300, 420, 64, 16), (256, 256, 256, 0)])
def test_geometry_from_other_sizes(h, w, patch, overlap):
    g = Geometry(h, w, patch, overlap)
    x = np.random.default_rng(4).random((h, w, 2)).astype(np.float32)
    np.testing.assert_array_equal(preprocess.stitch(preprocess.test_patches(x, g), g), x)
    rows, cols = g.train_grid
    assert preprocess.train_patches(x, g).shape == (rows * cols, patch, patch, 2)


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="1200, 1500"):
        preprocess.train_patches(np.zeros((100, 100, 9), np.float32))
    with pytest.raises(ValueError, match="63"):
        preprocess.stitch(np.zeros((62, 256, 256, 1), np.float32))


def test_fixed_normalisation():
    x = np.zeros((4, 5, 9), np.float32)
    x[..., :6] = 0.75
    x[..., 6:] = 292.0
    y = preprocess.normalise(x, "fixed")
    np.testing.assert_allclose(y[..., :6], 0.25)
    np.testing.assert_allclose(y[..., 6:], 1.0)
    assert x[0, 0, 0] == 0.75  # input untouched


def test_zscore_normalisation_uses_one_scalar_per_group():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.random((30, 40, 6)) * 0.8, 250 + 40 * rng.random((30, 40, 3))], -1).astype(np.float32)
    y = preprocess.normalise(x, "zscore")
    for sl in (slice(0, 6), slice(6, 9)):
        group = y[..., sl]
        assert abs(group.mean()) < 1e-5 and abs(group.std() - 1) < 1e-4
        # one scalar for the whole group: channel relations are preserved
        ref = (x[..., sl] - x[..., sl].mean()) / x[..., sl].std()
        np.testing.assert_allclose(group, ref, atol=1e-5)


def test_zscore_of_a_constant_group_does_not_divide_by_zero():
    x = np.ones((10, 10, 9), np.float32)
    y = preprocess.normalise(x, "zscore")
    assert np.all(np.isfinite(y)) and np.all(y == 0)


def test_preprocess_does_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys, cloudmask.dataset.preprocess, cloudmask.dataset.files; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
