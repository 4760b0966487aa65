"""Nothing lost, nothing run: divergence, mistaken starts, damaged files and crafted data end in one
line with nothing on disk changed. CPU, tiny data, seconds."""

import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

import cli
import prepare_data as pd
import sample
import vq
from cli import UserError
from purrception import train
from conftest import K, ROOT, tiny_config



def snapshot(folder):
    """Every file under folder with its bytes: 'nothing on disk changed' is
    snapshot(before) == snapshot(after)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.fixture
def run_dir(data_dir, tmp_path):
    """A copy of the fake token folder and a finished 3-iteration run in tmp_path/out."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    train(tiny_config(data, tmp_path / "out", max_iters=3))
    return data, tmp_path / "out"

# -----------------------------------------------------------------------------
# divergence and mistaken starts


def test_a_diverging_run_stops_within_a_log_interval_and_keeps_the_last_good_checkpoint(run_dir):
    data, out = run_dir
    before = snapshot(out)
    with pytest.raises(UserError, match=r"at iter \d+: training diverged, the last good checkpoint "
                                        r".* untouched; try a lower --lr"):
        train(tiny_config(data, out, lr=1e6, max_iters=60, eval_interval=3, log_interval=5,
                          init_from="resume", grad_clip=0.0, warmup_iters=0))
    # nothing replaced
    assert snapshot(out) == before
    assert cli.load_checkpoint(str(out / "ckpt.pt"))["iter"] == 3            # and it still loads


def test_a_start_from_scratch_never_replaces_a_checkpoint_by_accident(run_dir):
    data, out = run_dir
    before = snapshot(out)
    with pytest.raises(UserError, match="ckpt.pt exists; continue it with --init_from=resume, or "
                                        "start over with --overwrite=true"):
        train(tiny_config(data, out, max_iters=6))
    # and a start that fails
    (data / "val.bin").write_bytes((data / "val.bin").read_bytes()[:-3])
    with pytest.raises(UserError, match="val.bin holds .* bytes where meta.json says"):
        train(tiny_config(data, out, max_iters=6, overwrite=True))
    # ckpt.pt and config.json
    assert snapshot(out) == before


def test_impossible_flags_fail_before_anything_is_written(data_dir, tmp_path):
    for flag, value in (("n_layer", 0), ("batch_size", -1), ("batch_size", 0), ("sample_steps", 0),
                        ("init_from", "latest"), ("ema_decay", 1.0), ("temperature", 0.0)):
        with pytest.raises(UserError, match=f"--{flag}={value} is impossible"):
            train(tiny_config(data_dir, tmp_path / "out", **{flag: value}))
    assert not os.path.exists(tmp_path / "out")

# -----------------------------------------------------------------------------
# damaged or mismatched files: one line naming the file


def test_damaged_token_folders_are_named(data_dir, tmp_path):
    cases = {
        "train.bin": (lambda p: p.write_bytes(p.read_bytes()[:-2]), "train.bin holds .* bytes"),
        "meta.json": (lambda p: p.write_text(p.read_text()[:40]), "meta.json is not valid JSON"),
        "train_labels.bin": (lambda p: p.write_bytes(np.full(64, 7, np.uint16).tobytes()),
                             "holds 7, but meta.json"),
        "vq.pt": (lambda p: vq.save_vq(vq.VQVAE(vq.VQConfig(image_size=8, ch=8, n_res=1,
                                                            codebook_size=2 * K, code_dim=4)),
                                       str(p)), f"has K={2 * K}"),
    }
    for name, (damage, message) in cases.items():
        data = tmp_path / name
        shutil.copytree(data_dir, data)
        damage(data / name)
        with pytest.raises(UserError, match=message):
            train(tiny_config(data, tmp_path / "out"))
        assert not os.path.exists(tmp_path / "out"), name


def test_truncated_and_non_finite_checkpoints_are_refused_by_resume_and_sample(run_dir, tmp_path):
    data, out = run_dir
    good = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="cannot read .*ckpt.pt .* truncated or not a checkpoint"):
        train(tiny_config(data, out, max_iters=6, init_from="resume"))
    with pytest.raises(UserError, match="truncated or not a checkpoint"):
        sample.main([f"--out_dir={out}", "--steps=2"])
    ckpt = torch.load(io.BytesIO(good), weights_only=True)
    next(iter(ckpt["ema"].values())).fill_(float("nan"))
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(UserError, match="non-finite weights"):
        sample.main([f"--out_dir={out}", "--steps=2"])


def test_meta_json_cut_short_is_one_line_everywhere(run_dir, tmp_path, monkeypatch):
    data, out = run_dir
    (data / "meta.json").write_text('{"dataset": "fake", "image_si')
    with pytest.raises(UserError, match="meta.json is not valid JSON"):
        sample.main([f"--out_dir={out}", "--steps=2"])
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path))
    shutil.copytree(data, tmp_path / "shapes")
    with pytest.raises(UserError, match="meta.json is not valid JSON"):
        pd.prepare("shapes", log=lambda *a: None)


