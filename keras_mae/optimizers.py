"""`AdamW` and `WarmupCosineDecay`: the optimizer and learning-rate schedule of both
pre-training (train.py) and fine-tuning (finetune.py).

Keras' AdamW has one learning rate; fine-tuning a pre-trained ViT wants the early blocks
to move less than the late ones (layer-wise decay), so this one takes a multiplier per
variable. On the torch backend it also runs each step through torch's fused Adam kernel:
Keras' own torch AdamW makes about a dozen `_foreach` passes over every weight, which for
ViT-B's 112 M weights cost 0.6 s per step on a 2-core CPU against 0.04 s fused.
"""

import math

import keras
from keras import ops

from keras_mae.torch_compile import not_traced

# Variable names that are not decayed: biases, norms, tokens, fixed tables.
NO_WEIGHT_DECAY = ("bias", "gamma", "beta", "class_token", "mask_token", "table")


@keras.saving.register_keras_serializable(package="keras_mae")
class AdamW(keras.optimizers.Adam):
    """Adam with decoupled weight decay and a learning-rate multiplier per variable.

    The same updates as `keras.optimizers.AdamW` (Keras' epsilon placement included)
    when every multiplier is 1. A variable's weight decay is scaled by its multiplier too,
    as in the official fine-tuning recipe, and skips `no_weight_decay` names.

    Args:
        learning_rate: the base rate (a float or a schedule).
        lr_multipliers: `{variable path: multiplier}`, e.g. from
            `ViTClassifier.layer_decay_multipliers`; missing paths get 1.
        weight_decay: decoupled weight decay.
        no_weight_decay: variable names that are not decayed.
        **kwargs: Adam's (beta_1, beta_2, epsilon, amsgrad, clipnorm, ...).
    """

    def __init__(self, learning_rate=0.001, lr_multipliers=None, weight_decay=0.05,
                 no_weight_decay=NO_WEIGHT_DECAY, name="adamw", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.lr_multipliers = dict(lr_multipliers or {})
        self.decoupled_weight_decay = weight_decay
        self.no_weight_decay = tuple(no_weight_decay)

    def build(self, variables):
        super().build(variables)
        # Indexed like the optimizer's own slots: update_step runs on every backend's
        # variable type (tf.Variable under tf.distribute), which all have an index.
        self._lr_scales = [float(self.lr_multipliers.get(v.path, 1.0)) for v in variables]
        self._decayed = [bool(self.decoupled_weight_decay) and v.name not in self.no_weight_decay
                         for v in variables]

    @not_traced
    def apply(self, grads, trainable_variables=None):
        """Keras' `apply`; a torch step compiled with torch.compile runs it eagerly, through
        torch's fused kernel, instead of tracing Keras' update of one variable after another
        (1-4 minutes of compiling on a 2-core CPU, for a step no faster)."""
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        learning_rate = ops.cast(learning_rate, variable.dtype) * self._lr_scales[index]
        if self._decayed[index]:
            variable.assign(variable - variable * (self.decoupled_weight_decay * learning_rate))
        super().update_step(gradient, variable, learning_rate)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if keras.backend.backend() == "torch":
            self._fused_torch_step(grads, trainable_variables, learning_rate)
        else:  # update_step per variable; XLA fuses it
            super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _fused_torch_step(self, grads, variables, learning_rate):
        """One `torch._fused_adam_` call per group of variables that share a multiplier,
        decay flag, dtype and device (a kernel call takes one learning rate).

        Keras adds epsilon to the uncorrected sqrt(v); torch to the corrected one. Passing
        the bias corrections in the learning rate and a step count at which torch's own
        corrections are exactly 1 gives Keras' update, with no host read of the step.
        """
        import torch

        groups = {}
        for grad, variable in zip(grads, variables):
            index = self._get_variable_index(variable)
            value = variable.value
            key = (self._lr_scales[index], self._decayed[index], value.dtype, value.device)
            groups.setdefault(key, []).append((index, value, grad))

        with torch.no_grad():
            learning_rate = ops.cast(learning_rate, "float32")
            step = ops.cast(self.iterations + 1, "float32")
            step_size = learning_rate * ops.sqrt(1 - self.beta_2**step) / (1 - self.beta_1**step)
            no_correction = torch.tensor(float("inf"), device=step_size.device)
            for (scale, decayed, _, _), members in groups.items():
                indices, values, group_grads = zip(*members)
                if decayed:
                    torch._foreach_mul_(values, 1 - self.decoupled_weight_decay * scale * learning_rate)
                torch._fused_adam_(
                    list(values), list(group_grads),
                    [self._momentums[i].value for i in indices],
                    [self._velocities[i].value for i in indices],
                    [self._velocity_hats[i].value for i in indices] if self.amsgrad else [],
                    [no_correction] * len(values),
                    lr=step_size * scale, beta1=self.beta_1, beta2=self.beta_2, weight_decay=0.0,
                    eps=self.epsilon, amsgrad=self.amsgrad, maximize=False,
                )

    def get_config(self):
        config = super().get_config()
        config.update(
            lr_multipliers=self.lr_multipliers,
            weight_decay=self.decoupled_weight_decay,
            no_weight_decay=list(self.no_weight_decay),
        )
        return config


@keras.saving.register_keras_serializable(package="keras_mae")
class WarmupCosineDecay(keras.optimizers.schedules.CosineDecay):
    """Keras' `CosineDecay` with linear warm-up, computed without a branch.

    The same rates and config as Keras' schedule. Keras picks warm-up or decay with
    `ops.cond`, which on torch is a Python `if` on a tensor and a new `Cond` operation
    (a new name) per step: under torch.compile each step breaks the optimizer's graph and
    recompiles until torch's limit. Both pieces are a few scalar operations, so this one
    computes both and selects with `ops.where`.
    """

    @classmethod
    def for_run(cls, peak_rate, epochs, steps_per_epoch, warmup_epochs):
        """The recipe of train.py and finetune.py: from 0 up to `peak_rate` over
        `warmup_epochs` (fractions allowed), then a cosine down to 0 at the run's last step.
        A warm-up as long as the run is cut so that at least one step decays."""
        total_steps = epochs * steps_per_epoch
        warmup_steps = max(min(int(warmup_epochs * steps_per_epoch), total_steps - 1), 0)
        return cls(0.0, decay_steps=max(total_steps - warmup_steps, 1), warmup_target=peak_rate,
                   warmup_steps=warmup_steps)

    def __call__(self, step):
        if self.warmup_target is None:  # no warm-up: Keras' schedule has no branch
            return super().__call__(step)
        start = ops.convert_to_tensor(self.initial_learning_rate)
        dtype = start.dtype
        target = ops.cast(self.warmup_target, dtype)
        step = ops.minimum(ops.cast(step, dtype), float(self.warmup_steps + self.decay_steps))
        warming = start + (target - start) * step / max(self.warmup_steps, 1)
        cosine = 0.5 * (1.0 + ops.cos(math.pi * (step - self.warmup_steps) / self.decay_steps))
        decaying = target * ((1.0 - self.alpha) * cosine + self.alpha)
        return ops.where(step < self.warmup_steps, warming, decaying)


# Fine-tuned models saved before the optimizer had its own module name it so.
keras.saving.get_custom_objects()["keras_mae>LayerDecayAdamW"] = AdamW
