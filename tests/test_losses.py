import numpy as np
import pytest
from keras import ops

from keras_mae.losses import masked_patch_loss, normalize_patches


def setup(seed=0):
    rng = np.random.default_rng(seed)
    target = rng.random((3, 8, 12), dtype=np.float32)
    pred = rng.random((3, 8, 12), dtype=np.float32)
    mask = np.zeros((3, 8), dtype=np.float32)
    mask[:, :6] = 1.0
    for row in mask:
        rng.shuffle(row)
    return target, pred, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_ignores_visible_patches(norm_pix):
    target, pred, mask = setup()
    before = float(masked_patch_loss(target, pred, mask, norm_pix))
    changed = pred.copy()
    changed[mask == 0] += 100.0
    assert float(masked_patch_loss(target, changed, mask, norm_pix)) == pytest.approx(before, rel=1e-6)
    changed = pred.copy()
    changed[mask == 1] += 1.0
    assert float(masked_patch_loss(target, changed, mask, norm_pix)) > before + 0.5


def test_loss_is_the_mean_squared_error_over_masked_pixels():
    target, pred, mask = setup(1)
    expected = ((pred - target) ** 2)[mask == 1].mean()
    assert float(masked_patch_loss(target, pred, mask)) == pytest.approx(expected, rel=1e-5)


def test_norm_pix_normalises_each_patch():
    target, _, _ = setup(2)
    target = target * np.arange(1, 9, dtype=np.float32)[None, :, None] + 5.0
    normalised = ops.convert_to_numpy(normalize_patches(target))
    np.testing.assert_allclose(normalised.mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalised.var(axis=-1, ddof=1), 1.0, rtol=1e-3)
    _, pred, mask = setup(2)
    expected = ((pred - normalised) ** 2)[mask == 1].mean()
    assert float(masked_patch_loss(target, pred, mask, True)) == pytest.approx(expected, rel=1e-5)
