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
    model = vqgan.load_tokenizer(path)              # the architecture comes from the tensors alone
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

# -----------------------------------------------------------------------------
# the released files by name, fetched once, from a server on 127.0.0.1 (never the internet)


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 serving `files` {path: bytes}; cut=True sends half a file with
    the whole length announced, then closes."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = Handler.files.get(self.path)
            if body is None:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if Handler.cut else body)

        def log_message(self, *args):
            pass
    Handler.files, Handler.cut = {}, False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_download_cut_halfway_never_counts_and_the_next_completes(server, tmp_path, monkeypatch):
    handler, root = server
    cache = tmp_path / "cache"
    monkeypatch.setenv("PURRCEPTION_CACHE", str(cache))
    released_file(tmp_path / "vq_ds8_c2i.pt", "llamagen")
    handler.files["/vq_ds8_c2i.pt"] = (tmp_path / "vq_ds8_c2i.pt").read_bytes()
    monkeypatch.setitem(vqgan.RELEASED, "llamagen-vq8", (f"{root}/vq_ds8_c2i.pt", None))
    handler.cut = True
    with pytest.raises(UserError, match=f"cannot download {root}/vq_ds8_c2i.pt .*stopped at .*; "
                                        f"download it by hand and put it at {cache}/vq_ds8_c2i.pt"):
        vqgan.load_tokenizer("llamagen-vq8")
    assert os.listdir(cache) == []                                   # no file, no temporary
    handler.cut = False
    model = vqgan.load_tokenizer("llamagen-vq8")
    assert os.listdir(cache) == ["vq_ds8_c2i.pt"]
    handler.files.clear()                                            # from now on, offline
    again = vqgan.load_tokenizer("llamagen-vq8")                     # the cached file, once
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))


def test_a_download_of_the_wrong_layout_never_counts_and_offline_is_one_line(server, tmp_path,
                                                                            monkeypatch):
    handler, root = server
    monkeypatch.setenv("PURRCEPTION_CACHE", str(tmp_path / "cache"))
    handler.files["/vq_ds16_c2i.pt"] = b"<html>a login page</html>"
    monkeypatch.setitem(vqgan.RELEASED, "llamagen-vq16", (f"{root}/vq_ds16_c2i.pt", None))
    with pytest.raises(UserError, match=f"{root}/vq_ds16_c2i.pt did not give the published "
                                        f"vq_ds16_c2i.pt .its layout is another."):
        vqgan.load_tokenizer("llamagen-vq16")
    assert os.listdir(tmp_path / "cache") == []
    handler.files.clear()
    with pytest.raises(UserError, match=f"cannot download {root}/vq_ds16_c2i.pt .*put it at") as e:
        vqgan.load_tokenizer("llamagen-vq16")
    assert "\n" not in str(e.value)


def test_ldms_zip_is_fetched_and_its_lightning_file_never_unpickled_unless_asked(server, tmp_path,
                                                                                 monkeypatch):
    import argparse
    import io
    import subprocess
    import sys
    import zipfile
    handler, root = server
    monkeypatch.setenv("PURRCEPTION_CACHE", str(tmp_path / "cache"))
    sd = released_file(tmp_path / "sd.pt", "ldm")
    lightning = io.BytesIO()                   # a Lightning file: weights and pickled objects
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(embed_dim=4)}, lightning)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("vq-f8/model.ckpt", lightning.getvalue())
    handler.files["/vq-f8.zip"] = archive.getvalue()
    monkeypatch.setitem(vqgan.RELEASED, "ldm-vqf8", (f"{root}/vq-f8.zip", None))
    with pytest.raises(UserError, match="pickled Python objects .* never unpickled here") as e:
        vqgan.load_tokenizer("ldm-vqf8")
    command = str(e.value).split("`")[1]
    assert command.startswith("python -c ")
    subprocess.run([sys.executable, "-c", command.split('"')[1]], check=True)     # asked, once
    model = vqgan.load_tokenizer(str(e.value).rsplit(" ", 1)[1])
    assert model.codebook.shape == sd["quantize.embedding.weight"].shape


def test_a_tokenizer_whose_weights_or_codebook_are_not_finite_is_refused(tmp_path):
    torch.manual_seed(0)
    model = vq.VQVAE(vq.VQConfig(image_size=8, ch=8, n_res=1, codebook_size=16, code_dim=4))
    vq.save_vq(model, str(tmp_path / "good.pt"))
    vqgan.load_tokenizer(str(tmp_path / "good.pt"))
    model.quantizer.embed[3, 0] = float("nan")                    # one code of the codebook
    vq.save_vq(model, str(tmp_path / "nan.pt"))
    with pytest.raises(UserError, match="nan.pt holds weights or a codebook that are not finite"):
        vqgan.load_tokenizer(str(tmp_path / "nan.pt"))
    sd = released_file(tmp_path / "released.pt", "llamagen")
    sd["decoder.conv_in.weight"][0, 0, 0, 0] = float("inf")       # a released layout too
    torch.save({"model": sd}, tmp_path / "released.pt")
    with pytest.raises(UserError, match="not finite"):
        vqgan.load_tokenizer(str(tmp_path / "released.pt"))
