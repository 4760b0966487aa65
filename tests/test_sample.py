"""Tests for sample.py and fid.py: CPU, a tiny model trained in-process, a stub feature extractor, no network."""

import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import purrception
import sample
import vq
from cli import UserError
from conftest import StubExtractor
from prepare_data import SHAPES_CLASSES, make_shapes

# -----------------------------------------------------------------------------
# a tiny trained run, built once: 16x16 shapes of 4 classes, an 8x8 token grid of K=32 codes, a 1-layer DiT

C, K, S, STEPS = 4, 32, 16, 8


def write_data_folder(folder, images, labels, tokenizer):
    """A token folder as prepare_data.py writes it, for the given images and tokenizer."""
    os.makedirs(folder, exist_ok=True)
    vq.save_vq(tokenizer, os.path.join(folder, "vq.pt"), {"psnr": 20.0})
    tokens = tokenizer.encode(images).reshape(len(images), -1).numpy().astype(np.uint16)
    n = len(images) * 9 // 10
    for split, part in (("train", slice(0, n)), ("val", slice(n, None))):
        images[part].tofile(os.path.join(folder, f"{split}_images.u8"))
        tokens[part].tofile(os.path.join(folder, f"{split}.bin"))
        labels[part].astype(np.uint16).tofile(os.path.join(folder, f"{split}_labels.bin"))
    h = S // tokenizer.cfg.downsample
    meta = {"dataset": "tiny", "image_size": S, "grid_h": h, "grid_w": h, "codebook_size": tokenizer.cfg.codebook_size,
            "code_dim": tokenizer.cfg.code_dim, "num_classes": C, "class_names": list(SHAPES_CLASSES[:C]),
            "train_count": n, "val_count": len(images) - n, "tokenizer": "vq.pt"}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def tiny_tokenizer(images, K):
    torch.manual_seed(0)
    tokenizer = vq.VQVAE(vq.VQConfig(image_size=S, ch=16, n_res=1, codebook_size=K, code_dim=4))
    tokenizer(vq.to_float(images[:512]))                   # train mode: k-means init of the codes on the data
    return tokenizer.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    images, labels = make_shapes(1000, S, seed=0)
    keep = labels < C
    images, labels = images[keep], labels[keep]
    data, out = str(root / "data"), str(root / "out")
    write_data_folder(data, images, labels, tiny_tokenizer(images, K))
    torch.manual_seed(0)
    purrception.train(purrception.Config(
        dataset="tiny", data_dir=data, out_dir=out, n_layer=1, n_head=2, n_embd=32, batch_size=32, max_iters=100,
        lr=3e-3, warmup_iters=10, ema_decay=0.9, eval_interval=100, eval_iters=1, log_interval=1000, sample_steps=4,
        grid_cols=2, device="cpu", cfg_scale=1.5))
    return {"root": root, "data": data, "ckpt": os.path.join(out, "ckpt.pt"), "images": images}


def sample_main(run, out, *flags):
    return sample.main([f"--ckpt={run['ckpt']}", f"--out_dir={out}", f"--steps={STEPS}", *flags])


def png(path):
    return np.asarray(Image.open(path))


def cells(grid, rows, cols, pad=2):
    """Cut a grid written by sample.tile back into its (rows, cols, S, S, 3) images."""
    step = S + pad
    return np.stack([np.stack([grid[pad + r * step:pad + r * step + S, pad + c * step:pad + c * step + S]
                               for c in range(cols)]) for r in range(rows)])

# -----------------------------------------------------------------------------
# grids


def test_class_grid_has_a_row_per_class_and_is_seed_deterministic(run, tmp_path):
    path = sample_main(run, tmp_path / "a", "--num_samples=12")                      # 4 classes x 3 columns
    assert png(path).shape == (2 + C * (S + 2), 2 + 3 * (S + 2), 3)
    again = sample_main(run, tmp_path / "b", "--num_samples=12")
    assert open(path, "rb").read() == open(again, "rb").read()                        # same seed, same bytes
    other = sample_main(run, tmp_path / "c", "--num_samples=12", "--seed=1")
    assert not np.array_equal(png(path), png(other))


