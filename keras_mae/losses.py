"""The MAE objective: pixel MSE on the removed patches only."""

from keras import ops

NORM_PIX_EPSILON = 1e-6


def patch_statistics(patches):
    """Per-patch mean and unbiased variance over the last axis (as `torch.var`)."""
    patches = ops.convert_to_tensor(patches)
    mean = ops.mean(patches, axis=-1, keepdims=True)
    count = patches.shape[-1]
    variance = ops.sum(ops.square(patches - mean), axis=-1, keepdims=True) / (count - 1)
    return mean, variance


def normalize_patches(patches):
    """The `norm_pix_loss` target: each patch minus its mean, over its standard deviation."""
    patches = ops.convert_to_tensor(patches)
    mean, variance = patch_statistics(patches)
    return (patches - mean) / ops.sqrt(variance + NORM_PIX_EPSILON)


def masked_patch_loss(target_patches, predicted_patches, mask, norm_pix_loss=False):
    """Mean squared error over the pixels of the masked patches.

    Args:
        target_patches: `(batch, patches, p * p * C)` from `Patchify` on the input.
        predicted_patches: the decoder's output, same shape.
        mask: `(batch, patches)`, 1 where a patch was removed; visible patches carry
            no weight, so the encoder cannot win by copying what it saw.
        norm_pix_loss: compare against per-patch normalised pixels (paper Table 1d).
    """
    target = ops.cast(target_patches, "float32")
    if norm_pix_loss:
        target = normalize_patches(target)
    mask = ops.cast(mask, "float32")
    per_patch = ops.mean(ops.square(ops.cast(predicted_patches, "float32") - target), axis=-1)
    return ops.sum(per_patch * mask) / ops.maximum(ops.sum(mask), 1.0)
