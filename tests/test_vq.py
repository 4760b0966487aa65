"""Tests for the VQ tokenizer (vq.py): CPU, tiny configs, no network."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vq
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
    assert (q.nearest(flat) != 0).all()
    for _ in range(3):
        q(z)
    assert (flat @ q.embed[0]).max() > 0.9, "the dead code was not moved onto the data"
    assert (q.nearest(flat) == 0).any(), "the restarted code is still unused"


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
    again = vq.load_vq(path)
    assert torch.equal(again.codebook, model.codebook)
    with pytest.raises(UserError, match="prepare_data.py"):
        vq.load_vq(str(tmp_path / "missing.pt"))
    open(path, "r+b").truncate(os.path.getsize(path) - 100)                     # a file cut short
    with pytest.raises(UserError, match="cannot read the tokenizer"):
        vq.load_vq(path)


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

# -----------------------------------------------------------------------------
# the released tokenizers: small random state dicts in each file's own layout (key names and shapes
# as the official classes write them: LlamaGen tokenizer/tokenizer_image/vq_model.py, LDM
# ldm/modules/diffusionmodules/model.py + taming's VectorQuantizer2), loaded with strict matching


def resnet_keys(prefix, c_in, c_out):
    keys = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
            f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
            f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
            f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,)}
    if c_in != c_out:
        keys.update({f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1),
                     f"{prefix}.nin_shortcut.bias": (c_out,)})
    return keys


def attn_keys(prefix, c):
    keys = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
    for p in ("q", "k", "v", "proj_out"):
        keys.update({f"{prefix}.{p}.weight": (c, c, 1, 1), f"{prefix}.{p}.bias": (c,)})
    return keys


def released_keys(family, ch=32, ch_mult=(1, 2), n_res=1, z=16, K=64, d=4):
    """{key: shape} of a LlamaGen VQModel or an LDM VQModel (attention at the lowest level)."""
    llama = family == "llamagen"
    levels, keys = len(ch_mult), {}
    conv = lambda name, o, i, k: keys.update({f"{name}.weight": (o, i, k, k), f"{name}.bias": (o,)})
    res, down, up = ("res", "conv_blocks", "conv_blocks") if llama else ("block", "down", "up")
    mid = ("mid.0", "mid.1", "mid.2") if llama else ("mid.block_1", "mid.attn_1", "mid.block_2")
    conv("encoder.conv_in", ch, 3, 3)
    c = ch
    for i, m in enumerate(ch_mult):                                 # encoder, full resolution first
        for j in range(n_res):
            keys.update(resnet_keys(f"encoder.{down}.{i}.{res}.{j}", c, ch * m))
            c = ch * m
            if i == levels - 1:
                keys.update(attn_keys(f"encoder.{down}.{i}.attn.{j}", c))
        if i != levels - 1:
            conv(f"encoder.{down}.{i}.downsample.conv", c, c, 3)
    for part in ("encoder", "decoder"):
        keys.update(resnet_keys(f"{part}.{mid[0]}", c, c))
        keys.update(attn_keys(f"{part}.{mid[1]}", c))
        keys.update(resnet_keys(f"{part}.{mid[2]}", c, c))
    keys.update({"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,)})
    conv("encoder.conv_out", z, c, 3)
    conv("decoder.conv_in", c, z, 3)
    for k, i in enumerate(reversed(range(levels))):           # decoder, lowest resolution first
        name = f"decoder.{up}.{k if llama else i}"                 # LlamaGen counts from the lowest
        for j in range(n_res + 1):
            keys.update(resnet_keys(f"{name}.{res}.{j}", c, ch * ch_mult[i]))
            c = ch * ch_mult[i]
            if i == levels - 1:
                keys.update(attn_keys(f"{name}.attn.{j}", c))
        if i != 0:
            conv(f"{name}.upsample.conv", c, c, 3)
    keys.update({"decoder.norm_out.weight": (c,), "decoder.norm_out.bias": (c,)})
    conv("decoder.conv_out", 3, c, 3)
    conv("quant_conv", d, z, 1)
    conv("post_quant_conv", z, d, 1)
    keys["quantize.embedding.weight"] = (K, d)
    if llama:
        keys["quantize.codebook_used"] = (65536,)
    else:                                          # the Lightning file also holds the training loss
        keys.update({"loss.discriminator.main.0.weight": (8, 3, 4, 4), "loss.logvar": ()})
    return keys


def released_file(path, family, seed=0, **shape):
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.ones(s) if k.endswith("norm1.weight") else 0.2 * torch.randn(s, generator=g))
          for k, s in released_keys(family, **shape).items()}
    sd["quantize.embedding.weight"] *= torch.rand(sd["quantize.embedding.weight"].shape[0], 1,
                                                  generator=g) * 4     # rows of unequal norms
    torch.save({"model": sd} if family == "llamagen" else {"state_dict": sd, "global_step": 7},
               path)
    return sd


@pytest.mark.parametrize("family, shape", [("llamagen", dict()), ("ldm", dict(z=4, d=4)),
                                           ("llamagen", dict(ch=64, ch_mult=(1, 1, 2), K=32))])
def test_released_layouts_load_strictly_and_keep_the_interface(tmp_path, family, shape):
    path = str(tmp_path / "released.pt")
    sd = released_file(path, family, **shape)
    model = vq.load_vq(path)                      # the architecture comes from the tensors alone
    names = {"z": "z_channels", "K": "codebook_size", "d": "code_dim"}
    want = {"ch": 32, "ch_mult": (1, 2), "codebook_size": 64,
            **{names.get(k, k): v for k, v in shape.items()}}
    assert isinstance(model, vq.VQGAN) and model.cfg.family == family
    assert {k: getattr(model.cfg, k) for k in want} == want
    assert model.cfg.attn_levels == (len(want["ch_mult"]) - 1,)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    f = model.cfg.downsample
    idx = model.encode(images, batch_size=2)
    assert idx.shape == (3, 16 // f, 16 // f) and idx.dtype == torch.int64
    assert 0 <= int(idx.min()) and int(idx.max()) < want["codebook_size"]
    out = model.decode(idx, batch_size=2)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    E, raw = model.codebook, sd["quantize.embedding.weight"]
    assert torch.allclose(E, F.normalize(raw, dim=1) if family == "llamagen" else raw)
    assert torch.allclose(model.decode_z(E[idx]), out, atol=1e-5)
    assert model.cfg.grid == 256 // f                              # the paper's 256px images
    # strict: a missing or an unknown key is one line naming it
    missing = {k: v for k, v in sd.items() if k != "quant_conv.bias"}
    for broken, key in ((missing, "quant_conv.bias"),
                        ({**sd, "decoder.extra.weight": torch.zeros(1)}, "decoder.extra.weight")):
        torch.save({"model": broken} if family == "llamagen" else {"state_dict": broken}, path)
        with pytest.raises(UserError, match=f"{key} is (missing|unexpected)"):
            vq.load_vq(path)


def test_llamagen_codes_are_nearest_among_normalised_rows(tmp_path):
    path = str(tmp_path / "vq_ds8.pt")
    sd = released_file(path, "llamagen", K=256)
    model = vq.load_vq(path)
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(vq.to_float(images)))           # (4, d, 8, 8)
    z = z.permute(0, 2, 3, 1).reshape(-1, 4)
    raw = sd["quantize.embedding.weight"]
    cosine = (F.normalize(z, dim=1) @ F.normalize(raw, dim=1).t()).argmax(dim=1)
    plain = torch.cdist(z, raw).argmin(dim=1)                               # raw rows, raw outputs
    assert torch.equal(model.encode(images).flatten(), cosine)
    assert (plain != cosine).float().mean() > 0.3, "the rows' norms did not matter: a weak test"


def test_foreign_and_truncated_files_are_one_line(tmp_path):
    path = str(tmp_path / "x.pt")
    for obj in ({"weights": {"a": torch.zeros(2)}}, [torch.zeros(2)],
                {"model": {"a": torch.zeros(2)}}):
        torch.save(obj, path)
        with pytest.raises(UserError, match="not a tokenizer file.*LlamaGen.*LDM") as e:
            vq.load_vq(path)
        assert "\n" not in str(e.value)
    released_file(path, "ldm")
    open(path, "r+b").truncate(os.path.getsize(path) // 2)
    with pytest.raises(UserError, match="cannot read the tokenizer .*x.pt.*LDM"):
        vq.load_vq(path)