def test_class_label_by_name_index_and_null(run, tmp_path):
    by_name = png(sample_main(run, tmp_path / "a", "--class_label=square", "--num_samples=3"))
    by_index = png(sample_main(run, tmp_path / "b", "--class_label=1", "--num_samples=3"))
    assert by_name.shape == (2 + S + 2, 2 + 3 * (S + 2), 3) and np.array_equal(by_name, by_index)
    null = png(sample_main(run, tmp_path / "c", "--class_label=none", "--num_samples=10"))   # unconditional
    assert null.shape == (2 + 2 * (S + 2), 2 + 8 * (S + 2), 3)                                # rows of 8
    assert np.array_equal(null, png(sample_main(run, tmp_path / "d", "--class_label=-1", "--num_samples=10")))


def test_temperature_sweep_uses_the_same_noise_in_every_row(run, tmp_path):
    grid = png(sample_main(run, tmp_path / "a", "--temperature=0.8,0.8,0.8", "--num_samples=5"))
    assert grid.shape == (2 + 3 * (S + 2), 2 + 5 * (S + 2), 3)
    rows = cells(grid, 3, 5)
    assert np.array_equal(rows[0], rows[1]) and np.array_equal(rows[0], rows[2])
    # each row is what the sampler draws at that temperature from the seed's noise, labels cycling over classes
    sweep = cells(png(sample_main(run, tmp_path / "b", "--temperature=0.3,2.0", "--num_samples=5")), 2, 5)
    assert not np.array_equal(sweep[0], sweep[1])
    r = sample.load_run(run["ckpt"])
    for row, tau in zip(sweep, (0.3, 2.0)):
        images = sample.generate(r, np.arange(5) % C, STEPS, tau, r.ckpt["config"]["cfg_scale"], seed=0,
                                 batch_size=2)                                        # other batches, same noise
        assert np.array_equal(row, images)

# -----------------------------------------------------------------------------
# uncertainty and trajectory


def test_uncertainty_entropy_maps_shrink_as_t_goes_to_one(run, tmp_path):
    path, traj = sample_main(run, tmp_path, "--uncertainty", "--num_samples=2", "--frames=3", "--steps=10")
    # a row per sample: (mean image, entropy heatmap) at 3 times, then the final image, under a 12-pixel caption
    assert png(path).shape == (12 + 2 + 2 * (S + 2), 2 + 7 * (S + 2), 3)
    H = traj["entropy"]                                                               # (steps, n, h, w)
    assert H.shape == (10, 2, 8, 8) and traj["mu"].shape == (10, 2, 8, 8, 4)
    assert H.min() >= 0 and H.max() <= np.log(K) + 1e-4
    by_t = H.mean(dim=(1, 2, 3))
    assert by_t[0] > 0.8 * np.log(K)                     # at t = 0 most codes are still plausible ...
    assert by_t[-1] < by_t[0] - 1.0                      # ... near t = 1 the trained model has mostly decided


def test_colormap_runs_from_dark_to_bright():
    c = sample.colormap(np.linspace(0, 1, 11)).astype(int)
    assert c.shape == (11, 3) and c.dtype == int
    assert tuple(c[0]) == (0, 0, 4) and tuple(c[-1]) == (252, 253, 191)
    assert (np.diff(c.sum(axis=1)) > 0).all()                                        # brighter = more uncertain


def test_trajectory_strip_and_gif(run, tmp_path):
    path, traj = sample_main(run, tmp_path, "--trajectory", "--num_samples=3", "--frames=4")
    assert png(path).shape == (12 + 2 + 3 * (S + 2), 2 + 5 * (S + 2), 3)
    gif = Image.open(tmp_path / "trajectory.gif")
    assert gif.is_animated and gif.n_frames >= STEPS                                 # a frame per step, then the end
    assert len(traj["t"]) == STEPS and float(traj["t"][0]) == 0.0

# -----------------------------------------------------------------------------
# samples for FID tools, and FID itself