def test_prepare_refuses_a_tokenizer_trained_for_other_images(tmp_path, monkeypatch):
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path))
    monkeypatch.setattr(pd, "SHAPES_COUNTS", (64, 16))
    tiny = dict(ch=16, n_res=1, codebook_size=16, code_dim=4, max_iters=3, batch_size=8,
                eval_interval=3)
    quiet = lambda *a: None
    pd.prepare("shapes", vq_overrides=tiny, log=quiet)
    pd.prepare("shapes", name="other", seed=1, vq_overrides=tiny, log=quiet)
    # a foreign tokenizer
    shutil.copy(tmp_path / "other" / "vq.pt", tmp_path / "shapes" / "vq.pt")
    before = snapshot(tmp_path / "shapes")
    with pytest.raises(UserError, match="vq.pt was trained for other images .other, 16px."):
        pd.prepare("shapes", vq_overrides=tiny, log=quiet)
    assert snapshot(tmp_path / "shapes") == before

# -----------------------------------------------------------------------------
# no code runs from data; long work shows progress in a log


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


def test_a_crafted_cifar_batch_does_not_execute(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match="not a complete CIFAR-10 python copy .*(posix|nt).system"):
        pd.load_cifar10(str(folder))
    assert not os.path.exists(MARKER)
    # the tarball path: md5 first
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(UserError, match="md5"):
        pd.load_cifar10(str(tmp_path / "t.tar.gz"))
    assert not os.path.exists(MARKER)


def test_long_work_prints_progress_lines_with_rate_and_eta_when_not_a_terminal(capsys, monkeypatch,
                                                                              tmp_path):
    # a line per step, for the test
    monkeypatch.setattr(cli, "PROGRESS_EVERY", 0.0)
    images = pd.make_shapes(32, 16)[0]
    cfg = vq.VQConfig(image_size=16, ch=8, n_res=1, codebook_size=8, code_dim=4)
    model = vq.train_vq(images, images[:8], cfg, str(tmp_path / "vq.pt"), max_iters=3, batch_size=8,
                        eval_interval=100, log=lambda *a: None)
    pd.tokenize(model, images, str(tmp_path / "t.bin"), batch_size=8, log=lambda *a: None)
    out = capsys.readouterr().out
    assert "vq: 1/3 iter (" in out and "iter/s, ETA" in out and "tokenize: 2/4 batch (" in out

# -----------------------------------------------------------------------------
# kill -9 at any moment loses at most one eval interval, and the resumed run is
# the uninterrupted one


def test_kill_9_during_training_then_resume_finishes_the_same_run(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "killed", max_iters=80, eval_interval=4, log_interval=4)
    flags = [f"--{k}={v}" for k, v in vars(cfg).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "purrception.py"), *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "ckpt.pt"
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    # somewhere mid-run
    time.sleep(0.1)
    if proc.poll() is not None:
        pytest.fail(f"the run ended (status {proc.returncode}) before it could be killed: "
                    "nothing was tested")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    # it loads: never half-written
    done = cli.load_checkpoint(str(ckpt))["iter"]
    assert 4 <= done < 80
    train(tiny_config(data_dir, tmp_path / "killed", max_iters=80, eval_interval=4, log_interval=4,
                      init_from="resume"))
    train(tiny_config(data_dir, tmp_path / "straight", max_iters=80, eval_interval=4,
                      log_interval=4))
    a, b = (torch.load(p / "ckpt.pt", weights_only=True)
            for p in (tmp_path / "killed", tmp_path / "straight"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


# SIGTERM (a scheduler's) and SIGINT (Ctrl-C) in the middle of a checkpoint save: the save is
# dropped, no temporary or lock is left, one line says what is kept, and the resumed run is
# the uninterrupted one
STOP_DURING_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import cli, purrception
real, saves = torch.save, []
def save(obj, f, *args, **kwargs):      # the second checkpoint: written whole, not yet renamed
    real(obj, f, *args, **kwargs)
    saves.append(f)
    if len(saves) == 2:
        os.kill(os.getpid(), {signum})
torch.save = save
cli.run(purrception.main)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_checkpoint_save_drops_it_cleanly_and_the_run_resumes(data_dir, tmp_path,
                                                                                signum):
    cfg = lambda folder, **kw: tiny_config(data_dir, tmp_path / folder, max_iters=9, **kw)
    flags = [f"--{k}={v}" for k, v in vars(cfg("stopped")).items()]
    code = STOP_DURING_SAVE.format(root=ROOT, signum=int(signum))
    proc = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == -signum                                      # ended by the signal
    lines = proc.stderr.strip().splitlines()
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {name}: "), proc.stderr
    assert "(iter 3) is kept; continue with `" in lines[0] and "--init_from=resume`" in lines[0]
    assert sorted(os.listdir(tmp_path / "stopped")) == ["ckpt.pt", "config.json",  # whole files
                                                        "samples_000003.png", "samples_000006.png"]
    assert cli.load_checkpoint(str(tmp_path / "stopped" / "ckpt.pt"))["iter"] == 3
    train(cfg("stopped", init_from="resume"))
    train(cfg("straight"))
    a, b = (torch.load(tmp_path / p / "ckpt.pt", weights_only=True)
            for p in ("stopped", "straight"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
