"""AdamW: Keras' AdamW updates on every backend (torch's fused kernel on torch), the
per-variable multipliers, the weight-decay exclusions, configs and old saved names;
WarmupCosineDecay: Keras' CosineDecay rates without its branch."""

import keras
import numpy as np
import pytest

from keras_mae.optimizers import NO_WEIGHT_DECAY, AdamW, WarmupCosineDecay

STEPS = 5


def layers_variables():
    """Variables the way models hold them: named by layers, biases and norms among them."""
    first, norm, second = keras.layers.Dense(6, name="first"), keras.layers.LayerNormalization(name="norm"), \
        keras.layers.Dense(3, name="second")
    first.build((None, 5))
    norm.build((None, 6))
    second.build((None, 6))
    return first.weights + norm.weights + second.weights


def gradients(variables, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=v.shape).astype("float32") for v in variables] for _ in range(STEPS)]


def schedule():
    return WarmupCosineDecay(0.0, decay_steps=STEPS, warmup_target=0.05, warmup_steps=2)


def run(optimizer, variables, steps):
    optimizer.build(variables)
    for grads in steps:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    return [keras.ops.convert_to_numpy(v) for v in variables]


def reference_adamw(values, steps, learning_rates, multipliers, decayed, beta_1, beta_2, epsilon, weight_decay,
                    amsgrad):
    """Keras' AdamW written out in numpy (epsilon added to the uncorrected sqrt(v))."""
    values = [np.array(v, np.float64) for v in values]
    m = [np.zeros_like(v) for v in values]
    v2 = [np.zeros_like(v) for v in values]
    v_max = [np.zeros_like(v) for v in values]
    for t, (grads, lr) in enumerate(zip(steps, learning_rates), start=1):
        for i, g in enumerate(grads):
            rate = lr * multipliers[i]
            if decayed[i]:
                values[i] -= values[i] * weight_decay * rate
            m[i] = beta_1 * m[i] + (1 - beta_1) * g
            v2[i] = beta_2 * v2[i] + (1 - beta_2) * g * g
            v_max[i] = np.maximum(v_max[i], v2[i])
            second = v_max[i] if amsgrad else v2[i]
            alpha = rate * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
            values[i] -= alpha * m[i] / (np.sqrt(second) + epsilon)
    return values


@pytest.mark.parametrize("amsgrad", [False, True])
def test_multipliers_and_decay_match_the_written_out_update(amsgrad):
    variables = layers_variables()
    multipliers = {"first/kernel": 0.25, "first/bias": 0.5, "norm/gamma": 2.0}
    initial = [keras.ops.convert_to_numpy(v) for v in variables]
    steps = gradients(variables)
    optimizer = AdamW(schedule(), multipliers, weight_decay=0.3, beta_2=0.95, epsilon=1e-3, amsgrad=amsgrad)
    got = run(optimizer, variables, steps)
    rates = [float(keras.ops.convert_to_numpy(schedule()(step))) for step in range(STEPS)]
    expected = reference_adamw(
        initial, steps, rates, [multipliers.get(v.path, 1.0) for v in variables],
        [v.name not in NO_WEIGHT_DECAY for v in variables], 0.9, 0.95, 1e-3, 0.3, amsgrad,
    )
    for variable, value, want, start in zip(variables, got, expected, initial):
        assert not np.allclose(value, start), variable.path
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=variable.path)


@pytest.mark.parametrize("amsgrad, accumulation", [(False, None), (True, None), (False, 2)])
def test_without_multipliers_it_is_keras_adamw(amsgrad, accumulation):
    ours, theirs = layers_variables(), layers_variables()
    for mine, other in zip(ours, theirs):
        other.assign(mine)
    steps = gradients(ours, seed=1)
    keras_adamw = keras.optimizers.AdamW(schedule(), weight_decay=0.1, beta_2=0.95, amsgrad=amsgrad,
                                         gradient_accumulation_steps=accumulation)
    keras_adamw.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    expected = run(keras_adamw, theirs, steps)
    got = run(AdamW(schedule(), weight_decay=0.1, beta_2=0.95, amsgrad=amsgrad,
                    gradient_accumulation_steps=accumulation), ours, steps)
    for variable, value, want in zip(ours, got, expected):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=variable.path)


def test_weight_decay_skips_biases_and_norms():
    """With zero gradients Adam does not move a weight: only the decay does."""
    variables = layers_variables()
    for variable in variables:
        variable.assign(keras.ops.ones(variable.shape))
    zeros = [[np.zeros(v.shape, "float32") for v in variables]]
    after = run(AdamW(0.1, weight_decay=0.5), variables, zeros)
    moved = {v.path for v, value in zip(variables, after) if not np.allclose(value, 1.0)}
    assert moved == {"first/kernel", "second/kernel"}
    np.testing.assert_allclose(after[0], 1.0 - 0.5 * 0.1, rtol=1e-6)


def test_config_round_trip():
    optimizer = AdamW(schedule(), {"first/kernel": 0.5}, weight_decay=0.02, no_weight_decay=("bias",),
                      beta_2=0.95, amsgrad=True, clipnorm=1.0)
    clone = AdamW.from_config(optimizer.get_config())
    assert clone.get_config() == optimizer.get_config()
    assert clone.lr_multipliers == {"first/kernel": 0.5} and clone.no_weight_decay == ("bias",)