def test_npz_has_the_count_and_balanced_labels(run, tmp_path, capsys):
    out = sample_main(run, tmp_path, "--num_samples=10", "--save_npz=s.npz", "--batch_size=4")
    npz = np.load(tmp_path / "s.npz")
    assert npz["arr_0"].shape == (10, S, S, 3) and npz["arr_0"].dtype == np.uint8
    assert np.bincount(npz["arr_1"]).tolist() == [3, 3, 2, 2]                       # counts differ by at most 1
    assert np.array_equal(out["images"], npz["arr_0"]) and "images/s" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fid_from_the_command_line_with_a_stub_extractor(run, tmp_path, capsys):
    stub = str(tmp_path / "stub.pt")
    torch.jit.script(StubExtractor().eval()).save(stub)
    out = sample_main(run, tmp_path, "--fid", f"--fid_model={stub}", "--num_samples=8", "--fid_ref=40")
    assert np.isfinite(out["fid"]) and out["fid"] > 0
    printed = capsys.readouterr().out
    assert "offline TF-Inception" in printed and "8 samples vs 40 train images" in printed
    assert os.path.exists(os.path.join(run["data"], "fid_stats_stub_cpu_40.npz"))

# -----------------------------------------------------------------------------
# bad input: one line starting with "error:", no traceback


def another_tokenizer_folder(run):
    folder = str(run["root"] / "other-data")
    if not os.path.exists(folder):
        images = run["images"][:200]
        write_data_folder(folder, images, np.arange(200) % C, tiny_tokenizer(images, 16))   # K=16, not 32
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--class_label=cat"], "unknown class 'cat'; the classes are circle, square, triangle, plus"),
    (["--class_label=7"], "out of range"),
    (["--temperature=hot"], "--temperature takes numbers"),
    (["--temperature=0.5,0"], "temperatures must be positive"),
    (["--temperature=nan"], "temperatures must be positive finite"),
    (["--temperature=inf"], "temperatures must be positive finite"),
    (["--num_samples=x"], "--num_samples expects"),
    (["--uncertainy"], "did you mean --uncertainty"),
])
def test_bad_flags_fail_with_one_line(run, tmp_path, flags, message):
    with pytest.raises(UserError) as e:
        sample_main(run, tmp_path, *flags)
    assert "\n" not in str(e.value) and message in str(e.value)


def test_checkpoint_from_another_tokenizer_is_refused(run, tmp_path):
    with pytest.raises(UserError, match=r"K=32 codes of d=4 and 4 classes, but .* has K=16, d=4"):
        sample_main(run, tmp_path, f"--data_dir={another_tokenizer_folder(run)}")


def test_command_line_errors_are_one_line_without_traceback(run, tmp_path):
    for flags in ([f"--out_dir={tmp_path}"], [f"--ckpt={run['ckpt']}", f"--data_dir={another_tokenizer_folder(run)}"]):
        p = subprocess.run([sys.executable, "sample.py", *flags], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.abspath(sample.__file__)))
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr

# -----------------------------------------------------------------------------
# many samples in parts: any number of processes, resumable, written once


def npz_run(run, out, *flags):
    return sample_main(run, out, "--num_samples=12", "--batch_size=3", "--save_npz=s.npz", "--device=cpu", *flags)


