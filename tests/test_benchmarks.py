"""The benchmark scripts refuse flags that would make their figures wrong, before any work."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402
import throughput  # noqa: E402


def error_of(capsys, function, argv):
    with pytest.raises(SystemExit) as exit_info:
        function(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("function, backend_flags", [
    (throughput.parse_args, ["--backend", "torch"]),
    (compare.main, ["--backends", "jax,torch"]),
])
def test_one_warmup_step_before_torch_compile_is_refused(capsys, function, backend_flags):
    # Its first step runs eagerly and the second compiles: one untimed step would time compiling.
    code, err = error_of(capsys, function, [*backend_flags, "--jit-compile", "true", "--warmup", "1"])
    assert code == 2
    assert "--warmup 2 or more" in err.splitlines()[-1]


def test_warmups_that_time_no_compiling_or_every_step_are_accepted():
    for warmup in ("0", "2"):
        args = throughput.parse_args(["--backend", "torch", "--jit-compile", "true", "--warmup", warmup])
        assert args.warmup == int(warmup)
    # Uncompiled torch, and XLA, which compiles at the first step, take one warm-up step.
    assert throughput.parse_args(["--backend", "torch", "--warmup", "1"]).warmup == 1
    assert throughput.parse_args(["--backend", "jax", "--jit-compile", "true", "--warmup", "1"]).warmup == 1


def test_throughput_times_a_few_real_steps_and_writes_its_figures(tmp_path, capsys):
    import json

    import keras

    path = tmp_path / "figures.json"
    spe = "1" if keras.backend.backend() == "torch" else "2"  # Keras' torch trainer runs one step per call
    throughput.main(["--backend", keras.backend.backend(), "--config", "D", "--batch-size", "2", "--steps", "3",
                     "--warmup", "1", "--steps-per-execution", spe, "--json", str(path)])
    figures = json.loads(path.read_text())
    assert figures["img_per_s"] > 0 and figures["user_s_per_step"] > 0 and figures["model_tflops_per_s"] > 0
    assert capsys.readouterr().out.splitlines()[-1] == f"img_per_s={figures['img_per_s']:.2f}"