def test_configs_saved_under_the_old_name_still_load():
    """Fine-tuned models saved before this module existed name `LayerDecayAdamW`."""
    config = keras.saving.serialize_keras_object(AdamW(1e-3, {"a/kernel": 0.5}, weight_decay=0.01))
    config.update(module="keras_mae.classifier", class_name="LayerDecayAdamW",
                  registered_name="keras_mae>LayerDecayAdamW")
    loaded = keras.saving.deserialize_keras_object(config)
    assert isinstance(loaded, AdamW) and loaded.lr_multipliers == {"a/kernel": 0.5}
    assert loaded.decoupled_weight_decay == 0.01


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.compile is the torch backend's")
def test_torch_compile_leaves_the_update_to_eager_torch():
    """Traced, Keras' update of one variable after another costs minutes of compiling."""
    import torch

    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    variables = layers_variables()
    initial = [keras.ops.convert_to_numpy(v) for v in variables]
    steps = gradients(variables)
    eager = run(AdamW(schedule(), weight_decay=0.1), variables, steps)
    for variable, value in zip(variables, initial):
        variable.assign(value)
    optimizer = AdamW(schedule(), weight_decay=0.1)
    optimizer.build(variables)
    torch._dynamo.reset()
    apply = torch.compile(lambda grads: optimizer.apply(grads, variables), backend=count_graphs)
    for grads in steps:
        apply([keras.ops.convert_to_tensor(g) for g in grads])
    assert graphs == []
    for variable, want in zip(variables, eager):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), want, rtol=1e-6, atol=1e-7)


def test_compiled_and_eager_training_agree():
    """fit compiles the update into the step with XLA (torch.compile leaves it to the
    fused kernel, eagerly): the same weights either way."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.normal(size=(16, 3)).astype("float32")
    trained = []
    for options in (dict(run_eagerly=True), dict(jit_compile=True)):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, name="first"),
                                  keras.layers.LayerNormalization(name="norm"), keras.layers.Dense(3, name="second")])
        model.compile(AdamW(schedule(), {"first/kernel": 0.5}, weight_decay=0.1), "mse", **options)
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        trained.append([keras.ops.convert_to_numpy(v) for v in model.weights])
    for eager, compiled in zip(*trained):
        np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(initial_learning_rate=0.0, decay_steps=7, warmup_target=0.05, warmup_steps=3),
    dict(initial_learning_rate=1e-4, decay_steps=5, warmup_target=2e-3, warmup_steps=1, alpha=0.1),
    dict(initial_learning_rate=0.0, decay_steps=4, warmup_target=0.01, warmup_steps=0),
    dict(initial_learning_rate=0.02, decay_steps=6),
])
def test_warmup_cosine_decay_gives_keras_rates(options):
    """Every step of warm-up, decay and past the end (where the rate stays at its floor)."""
    ours, keras_schedule = WarmupCosineDecay(**options), keras.optimizers.schedules.CosineDecay(**options)
    steps = range(options.get("warmup_steps", 0) + options["decay_steps"] + 3)
    rates = [[float(keras.ops.convert_to_numpy(s(keras.ops.convert_to_tensor(step, "int64")))) for step in steps]
             for s in (ours, keras_schedule)]
    np.testing.assert_allclose(*rates, rtol=1e-6, atol=1e-9)
    if options.get("warmup_steps"):
        assert rates[0][options["warmup_steps"]] == pytest.approx(options["warmup_target"])


def test_warmup_cosine_decay_config_round_trip():
    schedule_ = WarmupCosineDecay(1e-4, decay_steps=9, alpha=0.1, warmup_target=1e-3, warmup_steps=2, name="lr")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule_))
    assert isinstance(clone, WarmupCosineDecay) and clone.get_config() == schedule_.get_config()
    for step in (0, 1, 5, 20):
        assert float(keras.ops.convert_to_numpy(clone(step))) == float(keras.ops.convert_to_numpy(schedule_(step)))


@pytest.mark.parametrize("epochs, steps_per_epoch, warmup_epochs, warmup_steps", [
    (4, 10, 1, 10),     # whole warm-up epoch, then 30 decaying steps
    (3, 8, 0.5, 4),     # a fractional warm-up
    (2, 5, 40, 9),      # warm-up longer than the run: cut to leave one decaying step
    (1, 1, 1, 0),       # a one-step run starts at the peak
])
def test_warmup_cosine_decay_for_run(epochs, steps_per_epoch, warmup_epochs, warmup_steps):
    """The scripts' recipe: 0 -> peak over the warm-up, rising strictly, then down to 0 at the end."""
    schedule_ = WarmupCosineDecay.for_run(0.4, epochs, steps_per_epoch, warmup_epochs)
    total = epochs * steps_per_epoch
    rates = [float(keras.ops.convert_to_numpy(schedule_(step))) for step in range(total + 1)]
    assert schedule_.warmup_steps == warmup_steps
    assert schedule_.warmup_steps + schedule_.decay_steps == total
    assert rates[warmup_steps] == pytest.approx(0.4)
    assert rates[0] == (0.0 if warmup_steps else pytest.approx(0.4))
    assert all(a < b for a, b in zip(rates[:warmup_steps], rates[1:warmup_steps + 1]))
    assert all(a > b for a, b in zip(rates[warmup_steps:total], rates[warmup_steps + 1:total + 1]))
    assert rates[total] == pytest.approx(0.0, abs=1e-9)