@pytest.fixture(scope="module")
def one_process_npz(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    npz_run(run, out)
    return out / "s.npz"


def test_npz_is_the_adm_format_and_the_same_for_any_batch_size(run, one_process_npz, tmp_path, capsys):
    with np.load(one_process_npz) as f:
        assert sorted(f) == ["arr_0", "arr_1"] and f["arr_0"].shape == (12, S, S, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 1, 2, 3] * 3
        images = f["arr_0"]
    assert not os.path.exists(str(one_process_npz) + ".parts")                      # the parts are gone
    other = npz_run(run, tmp_path, "--batch_size=5")                               # other parts, same samples
    assert f"wrote {tmp_path / 's.npz'}" in capsys.readouterr().out
    assert np.array_equal(other["images"], images)


def test_two_torchrun_processes_write_the_same_bytes_as_one(run, one_process_npz, tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "sample.py",
                        f"--ckpt={run['ckpt']}", f"--out_dir={tmp_path}", f"--steps={STEPS}", "--num_samples=12",
                        "--batch_size=3", "--save_npz=s.npz", "--device=cpu"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(sample.__file__)),
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 processes" in r.stdout and (tmp_path / "s.npz").read_bytes() == one_process_npz.read_bytes()


def test_an_interrupted_run_resumes_from_its_finished_parts(run, one_process_npz, tmp_path, monkeypatch, capsys):
    calls, generate = [], sample.generate

    def dies_at_the_third_part(*args, **kwargs):
        calls.append(kwargs["start"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)
    monkeypatch.setattr(sample, "generate", dies_at_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        npz_run(run, tmp_path)
    assert sorted(os.listdir(tmp_path / "s.npz.parts")) == ["part_000000.npz", "part_000001.npz", "spec.json"]
    assert not (tmp_path / "s.npz").exists()
    with pytest.raises(UserError, match=r"holds parts of another run \(seed=0\)"):
        npz_run(run, tmp_path, "--seed=1")                                          # other settings: refused
    calls.clear()
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(k["start"]) or generate(*a, **k))
    capsys.readouterr()
    npz_run(run, tmp_path)
    assert calls == [6, 9]                                                          # only the missing parts
    assert (tmp_path / "s.npz").read_bytes() == one_process_npz.read_bytes()
    assert "6 samples in" in capsys.readouterr().out.splitlines()[-1]              # the rate counts only those


def test_a_write_over_a_file_size_limit_fails_in_one_line_and_keeps_the_old_file(run, one_process_npz, tmp_path,
                                                                                  monkeypatch):
    old = b"the previous samples"
    (tmp_path / "s.npz").write_bytes(old)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))       # parts fit, the whole does not
    p = subprocess.run([sys.executable, "sample.py", f"--ckpt={run['ckpt']}", f"--out_dir={tmp_path}",
                        f"--steps={STEPS}", "--num_samples=12", "--batch_size=3", "--save_npz=s.npz", "--device=cpu"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(sample.__file__)),
                       preexec_fn=limit)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().startswith("error: no space left on device writing") and "intact" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert (tmp_path / "s.npz").read_bytes() == old and not list(tmp_path.glob("*.tmp*"))
    assert len(list((tmp_path / "s.npz.parts").glob("part_*.npz"))) == 4           # kept: a rerun only assembles
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled again"))
    npz_run(run, tmp_path)
    assert (tmp_path / "s.npz").read_bytes() == one_process_npz.read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--save_npz=/nonexistent/dir/x.npz"], "the folder /nonexistent/dir does not exist"),
    (["--save_npz=."], "is a folder; name a file in it"),
    (["--save_npz=x.png"], "name a .npz file"),
    (["--save_npz=x.npz", "--trajectory"], "run them as two commands"),
])
def test_bad_npz_flags_are_refused_before_sampling(run, tmp_path, flags, message, monkeypatch):
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("sampled before refusing"))
    with pytest.raises(UserError, match=message):
        sample_main(run, tmp_path, *flags)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("flags, message", [
    (["--fid_model=/nonexistent/inception.pt"], "no feature extractor at /nonexistent/inception.pt"),
    (["--fid_model=PLACEHOLDER", "--fid_ref_dir=/nonexistent/val"], "no reference folder at"),
    (["--fid_model=PLACEHOLDER", "--fid_ref_stats=/nonexistent/ref.npz"], "no reference statistics"),
])
def test_a_missing_fid_extractor_or_reference_is_refused_before_sampling(run, tmp_path, flags, message,
                                                                          monkeypatch):
    torch.jit.script(StubExtractor().eval()).save(str(tmp_path / "stub.pt"))
    flags = [f.replace("PLACEHOLDER", str(tmp_path / "stub.pt")) for f in flags]
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    with pytest.raises(UserError, match=message):
        sample_main(run, tmp_path, "--fid", "--num_samples=4", *flags)


def test_a_fid_model_that_is_not_torchscript_is_one_line(run, tmp_path):
    bad = tmp_path / "not_a_model.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="is not a TorchScript file") as e:
        sample_main(run, tmp_path, "--fid", f"--fid_model={bad}", "--num_samples=4")
    assert "\n" not in str(e.value)
