"""Tests that a data folder loses nothing: SIGTERM and Ctrl-C during prepare_data.py, two runs on
one folder, read-only folders, images read as a viewer shows them, and hints that work when
typed. CPU, tiny tokenizers, no network; command lines run as subprocesses, data/ in tmp_path."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import encode_folder as ef
import prepare_data as pd
import token_folder as tf
import vq
from cli import UserError
from conftest import ROOT, as_ordinary_user, make_folder, released_file

TINY = ["--dataset=shapes", "--image_size=16", "--vq.ch=16", "--vq.n_res=1",
        "--vq.codebook_size=16", "--vq.code_dim=4", "--vq.max_iters=3", "--vq.batch_size=8",
        "--vq.eval_interval=3", "--vq.device=cpu"]

# prepare_data.py's command line with data/ at $DATA_ROOT and a tiny shapes set. With STOP_AT, once
# the file of that name is written whole (not yet renamed) it sends itself SIGNUM, or, without
# one, creates $READY and waits for $GO to exist.
PREPARE = """
import os, sys, time
sys.path.insert(0, {root!r})
import cli, prepare_data as pd
pd.DATA_ROOT, pd.SHAPES_COUNTS = os.environ["DATA_ROOT"], (64, 16)
real = cli.atomic_save
def atomic_save(write, path, size=None):
    def write_then_stop(tmp):
        write(tmp)
        if os.path.basename(path) == os.environ.get("STOP_AT"):
            if os.environ.get("SIGNUM"):
                os.kill(os.getpid(), int(os.environ["SIGNUM"]))
            open(os.environ["READY"], "w").close()
            while not os.path.exists(os.environ["GO"]):
                time.sleep(0.05)
    real(write_then_stop, path, size)
cli.atomic_save = atomic_save
cli.run(pd.main)
"""


def prepare(data_root, *args, background=False, **env):
    """Run prepare_data.py TINY args; -> the finished process, or (background) the running one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DATA_ROOT": str(data_root), **env}
    argv = [sys.executable, "-c", PREPARE.format(root=ROOT), *TINY, *args]
    if background:
        return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def files(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The files of an uninterrupted run."""
    data = tmp_path_factory.mktemp("reference")
    proc = prepare(data)
    assert proc.returncode == 0, proc.stderr
    return files(data / "shapes")

# -----------------------------------------------------------------------------
# SIGTERM and SIGINT: the file in progress dropped, one line, the same command continues


@pytest.mark.parametrize("signum, moment, kept", [
    (signal.SIGTERM, "vq_partial.pt", "the images in "),
    (signal.SIGINT, "train.bin", "the images and the tokenizer in ")])
def test_a_signal_while_preparing_keeps_whole_files_and_the_same_command_continues(
        reference, tmp_path, signum, moment, kept):
    proc = prepare(tmp_path, STOP_AT=moment, SIGNUM=str(int(signum)))
    assert proc.returncode == -signum, proc.stderr                      # ended by the signal
    lines = proc.stderr.strip().splitlines()
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {name}: {kept}"), proc.stderr
    assert lines[0].endswith("are kept; the same command continues"), lines[0]
    left = sorted(os.listdir(tmp_path / "shapes"))
    assert not [f for f in left if ".tmp-" in f or "partial" in f or f == "run.lock"], left
    assert all((tmp_path / "shapes" / f).read_bytes() == reference[f] for f in left
               if f != "meta.json"), "a kept file is not the uninterrupted run's"
    proc = prepare(tmp_path)                                            # the same command
    assert proc.returncode == 0, proc.stderr
    assert files(tmp_path / "shapes") == reference


def test_two_runs_on_one_folder_the_second_is_refused_and_the_first_ends_intact(reference,
                                                                                 tmp_path):
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = prepare(tmp_path, background=True, STOP_AT="train_images.u8", READY=str(ready),
                    GO=str(go))
    try:
        deadline = time.time() + 120
        while not ready.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), first.stderr.read() if first.poll() is not None else "no start"
        second = prepare(tmp_path, "--seed=1")
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip()
        assert "\n" not in line, line
        assert line.startswith(f"error: {tmp_path / 'shapes'} is in use by "), line
        assert f"(pid {first.pid} on " in line and "--name=OTHER" in line, line
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert files(tmp_path / "shapes") == reference

# -----------------------------------------------------------------------------
# read-only folders: one line naming the folder, before any image is read


SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import cli, prepare_data as pd, encode_folder as ef
pd.DATA_ROOT = os.environ["DATA_ROOT"]
cli.run(ef.main if sys.argv[1] == "encode" else pd.main, sys.argv[2:])
"""


@pytest.mark.parametrize("command", ["prepare", "encode"])
def test_a_read_only_data_folder_is_refused_in_one_line_before_any_image_is_read(tmp_path,
                                                                                 command):
    root = make_folder(tmp_path / "images", per_class=3, classes=("a", "b"))
    (root / "a" / "broken.png").write_bytes(b"not a png")    # read, it would be the error
    released_file(str(tmp_path / "tok.pt"), "llamagen")
    flags = {"prepare": ["--dataset=imagefolder", "--image_size=16"],
             "encode": [f"--tokenizer={tmp_path / 'tok.pt'}", "--image_size=16", "--workers=0",
                        "--device=cpu"]}[command]
    data = tmp_path / "data"
    (data / "made").mkdir(parents=True)
    (data / "made" / "meta.json").write_text("{}")
    before = files(data / "made")
    for folder, name in ((data / "made", "made"), (data, "new")):     # data/NAME, then data/
        os.chmod(folder, 0o555)
        try:
            r = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT), command,
                                f"--data_dir={root}", f"--name={name}", *flags],
                               env={**os.environ, "DATA_ROOT": str(data), "OMP_NUM_THREADS": "1"},
                               capture_output=True, text=True, timeout=120,
                               preexec_fn=as_ordinary_user())
        finally:
            os.chmod(folder, 0o755)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"error: cannot write into {folder} "), r.stderr
        assert "broken.png" not in r.stderr
    assert files(data / "made") == before and sorted(os.listdir(data)) == ["made"]

