import numpy as np
import pytest
import torch

from ssl_vit import ops
from ssl_vit.ops import ema_update_, patchify, random_masking, sincos_pos_embed_2d, unpatchify

from tolerances import ROUNDING


def test_patchify_element_order_and_round_trip():
    b, c, p, h, w = 2, 3, 2, 3, 4
    images = torch.arange(b * c * h * p * w * p, dtype=torch.float32).reshape(b, c, h * p, w * p)
    x = patchify(images, p)
    assert x.shape == (b, h * w, p * p * c)
    # Patch (i, j) is row-major index i*w + j; inside it element (r, q, ch) at (r*p + q)*c + ch.
    for n in range(b):
        for i in range(h):
            for j in range(w):
                for r in range(p):
                    for q in range(p):
                        for ch in range(c):
                            got = x[n, i * w + j, (r * p + q) * c + ch]
                            assert got == images[n, ch, i * p + r, j * p + q]
    # The official reshape + einsum formulation gives the same tensor.
    ref = images.reshape(b, c, h, p, w, p)
    ref = torch.einsum("nchpwq->nhwpqc", ref).reshape(b, h * w, p * p * c)
    assert torch.equal(x, ref)
    assert torch.equal(unpatchify(x, p, h, w), images)


def test_random_masking_given_noise():
    torch.manual_seed(0)
    b, n, ratio = 3, 16, 0.75
    noise = torch.rand(b, n)
    ids_keep, mask, ids_restore = random_masking(b, n, ratio, "cpu", noise=noise)
    k = int(n * (1 - ratio))
    assert ids_keep.shape == (b, k) and k == 4
    assert mask.shape == (b, n)
    assert torch.equal(mask.sum(1), torch.full((b,), float(n - k)))
    for row in range(b):
        # Independent recomputation: the k smallest noise values are kept, in ascending order.
        order = np.argsort(noise[row].numpy(), kind="stable")
        assert ids_keep[row].tolist() == order[:k].tolist()
        expected = np.ones(n, dtype=np.float32)
        expected[order[:k]] = 0
        assert mask[row].tolist() == expected.tolist()
        assert set(torch.nonzero(mask[row]).flatten().tolist()) == set(order[k:].tolist())
    # ids_restore un-shuffles: gathering the shuffled sequence gives back the original.
    ids_shuffle = torch.argsort(noise, dim=1)
    original = torch.arange(n).expand(b, n) * 10
    shuffled = torch.gather(original, 1, ids_shuffle)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), original)
    # Deterministic for the same noise.
    again = random_masking(b, n, ratio, "cpu", noise=noise.clone())
    assert all(torch.equal(u, v) for u, v in zip((ids_keep, mask, ids_restore), again, strict=True))


@pytest.mark.parametrize("world,rank", [(1, 0), (4, 0), (4, 2)])
def test_random_masking_draws_the_global_batch(monkeypatch, world, rank):
    monkeypatch.setattr(ops.dist, "is_initialized", lambda: world > 1)
    monkeypatch.setattr(ops.dist, "get_world_size", lambda: world)
    monkeypatch.setattr(ops.dist, "get_rank", lambda: rank)
    b, n = 2, 8
    torch.manual_seed(123)
    ids_keep, mask, ids_restore = random_masking(b, n, 0.5, "cpu")
    torch.manual_seed(123)
    noise = torch.rand(world * b, n)[rank * b : (rank + 1) * b]
    ref = random_masking(b, n, 0.5, "cpu", noise=noise)
    assert torch.equal(ids_keep, ref[0]) and torch.equal(mask, ref[1])
    assert torch.equal(ids_restore, ref[2])


def _official_2d_sincos(embed_dim, grid_h, grid_w, cls_token):
    """The official MAE numpy code (util/pos_embed.py), generalised to a grid_h x grid_w grid."""

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def test_sincos_matches_official_formula_on_non_square_grid():
    got = sincos_pos_embed_2d(16, 3, 4, cls_token=True)
    ref = torch.from_numpy(_official_2d_sincos(16, 3, 4, True)).float()
    assert got.shape == (1 + 12, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, **ROUNDING)  # float32 sin/cos against float64 numpy
    assert torch.equal(got[0], torch.zeros(16))
    # Hand check: patch (row 1, col 2) -> first channel sin(col * 1), channel 8 sin(row * 1).
    assert got[1 + 1 * 4 + 2, 0].item() == pytest.approx(np.sin(2.0))
    assert got[1 + 1 * 4 + 2, 8].item() == pytest.approx(np.sin(1.0))
    assert torch.equal(sincos_pos_embed_2d(16, 3, 4), got[1:])


def test_ema_update_in_place():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0]])]
    s = [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])]
    ids = [id(x) for x in t]
    ema_update_(t, s, 0.9)
    torch.testing.assert_close(t[0], torch.tensor([1.2, 1.6]))
    torch.testing.assert_close(t[1], torch.tensor([[9.0]]))
    assert [id(x) for x in t] == ids
