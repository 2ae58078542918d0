"""Published-weight conversion: numerical parity with HuggingFace's ViTMAE (random weights,
no download) for every checkpoint layout, and clear errors for what cannot be mapped."""

import numpy as np
import pytest
from keras import ops

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import keras  # noqa: E402

from keras_mae import MAEEncoder, MaskedAutoencoder  # noqa: E402
from keras_mae.convert import ConversionError, convert, main  # noqa: E402

SIZE, PATCH, PATCHES = 16, 4, 16


def hf_model(norm_pix_loss=False, mask_ratio=0.75, seed=0):
    config = transformers.ViTMAEConfig(
        image_size=SIZE, patch_size=PATCH, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=128, decoder_hidden_size=16,
        decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=64,
        norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio,
    )
    torch.manual_seed(seed)
    return transformers.ViTMAEForPreTraining(config).eval()


def inputs(batch=3):
    images = np.random.default_rng(0).random((batch, SIZE, SIZE, 3), dtype=np.float32)
    noise = np.random.default_rng(1).random((batch, PATCHES), dtype=np.float32)
    return images, noise


def run_hf(model, images, noise):
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise))


def assert_parity(mae, hf, norm_pix_loss):
    images, noise = inputs()
    expected = run_hf(hf, images, noise)
    ours = mae(images, noise=noise)
    np.testing.assert_allclose(ops.convert_to_numpy(ours["pred"]), expected.logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(ops.convert_to_numpy(ours["mask"]), expected.mask.numpy())
    loss = ops.convert_to_numpy(mae.compute_loss(images, None, ours))
    assert float(loss) == pytest.approx(float(expected.loss), abs=1e-4)
    assert mae.norm_pix_loss == norm_pix_loss


def with_hf_epsilon(model):
    """Without a config.json the converter assumes the official layer-norm epsilon (1e-6);
    the HuggingFace models here use theirs (1e-12)."""
    assert model.layer_norm_epsilon == 1e-6
    clone = type(model).from_config({**model.get_config(), "layer_norm_epsilon": 1e-12})
    clone.set_weights(model.get_weights())
    return clone


def official_state_dict(hf):
    """The official facebookresearch/mae key layout, written out by hand from HF's modules."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    out = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "decoder_embed.weight": sd["decoder.decoder_embed.weight"],
        "decoder_embed.bias": sd["decoder.decoder_embed.bias"],
        "mask_token": sd["decoder.mask_token"],
        "decoder_pos_embed": sd["decoder.decoder_pos_embed"],
        "decoder_norm.weight": sd["decoder.decoder_norm.weight"],
        "decoder_norm.bias": sd["decoder.decoder_norm.bias"],
        "decoder_pred.weight": sd["decoder.decoder_pred.weight"],
        "decoder_pred.bias": sd["decoder.decoder_pred.bias"],
    }
    for hf_prefix, prefix, depth in (("vit.layers", "blocks", 2), ("decoder.decoder_layers", "decoder_blocks", 2)):
        for i in range(depth):
            src, dst = f"{hf_prefix}.{i}", f"{prefix}.{i}"
            for kind in ("weight", "bias"):
                out[f"{dst}.attn.qkv.{kind}"] = torch.cat(
                    [sd[f"{src}.attention.{p}_proj.{kind}"] for p in "qkv"], dim=0
                )
                out[f"{dst}.attn.proj.{kind}"] = sd[f"{src}.attention.o_proj.{kind}"]
                out[f"{dst}.norm1.{kind}"] = sd[f"{src}.layernorm_before.{kind}"]
                out[f"{dst}.norm2.{kind}"] = sd[f"{src}.layernorm_after.{kind}"]
                out[f"{dst}.mlp.fc1.{kind}"] = sd[f"{src}.mlp.fc1.{kind}"]
                out[f"{dst}.mlp.fc2.{kind}"] = sd[f"{src}.mlp.fc2.{kind}"]
    return out


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_huggingface_directory_gives_the_same_predictions_mask_and_loss(tmp_path, norm_pix_loss):
    hf = hf_model(norm_pix_loss)
    hf.save_pretrained(tmp_path / "hf")
    mae, skipped = convert(tmp_path / "hf")
    assert isinstance(mae, MaskedAutoencoder) and skipped == []
    assert mae.layer_norm_epsilon == hf.config.layer_norm_eps
    assert_parity(mae, hf, norm_pix_loss)


def test_encoder_features_match_without_masking(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    mae, _ = convert(tmp_path / "hf")
    hf.config.mask_ratio = 0.0  # HuggingFace's way to see every patch
    images, _ = inputs()
    in_order = np.tile(np.arange(PATCHES, dtype=np.float32), (len(images), 1))  # keeps image order
    with torch.no_grad():
        expected = hf.vit(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(in_order))
    np.testing.assert_allclose(
        ops.convert_to_numpy(mae.encoder(images)), expected.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4
    )


def test_in_memory_state_dict_layout_converts_too(tmp_path):
    hf = hf_model(seed=1)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    mae, _ = convert(tmp_path / "pytorch_model.bin", num_heads=2, decoder_num_heads=4)
    assert_parity(with_hf_epsilon(mae), hf, False)


def test_official_checkpoint_through_the_command_line(tmp_path, capsys):
    hf = hf_model(seed=2)
    torch.save({"model": official_state_dict(hf), "epoch": 799}, tmp_path / "mae_pretrain.pth")
    output = tmp_path / "converted.keras"
    main([str(tmp_path / "mae_pretrain.pth"), "--output", str(output), "--num-heads", "2", "--decoder-num-heads", "4"])
    assert "MaskedAutoencoder" in capsys.readouterr().out
    assert_parity(with_hf_epsilon(keras.saving.load_model(output)), hf, False)


def test_encoder_only_checkpoint_becomes_an_encoder_and_leaves_the_head_out(tmp_path):
    hf = hf_model(seed=3)
    hf.config.mask_ratio = 0.0
    state = {k: v for k, v in official_state_dict(hf).items() if not k.startswith(("decoder", "mask_token"))}
    state["head.weight"], state["head.bias"] = torch.zeros(10, 32), torch.zeros(10)
    torch.save({"model": state}, tmp_path / "finetuned.pth")
    encoder, skipped = convert(tmp_path / "finetuned.pth", num_heads=2)
    assert isinstance(encoder, MAEEncoder) and skipped == ["head.bias", "head.weight"]
    encoder = with_hf_epsilon(encoder)
    images, _ = inputs()
    in_order = np.tile(np.arange(PATCHES, dtype=np.float32), (len(images), 1))
    with torch.no_grad():
        expected = hf.vit(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(in_order))
    np.testing.assert_allclose(ops.convert_to_numpy(encoder(images)), expected.last_hidden_state.numpy(), atol=1e-4)


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_checkpoints_fail_with_one_clear_line(tmp_path, capsys):
    out = str(tmp_path / "x.keras")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert "is not a PyTorch checkpoint" in cli_error(capsys, str(tmp_path / "notes.pth"), "--output", out)
    assert "does not exist" in cli_error(capsys, str(tmp_path / "missing.pth"), "--output", out)

    state = official_state_dict(hf_model())
    for name, change, message in [
        ("missing", lambda s: s.pop("blocks.1.norm1.weight"), "Missing tensor 'blocks.1.norm1.weight'"),
        ("extra", lambda s: s.update({"extra.weight": torch.zeros(3)}), "Unexpected tensors that keras_mae has no place for: extra.weight"),
        ("shape", lambda s: s.update({"blocks.0.attn.proj.weight": torch.zeros(32, 31)}),
         "Tensor 'blocks.0.attn.proj.weight' maps to shape (31, 32)"),
    ]:
        broken = dict(state)
        change(broken)
        torch.save({"model": broken}, tmp_path / f"{name}.pth")
        err = cli_error(capsys, str(tmp_path / f"{name}.pth"), "--output", out, "--num-heads", "2", "--decoder-num-heads", "4")
        assert message in err, err
    torch.save({"model": state}, tmp_path / "ok.pth")
    assert "pass --num-heads" in cli_error(capsys, str(tmp_path / "ok.pth"), "--output", out)
    assert "must end in .keras" in cli_error(capsys, str(tmp_path / "ok.pth"), "--output", str(tmp_path / "x.h5"))