# -----------------------------------------------------------------------------
# images as a viewer shows them


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint16), (16, 1))          # (16, 16) ramp
    Image.fromarray(grey * 257).save(tmp_path / "deep.png")                   # 16 bits: 0..65535
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    image = pd.load_image(str(tmp_path / "deep.png"), 16)
    assert image.shape == (16, 16, 3) and np.array_equal(image, np.stack([grey] * 3, -1))
    rgb = np.stack([grey, 255 - grey, grey // 2], -1).astype(np.uint8)
    for mode, im in (("I", Image.fromarray(grey.astype(np.int32) * 257)),
                     ("F", Image.fromarray(grey.astype(np.float32) / 255)),
                     ("LA", Image.fromarray(grey.astype(np.uint8)).convert("LA")),
                     ("RGBA", Image.fromarray(rgb).convert("RGBA")),
                     ("P", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE))):
        assert im.mode == mode
        want = rgb if mode in ("RGBA", "P") else np.stack([grey] * 3, -1)
        have = np.asarray(pd.to_rgb(im))
        assert np.array_equal(have, want), mode


def test_an_exif_rotated_jpeg_is_read_upright(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)            # as the sensor wrote it: red above blue
    stored[:8] = (255, 0, 0)
    stored[8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                                    # orientation: shown turned 90 degrees right
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = pd.load_image(str(tmp_path / "photo.jpg"), 16).astype(int)      # 16 wide, 32 high
    left, right = image[:, :6].mean((0, 1)), image[:, -6:].mean((0, 1))
    assert left[2] > 200 and left[0] < 60 and right[0] > 200 and right[2] < 60, (left, right)

# -----------------------------------------------------------------------------
# every remedy of a tokenizer that is not the one that made the tokens, typed back in


def type_in(hint):
    """Run each command between backticks in hint as typed (`rm FILE && python SCRIPT ...`), in
    this process: the monkeypatched data root holds. -> the commands run."""
    commands = hint.split("`")[1::2]
    assert commands, hint
    for command in commands:
        for words in (shlex.split(part) for part in command.split("&&")):
            if words[0] == "rm":
                os.remove(words[1])
                continue
            assert words[0] == "python", hint
            script = {os.path.realpath(m.__file__): m for m in (pd, ef)}[
                os.path.realpath(words[1])]
            script.main(words[2:])
    return commands


def vq_file(path, seed=0, image_size=16, trained_on="shapes", **shape):
    cfg = vq.VQConfig(image_size=image_size, **{"ch": 16, "n_res": 1, "codebook_size": 16,
                                                "code_dim": 4, **shape})
    u8 = np.random.default_rng(seed).integers(0, 256, (16, image_size, image_size, 3), np.uint8)
    vq.train_vq(u8, u8[:4], cfg, str(path), max_iters=1, batch_size=4, eval_interval=1,
                seed=seed, log=lambda *a: None, trained_on=trained_on)


def test_every_remedy_of_a_tokenizer_mismatch_works_when_typed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setattr(pd, "SHAPES_COUNTS", (64, 16))
    pd.main(TINY)
    folder = tmp_path / "data" / "shapes"
    tokenizer = folder / "vq.pt"
    cases = {"missing": lambda: tokenizer.unlink(),
             "another size": lambda: vq_file(tokenizer, image_size=8),
             "another K": lambda: vq_file(tokenizer, codebook_size=8),
             "retrained here": lambda: vq_file(tokenizer, seed=5),
             "another folder's": lambda: vq_file(tokenizer, seed=6, trained_on="other")}
    for case, damage in cases.items():
        damage()
        with pytest.raises(UserError) as e:
            tf.open_folder(str(folder))
        assert "\n" not in str(e.value)
        commands = type_in(str(e.value))
        assert (case == "retrained here") == ("retokenize with this one" in str(e.value)), e.value
        assert commands[-1].startswith(f"rm {tokenizer} && ") == (case in (
            "another size", "another K", "another folder's")), (case, e.value)
        meta, model = tf.open_folder(str(folder))               # what training reads: accepted
        assert meta["tokenizer_sha1"] == vq.file_sha1(tokenizer), case
    capsys.readouterr()
    # a folder encoded from a tokenizer file, whose pointer to that file is gone or replaced
    root = make_folder(tmp_path / "images", per_class=4, classes=("a", "b"))
    for seed in (0, 1):
        released_file(str(tmp_path / f"tok{seed}.pt"), "llamagen", seed=seed)
    ef.main([f"--data_dir={root}", "--name=streamed", f"--tokenizer={tmp_path / 'tok0.pt'}",
             "--image_size=16", "--workers=0", "--device=cpu"])
    streamed = tmp_path / "data" / "streamed"
    cases = {"missing": lambda: (streamed / "vq.pt").unlink(),
             "replaced": lambda: vq.save_pointer(str(streamed / "vq.pt"),
                                                 str(tmp_path / "tok1.pt"), 16)}
    for case, damage in cases.items():
        damage()
        with pytest.raises(UserError, match="encode_folder.py .*--force") as e:
            tf.open_folder(str(streamed))
        type_in(str(e.value))
        meta, _ = tf.open_folder(str(streamed))
        assert meta["released_tokenizer"] == str(tmp_path / "tok0.pt"), case
    assert json.load(open(streamed / "source.json"))["name"] == "streamed"
