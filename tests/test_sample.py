"""Tests for sample.py: CPU, a tiny model trained in-process, no network."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import purrception
import sample
import vq
from cli import UserError
from prepare_data import SHAPES_CLASSES, make_shapes

# -----------------------------------------------------------------------------
# a tiny trained run, built once: 16x16 shapes of 4 classes, an 8x8 token grid of K=32 codes,
# a 1-layer DiT

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
    meta = {"dataset": "tiny", "image_size": S, "grid_h": h, "grid_w": h,
            "codebook_size": tokenizer.cfg.codebook_size, "code_dim": tokenizer.cfg.code_dim,
            "num_classes": C, "class_names": list(SHAPES_CLASSES[:C]), "train_count": n,
            "val_count": len(images) - n, "tokenizer": "vq.pt"}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def tiny_tokenizer(images, K):
    torch.manual_seed(0)
    tokenizer = vq.VQVAE(vq.VQConfig(image_size=S, ch=16, n_res=1, codebook_size=K, code_dim=4))
    tokenizer(vq.to_float(images[:512]))        # train mode: k-means init of the codes on the data
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
        dataset="tiny", data_dir=data, out_dir=out, n_layer=1, n_head=2, n_embd=32, batch_size=32,
        max_iters=100, lr=3e-3, warmup_iters=10, ema_decay=0.9, eval_interval=100, eval_iters=1,
        log_interval=1000, sample_steps=4, grid_cols=2, device="cpu", cfg_scale=1.5))
    return {"root": root, "data": data, "ckpt": os.path.join(out, "ckpt.pt"), "images": images}


def sample_main(run, out, *flags):
    return sample.main([f"--ckpt={run['ckpt']}", f"--out_dir={out}", f"--steps={STEPS}", *flags])


def png(path):
    return np.asarray(Image.open(path))


def cells(grid, rows, cols, pad=2):
    """Cut a grid written by sample.tile back into its (rows, cols, S, S, 3) images."""
    step = S + pad
    return np.stack([np.stack([grid[pad + r * step:pad + r * step + S,
                                    pad + c * step:pad + c * step + S]
                               for c in range(cols)]) for r in range(rows)])

# -----------------------------------------------------------------------------
# grids


def test_class_grid_has_a_row_per_class_and_is_seed_deterministic(run, tmp_path):
    path = sample_main(run, tmp_path / "a", "--num_samples=12")          # 4 classes x 3 columns
    assert png(path).shape == (2 + C * (S + 2), 2 + 3 * (S + 2), 3)
    again = sample_main(run, tmp_path / "b", "--num_samples=12")
    assert open(path, "rb").read() == open(again, "rb").read()            # same seed, same bytes
    other = sample_main(run, tmp_path / "c", "--num_samples=12", "--seed=1")
    assert not np.array_equal(png(path), png(other))


def test_class_label_by_name_index_and_null(run, tmp_path):
    by_name = png(sample_main(run, tmp_path / "a", "--class_label=square", "--num_samples=3"))
    by_index = png(sample_main(run, tmp_path / "b", "--class_label=1", "--num_samples=3"))
    assert by_name.shape == (2 + S + 2, 2 + 3 * (S + 2), 3) and np.array_equal(by_name, by_index)
    null = png(sample_main(run, tmp_path / "c", "--class_label=none",
                           "--num_samples=10"))                               # unconditional
    assert null.shape == (2 + 2 * (S + 2), 2 + 8 * (S + 2), 3)                # rows of 8
    assert np.array_equal(null, png(sample_main(run, tmp_path / "d", "--class_label=-1",
                                                "--num_samples=10")))


def test_temperature_sweep_uses_the_same_noise_in_every_row(run, tmp_path):
    grid = png(sample_main(run, tmp_path / "a", "--temperature=0.8,0.8,0.8", "--num_samples=5"))
    assert grid.shape == (2 + 3 * (S + 2), 2 + 5 * (S + 2), 3)
    rows = cells(grid, 3, 5)
    assert np.array_equal(rows[0], rows[1]) and np.array_equal(rows[0], rows[2])
    # each row is what the sampler draws at that temperature from the seed's noise, labels
    # cycling over classes
    sweep = cells(png(sample_main(run, tmp_path / "b", "--temperature=0.3,2.0",
                                  "--num_samples=5")), 2, 5)
    assert not np.array_equal(sweep[0], sweep[1])
    sampler = sample.load_sampler(run["ckpt"])
    for row, tau in zip(sweep, (0.3, 2.0)):
        images = sample.generate(sampler, np.arange(5) % C, STEPS, tau,
                                 sampler.ckpt["config"]["cfg_scale"], seed=0,
                                 batch_size=2)                        # other batches, same noise
        assert np.array_equal(row, images)

# -----------------------------------------------------------------------------
# uncertainty and trajectory


def test_uncertainty_entropy_maps_shrink_as_t_goes_to_one(run, tmp_path):
    path, traj = sample_main(run, tmp_path, "--uncertainty", "--num_samples=2", "--frames=3",
                             "--steps=10")
    # a row per sample: (mean image, entropy heatmap) at 3 times, then the final image, under a
    # 12-pixel caption
    assert png(path).shape == (12 + 2 + 2 * (S + 2), 2 + 7 * (S + 2), 3)
    H = traj["entropy"]                                                   # (steps, n, h, w)
    assert H.shape == (10, 2, 8, 8) and traj["mu"].shape == (10, 2, 8, 8, 4)
    assert H.min() >= 0 and H.max() <= np.log(K) + 1e-4
    by_t = H.mean(dim=(1, 2, 3))
    assert by_t[0] > 0.8 * np.log(K)             # at t = 0 most codes are still plausible ...
    assert by_t[-1] < by_t[0] - 1.0              # ... near t = 1 the trained model mostly decided


def test_colormap_runs_from_dark_to_bright():
    c = sample.colormap(np.linspace(0, 1, 11)).astype(int)
    assert c.shape == (11, 3) and c.dtype == int
    assert tuple(c[0]) == (0, 0, 4) and tuple(c[-1]) == (252, 253, 191)
    assert (np.diff(c.sum(axis=1)) > 0).all()                       # brighter = more uncertain


def test_trajectory_strip_and_gif(run, tmp_path):
    path, traj = sample_main(run, tmp_path, "--trajectory", "--num_samples=3", "--frames=4")
    assert png(path).shape == (12 + 2 + 3 * (S + 2), 2 + 5 * (S + 2), 3)
    gif = Image.open(tmp_path / "trajectory.gif")
    assert gif.is_animated and gif.n_frames >= STEPS           # a frame per step, then the end
    assert len(traj["t"]) == STEPS and float(traj["t"][0]) == 0.0

# -----------------------------------------------------------------------------
# bad input: one line starting with "error:", no traceback


def another_tokenizer_folder(run):
    folder = str(run["root"] / "other-data")
    if not os.path.exists(folder):
        images = run["images"][:200]
        write_data_folder(folder, images, np.arange(200) % C,
                          tiny_tokenizer(images, 16))                     # K=16, not 32
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
    for flags in ([f"--out_dir={tmp_path}"],
                  [f"--ckpt={run['ckpt']}", f"--data_dir={another_tokenizer_folder(run)}"]):
        p = subprocess.run([sys.executable, "sample.py", *flags], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.abspath(sample.__file__)))
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert p.stderr.strip().startswith("error:"), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
