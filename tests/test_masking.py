import numpy as np
import pytest
from keras import ops

from keras_mae.masking import MASK_SAMPLINGS, RandomMasking, gather_tokens, unshuffle


def tokens(batch=6, grid=(4, 4), width=3):
    n = grid[0] * grid[1]
    # Token i of every sample carries the value i, so gathers are easy to follow.
    return np.broadcast_to(np.arange(n, dtype=np.float32)[None, :, None], (batch, n, width)).copy()


@pytest.mark.parametrize("sampling", MASK_SAMPLINGS)
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_each_sample_loses_exactly_the_ratio(sampling, ratio):
    layer = RandomMasking((4, 4), ratio, sampling, seed=1)
    kept, mask, ids_restore = layer(tokens())
    mask = ops.convert_to_numpy(mask)
    num_keep = int(16 * (1 - ratio))
    assert tuple(kept.shape) == (6, num_keep, 3)
    assert mask.shape == (6, 16) and set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask.sum(axis=1), 16 - num_keep)
    # The kept tokens are exactly the patches the mask calls visible.
    kept_ids = np.sort(ops.convert_to_numpy(kept)[:, :, 0], axis=1)
    visible_ids = np.stack([np.flatnonzero(m == 0) for m in mask])
    np.testing.assert_array_equal(kept_ids, visible_ids)


def test_masks_differ_between_samples_and_calls():
    layer = RandomMasking((4, 4), 0.75, seed=2)
    first = ops.convert_to_numpy(layer(tokens(batch=8))[1])
    second = ops.convert_to_numpy(layer(tokens(batch=8))[1])
    assert len({m.tobytes() for m in first}) > 1
    assert not np.array_equal(first, second)


def test_unshuffle_inverts_the_shuffle():
    layer = RandomMasking((4, 4), 0.75, seed=3)
    x = np.random.default_rng(0).random((5, 16, 2), dtype=np.float32)
    noise = ops.convert_to_numpy(layer.sample_noise(5))
    _, _, ids_restore = layer(x, noise=noise)
    shuffled = np.take_along_axis(x, np.argsort(noise, axis=1)[..., None], axis=1)
    np.testing.assert_array_equal(ops.convert_to_numpy(unshuffle(shuffled, ids_restore)), x)


def test_gather_tokens_takes_each_samples_own_rows():
    rng = np.random.default_rng(0)
    tokens = rng.random((3, 7, 5)).astype("float32")
    ids = rng.integers(0, 7, size=(3, 4)).astype("int32")  # repeats allowed
    got = ops.convert_to_numpy(gather_tokens(ops.convert_to_tensor(tokens), ops.convert_to_tensor(ids)))
    np.testing.assert_array_equal(got, np.take_along_axis(tokens, ids[..., None], axis=1))


def test_lowest_noise_is_kept():
    layer = RandomMasking((2, 2), 0.5)
    noise = np.array([[0.9, 0.1, 0.5, 0.2]], dtype=np.float32)
    kept, mask, _ = layer(tokens(batch=1, grid=(2, 2)), noise=noise)
    np.testing.assert_array_equal(ops.convert_to_numpy(kept)[0, :, 0], [1.0, 3.0])
    np.testing.assert_array_equal(ops.convert_to_numpy(mask), [[1.0, 0.0, 1.0, 0.0]])


def test_same_int_seed_gives_same_noise():
    layer = RandomMasking((4, 4), 0.75, "block")
    a, b = (ops.convert_to_numpy(layer.sample_noise(3, seed=11)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, ops.convert_to_numpy(layer.sample_noise(3, seed=12)))


def test_grid_sampling_keeps_one_patch_per_two_by_two_cell():
    layer = RandomMasking((8, 8), 0.75, "grid", seed=4)
    mask = ops.convert_to_numpy(layer(tokens(batch=16, grid=(8, 8)))[1]).reshape(16, 8, 8)
    for sample in mask:
        rows, cols = np.nonzero(sample == 0)
        assert len(rows) == 16
        assert len(set(rows % 2)) == 1 and len(set(cols % 2)) == 1


def neighbour_agreement(masks):
    """Fraction of horizontally or vertically adjacent patch pairs with equal mask values."""
    same = [(masks[:, 1:] == masks[:, :-1]).mean(), (masks[:, :, 1:] == masks[:, :, :-1]).mean()]
    return float(np.mean(same))


def test_block_sampling_removes_contiguous_regions():
    batch, grid = 64, (14, 14)
    masks = {
        sampling: ops.convert_to_numpy(RandomMasking(grid, 0.5, sampling, seed=5)(tokens(batch, grid))[1])
        for sampling in ("random", "block")
    }
    random_score = neighbour_agreement(masks["random"].reshape(batch, *grid))
    block_score = neighbour_agreement(masks["block"].reshape(batch, *grid))
    assert random_score < 0.6  # about 0.5 for independent patches
    assert block_score > random_score + 0.2


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1, "0.5", None])
def test_mask_ratio_outside_open_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="mask_ratio must be a number strictly between 0 and 1"):
        RandomMasking((4, 4), ratio)


def test_unknown_sampling_and_bad_noise_are_refused():
    with pytest.raises(ValueError, match="mask_sampling must be one of"):
        RandomMasking((4, 4), 0.75, "checkerboard")
    with pytest.raises(ValueError, match=r"noise must be shaped \(batch, 16\)"):
        RandomMasking((4, 4))(tokens(), noise=np.zeros((6, 15), dtype=np.float32))


def test_config_round_trip():
    layer = RandomMasking((2, 3), 0.6, "grid", seed=9, name="m")
    clone = RandomMasking.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    x = tokens(batch=2, grid=(2, 3))
    noise = ops.convert_to_numpy(layer.sample_noise(2, seed=1))
    for a, b in zip(layer(x, noise=noise), clone(x, noise=noise)):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
