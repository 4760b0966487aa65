"""Tests for the VQ tokenizer (vq.py): CPU, tiny configs, no network."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vq
import vqgan
from cli import UserError
from vq import Quantizer, VQConfig, VQVAE

TINY = VQConfig(image_size=16, downsample=2, ch=16, n_res=1, codebook_size=32, code_dim=4)


def test_quantizer_picks_the_nearest_code():
    q = Quantizer(K=16, d=4).eval()
    q.initialized.fill_(True)
    z = F.normalize(torch.randn(2, 4, 3, 3), dim=1)
    z_q, idx, _ = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, q.embed).argmin(dim=1)            # Euclidean nearest, brute force
    assert torch.equal(idx.flatten(), brute)
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 4), q.embed[brute])


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = VQVAE(TINY)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    recon, _, commit = model(x)
    (F.mse_loss(recon, x) + commit).backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached encoder.{name}"


def test_dead_code_is_restarted_onto_the_data():
    torch.manual_seed(0)
    q = Quantizer(K=8, d=4, decay=0.5)
    e1 = torch.tensor([1.0, 0, 0, 0])
    z = F.normalize(torch.randn(2, 4, 4, 4) + 3 * e1[None, :, None, None], dim=1)   # data near +e1
    q(z)                                                                           # k-means init
    q.ema_sum[0], q.ema_count[0], q.embed[0] = -e1, 1.0, -e1              # a code no data is near
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert (vq.nearest_code(flat, q.embed) != 0).all()
    for _ in range(3):
        q(z)
    assert (flat @ q.embed[0]).max() > 0.9, "the dead code was not moved onto the data"
    assert (vq.nearest_code(flat, q.embed) == 0).any(), "the restarted code is still unused"


def test_autoencoder_round_trip_shapes_and_interface():
    model = VQVAE(TINY).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    idx = model.encode(images, batch_size=2)
    assert idx.shape == (5, 8, 8) and idx.dtype == torch.int64
    assert 0 <= int(idx.min()) and int(idx.max()) < TINY.codebook_size
    out = model.decode(idx, batch_size=2)
    assert out.shape == (5, 3, 16, 16)
    E = model.codebook
    assert E.shape == (32, 4) and torch.allclose(E.norm(dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(model.decode_z(E[idx]), out, atol=1e-5)   # decode(i) == decode_z(E[i])
    u8 = vq.to_uint8(out)
    assert u8.dtype == np.uint8 and u8.shape == (5, 16, 16, 3)


def test_checkpoint_loads_with_weights_only(tmp_path):
    model = VQVAE(TINY)
    path = str(tmp_path / "vq.pt")
    vq.save_vq(model, path, {"psnr": 1.0})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["vq_config"]["codebook_size"] == 32
    again = vqgan.load_tokenizer(path)
    assert torch.equal(again.codebook, model.codebook)
    with pytest.raises(UserError, match="prepare_data.py"):
        vqgan.load_tokenizer(str(tmp_path / "missing.pt"))
    open(path, "r+b").truncate(os.path.getsize(path) - 100)                     # a file cut short
    with pytest.raises(UserError, match="cannot read the tokenizer"):
        vqgan.load_tokenizer(path)


@pytest.mark.parametrize("kw, msg", [(dict(image_size=17), "not divisible"),
                                     (dict(codebook_size=70000), "65536"),
                                     (dict(downsample=3), "power of two")])
def test_bad_configs_fail_with_one_clear_line(kw, msg):
    with pytest.raises(ValueError, match=msg):
        VQVAE(VQConfig(**{**TINY.__dict__, **kw}))


def test_training_raises_psnr_on_shapes(tmp_path):
    from prepare_data import make_shapes
    train, _ = make_shapes(2000, 32, seed=0)
    val, _ = make_shapes(200, 32, seed=1)
    cfg = VQConfig(ch=32, n_res=1, codebook_size=64, code_dim=4)
    untrained, _ = vq.evaluate(VQVAE(cfg), val)
    torch.manual_seed(0)
    model = vq.train_vq(train, val, cfg, str(tmp_path / "vq.pt"), max_iters=200, batch_size=32,
                        eval_interval=200, log=lambda s: None)
    trained, _ = vq.evaluate(model, val)
    assert trained["psnr"] > untrained["psnr"] + 5, (untrained, trained)
    assert trained["usage"] > 0.5
    assert (tmp_path / "vq_recon.png").exists()
