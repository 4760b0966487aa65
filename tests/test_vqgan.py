"""Tests for the released tokenizers (vqgan.py): small random state dicts in LlamaGen's and LDM's
layouts (conftest.released_file), loaded strictly through vqgan.load_tokenizer. CPU, no network."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vq
import vqgan
from cli import UserError
from conftest import released_file


@pytest.mark.parametrize("family, shape", [("llamagen", dict()), ("ldm", dict(z=4, d=4)),
                                           ("llamagen", dict(ch=64, ch_mult=(1, 1, 2), K=32))])
def test_released_layouts_load_strictly_and_keep_the_interface(tmp_path, family, shape):
    path = str(tmp_path / "released.pt")
    sd = released_file(path, family, **shape)
    model = vqgan.load_tokenizer(path)                      # the architecture comes from the tensors alone
    names = {"z": "z_channels", "K": "codebook_size", "d": "code_dim"}
    want = {"ch": 32, "ch_mult": (1, 2), "codebook_size": 64,
            **{names.get(k, k): v for k, v in shape.items()}}
    assert isinstance(model, vqgan.VQGAN) and model.cfg.family == family
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
            vqgan.load_tokenizer(path)


def test_llamagen_codes_are_nearest_among_normalised_rows(tmp_path):
    path = str(tmp_path / "vq_ds8.pt")
    sd = released_file(path, "llamagen", K=256)
    model = vqgan.load_tokenizer(path)
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
            vqgan.load_tokenizer(path)
        assert "\n" not in str(e.value)
    released_file(path, "ldm")
    open(path, "r+b").truncate(os.path.getsize(path) // 2)
    with pytest.raises(UserError, match="cannot read the tokenizer .*x.pt.*LDM"):
        vqgan.load_tokenizer(path)
