import pytest
import torch

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, ModelConfig
from ssl_vit.methods.mae import MAE, MAEConfig, patch_mean_std
from ssl_vit.ops import sincos_pos_embed_2d

from tolerances import LOSS_RTOL, ROUNDING

P, L = 4, 64  # 32 px images, patch 4 -> 8 x 8 grid


def make(norm_pix=True, decoder_dim=32, seed=0) -> MAE:
    torch.manual_seed(seed)
    backbone = Backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=P, embed_dim=48, depth=2, num_heads=3
    )
    cfg = MAEConfig(
        decoder_dim=decoder_dim, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix
    )
    return MAE(backbone, cfg)


def batch(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.rand(b, L, generator=g)


def my_patchify(images, p):
    """Explicit loops: patch (i, j) row-major; inside: row r, column q, channel c."""
    b, c, h, w = images.shape
    out = torch.empty(b, (h // p) * (w // p), p * p * c)
    for i in range(h // p):
        for j in range(w // p):
            block = images[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # (B, C, p, p)
            out[:, i * (w // p) + j] = block.permute(0, 2, 3, 1).reshape(b, -1)
    return out


def test_mask_counts_and_restore():
    model = make()
    images, noise = batch()
    out = model.forward_loss(images, noise)
    assert out["pred"].shape == (2, L, P * P * 3)
    assert out["mask"].sum(1).tolist() == [48.0, 48.0]  # 16 kept of 64
    ids_shuffle = torch.argsort(noise, dim=1)
    restored = torch.gather(ids_shuffle, 1, out["ids_restore"])
    assert torch.equal(restored, torch.arange(L).expand(2, L))
    # Masked exactly where the noise is not among the 16 smallest.
    kept = noise <= noise.sort(dim=1).values[:, 15:16]
    assert torch.equal(out["mask"], (~kept).float())


def test_encoder_runs_on_kept_tokens_only():
    model = make()
    shapes = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape))
    images, noise = batch()
    model.forward_loss(images, noise)
    assert shapes == [torch.Size([2, 1 + L // 4, 48])]


def test_decoder_input_is_unshuffled():
    model = make()
    latent, dec_in = [], []
    model.backbone.register_forward_hook(lambda m, a, o: latent.append(o.tokens))
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, a: dec_in.append(a[0]))
    images, noise = batch()
    model.forward_loss(images, noise)
    with torch.no_grad():
        embedded = model.decoder_embed(latent[0])  # (B, 1 + 16, Dd): cls, then kept in noise order
        tokens = dec_in[0] - model.decoder_pos_embed
    ids_keep = torch.argsort(noise, dim=1)[:, :16]
    for b in range(2):
        torch.testing.assert_close(tokens[b, 0], embedded[b, 0], **ROUNDING)
        kept = set(ids_keep[b].tolist())
        for j, pos in enumerate(ids_keep[b].tolist()):
            torch.testing.assert_close(tokens[b, 1 + pos], embedded[b, 1 + j], **ROUNDING)
        for pos in set(range(L)) - kept:
            torch.testing.assert_close(tokens[b, 1 + pos], model.mask_token[0, 0], **ROUNDING)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_recomputation(norm_pix):
    model = make(norm_pix=norm_pix)
    images, noise = batch()
    out = model.forward_loss(images, noise)
    target = my_patchify(images, P)
    if norm_pix:
        n = target.shape[-1]
        mean = target.sum(-1, keepdim=True) / n
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (n - 1)  # unbiased, as official
        target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = ((out["pred"] - target) ** 2).mean(-1)
    mask = out["mask"]
    expected = sum(per_patch[b, i] for b in range(2) for i in range(L) if mask[b, i]) / 96
    # 96 per-patch means summed one by one here, by a reduction there
    torch.testing.assert_close(out["loss"], expected, atol=0, rtol=LOSS_RTOL)


def test_norm_pix_target_on_hand_built_patch():
    patch = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])  # mean 3, unbiased var 14/3
    mean, std = patch_mean_std(patch)
    assert mean.item() == pytest.approx(3.0)
    assert std.item() == pytest.approx((14 / 3 + 1e-6) ** 0.5)
    target = ((patch - mean) / std).flatten().tolist()
    assert target == pytest.approx([v / (14 / 3 + 1e-6) ** 0.5 for v in (-2, -1, 0, 3)])


def test_position_embeddings_fixed_sincos():
    model = make()
    enc, dec = model.backbone.pos_embed, model.decoder_pos_embed
    assert not enc.requires_grad and not dec.requires_grad
    assert torch.equal(enc[0], sincos_pos_embed_2d(48, 8, 8, cls_token=True))
    assert torch.equal(dec[0], sincos_pos_embed_2d(32, 8, 8, cls_token=True))
    assert torch.equal(enc[0, 0], torch.zeros(48))


def test_initialisation_statistics():
    model = make(decoder_dim=256)
    assert 0.016 < model.mask_token.std().item() < 0.024
    assert 0.014 < model.backbone.cls_token.std().item() < 0.026
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 1 * 4 + 2  # encoder/decoder blocks, decoder_embed, decoder_pred
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        bound = (6 / (m.in_features + m.out_features)) ** 0.5  # xavier uniform
        assert m.weight.abs().max().item() <= bound
        # statistical, not float32: the sample std of >= 2,304 uniform draws has a standard
        # error of sqrt(0.8 / 4n) < 1 % (uniform kurtosis 1.8), so 15 % is > 15 of them
        assert m.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.15)
    w = model.backbone.patch_embed.proj.weight  # (48, 3, 4, 4) as a 48 x 48 linear: as above
    assert w.std().item() == pytest.approx((6 / (48 + 48)) ** 0.5 / 3**0.5, rel=0.15)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_reconstruct_pastes_visible_and_denormalises_masked():
    model = make(norm_pix=True)
    with torch.no_grad():
        model.decoder_pred.weight.zero_()
        model.decoder_pred.bias.zero_()
    images, noise = batch()
    recon = model.reconstruct(images, noise)
    mask = model.forward_loss(images, noise)["mask"].bool()
    got, src = my_patchify(recon, P), my_patchify(images, P)
    assert recon.shape == images.shape
    assert torch.equal(got[~mask], src[~mask])
    # Zero prediction de-normalises to each masked patch's own mean.
    means = src.mean(-1, keepdim=True).expand_as(src)
    torch.testing.assert_close(got[mask], means[mask], **ROUNDING)
    # Without norm-pix the zero prediction stays zero.
    raw = make(norm_pix=False)
    with torch.no_grad():
        raw.decoder_pred.weight.zero_()
        raw.decoder_pred.bias.zero_()
    got = my_patchify(raw.reconstruct(images, noise), P)
    assert torch.equal(got[mask], torch.zeros_like(got[mask]))


def test_training_step_equals_forward_loss():
    model = make()
    images, noise = batch()
    loss = model.forward_loss(images, noise)["loss"]
    step = model.training_step({"images": images, "noise": noise})
    assert set(step) == {"loss"}
    assert torch.equal(step["loss"], loss)
    assert torch.equal(model({"images": images, "noise": noise})["loss"], loss)


def test_loss_decreases_on_a_fixed_batch():
    model = make()
    images, noise = batch(b=4)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=MAEConfig.betas
    )
    losses = []
    for _ in range(20):
        loss = model.training_step({"images": images, "noise": noise})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model.backbone.pos_embed.grad is None  # fixed position embedding


def test_errors_name_the_key():
    def errors(**kw):
        return MAEConfig(**kw).errors(Config(model=ModelConfig(img_size=32, patch_size=16)))

    assert errors() == []
    for ratio in (0.0, 1.0, 1.5, -0.1):
        assert errors(mask_ratio=ratio) == [f"method.mask_ratio: must be in (0, 1), got {ratio}"]
    # 4 patches at 32 px / patch 16: ratio 0.9 keeps int(0.4) = 0 patches.
    (msg,) = errors(mask_ratio=0.9)
    assert msg.startswith("method.mask_ratio:") and "keeps no patch" in msg
    (msg,) = errors(decoder_dim=100, decoder_heads=16)
    assert msg.startswith("method.decoder_dim:")
    (msg,) = errors(decoder_depth=0)
    assert msg.startswith("method.decoder_depth:")
