"""Tests for sample_ddp.py: many samples into ADM's npz, in parts, by any number of processes,
resumable, then FID. CPU, a tiny run on conftest's token folder, a stub feature extractor."""

import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import cli
import sample
import sample_ddp
from cli import UserError
from conftest import GRID, StubExtractor, tiny_config
from purrception import train

S, STEPS = 2 * GRID, 8                              # conftest's 8x8 images, a 4x4 token grid
HERE = os.path.dirname(os.path.abspath(sample_ddp.__file__))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A short training on a copy of conftest's token folder, given train images for FID."""
    root = tmp_path_factory.mktemp("run")
    shutil.copytree(data_dir, root / "data")
    images = np.random.default_rng(0).integers(0, 256, (64, S, S, 3), dtype=np.uint8)
    images.tofile(root / "data" / "train_images.u8")
    torch.manual_seed(0)
    train(tiny_config(root / "data", root / "out"))
    return {"data": str(root / "data"), "ckpt": str(root / "out" / "ckpt.pt")}


def ddp_flags(run, out, *flags):
    return [f"--ckpt={run['ckpt']}", f"--out_dir={out}", f"--steps={STEPS}", "--device=cpu", *flags]


def ddp_main(run, out, *flags):
    return sample_ddp.main(ddp_flags(run, out, *flags))


NPZ_RUN = ("--num_samples=12", "--batch_size=3", "--save_npz=s.npz")


def npz_run(run, out, *flags):
    return ddp_main(run, out, *NPZ_RUN, *flags)


@pytest.fixture(scope="module")
def one_process_npz(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    npz_run(run, out)
    return out / "s.npz"


@pytest.fixture
def stub(tmp_path):
    torch.jit.script(StubExtractor().eval()).save(str(tmp_path / "stub.pt"))
    return str(tmp_path / "stub.pt")

# -----------------------------------------------------------------------------
# the npz and FID


def test_npz_has_the_count_and_balanced_labels(run, tmp_path, capsys):
    out = ddp_main(run, tmp_path, "--num_samples=10", "--save_npz=s.npz", "--batch_size=4")
    npz = np.load(tmp_path / "s.npz")
    assert npz["arr_0"].shape == (10, S, S, 3) and npz["arr_0"].dtype == np.uint8
    assert np.bincount(npz["arr_1"]).tolist() == [4, 3, 3]          # counts differ by at most 1
    assert np.array_equal(out["images"], npz["arr_0"]) and "images/s" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fid_from_the_command_line_with_a_stub_extractor(run, tmp_path, capsys, stub):
    out = ddp_main(run, tmp_path, "--fid", f"--fid_model={stub}", "--num_samples=8",
                   "--fid_ref=40")
    assert np.isfinite(out["fid"]) and out["fid"] > 0
    printed = capsys.readouterr().out
    assert "offline TF-Inception" in printed and "8 samples vs 40 train images" in printed
    assert os.path.exists(os.path.join(run["data"], "fid_stats_stub_cpu_40.npz"))
    with np.load(tmp_path / "samples.npz") as f:                   # --save_npz's default name
        assert np.array_equal(f["arr_0"], out["images"])

# -----------------------------------------------------------------------------
# many samples in parts: any number of processes, resumable, written once


def test_npz_is_the_adm_format_and_the_same_for_any_batch_size(run, one_process_npz, tmp_path,
                                                              capsys):
    with np.load(one_process_npz) as f:
        assert sorted(f) == ["arr_0", "arr_1"] and f["arr_0"].shape == (12, S, S, 3)
        assert f["arr_0"].dtype == np.uint8 and f["arr_1"].tolist() == [0, 1, 2] * 4
        images = f["arr_0"]
    assert not os.path.exists(str(one_process_npz) + ".parts")          # the parts are gone
    other = npz_run(run, tmp_path, "--batch_size=5")                   # other parts, same samples
    assert f"wrote {tmp_path / 's.npz'}" in capsys.readouterr().out
    assert np.array_equal(other["images"], images)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_two_torchrun_processes_write_the_same_bytes_as_one(run, one_process_npz, tmp_path, stub):
    # no --save_npz: the processes meet at its default, out_dir/samples.npz; the first then
    # computes the FID
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "sample_ddp.py", *ddp_flags(run, tmp_path, "--num_samples=12",
                                                    "--batch_size=3", "--fid",
                                                    f"--fid_model={stub}", "--fid_ref=40")],
                       capture_output=True, text=True, cwd=HERE,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 processes" in r.stdout
    assert (tmp_path / "samples.npz").read_bytes() == one_process_npz.read_bytes()
    assert "FID " in r.stdout and "12 samples vs 40 train images" in r.stdout


def test_an_interrupted_run_resumes_from_its_finished_parts(run, one_process_npz, tmp_path,
                                                            monkeypatch, capsys):
    calls, generate = [], sample.generate

    def dies_at_the_third_part(*args, **kwargs):
        calls.append(kwargs["start"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)
    monkeypatch.setattr(sample, "generate", dies_at_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        npz_run(run, tmp_path)
    assert sorted(os.listdir(tmp_path / "s.npz.parts")) == ["part_000000.npz", "part_000001.npz",
                                                            "spec.json"]
    assert not (tmp_path / "s.npz").exists()
    with pytest.raises(UserError, match=r"holds parts of another run \(seed=0\)"):
        npz_run(run, tmp_path, "--seed=1")                                 # other settings: refused
    calls.clear()
    monkeypatch.setattr(sample, "generate",
                        lambda *a, **k: calls.append(k["start"]) or generate(*a, **k))
    capsys.readouterr()
    npz_run(run, tmp_path)
    assert calls == [6, 9]                                                 # only the missing parts
    assert (tmp_path / "s.npz").read_bytes() == one_process_npz.read_bytes()
    assert "6 samples in" in capsys.readouterr().out.splitlines()[-1]     # the rate: only those


def test_a_write_over_a_file_size_limit_fails_in_one_line_and_keeps_the_old_file(
        run, one_process_npz, tmp_path, monkeypatch):
    old = b"the previous samples"
    (tmp_path / "s.npz").write_bytes(old)
    # the parts fit, and so do the images' bytes (checked before sampling), but not the whole file
    images = np.load(one_process_npz)["arr_0"].nbytes
    cap = (images + os.path.getsize(one_process_npz)) // 2
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
    p = subprocess.run([sys.executable, "sample_ddp.py", *ddp_flags(run, tmp_path, *NPZ_RUN)],
                       capture_output=True, text=True, cwd=HERE, preexec_fn=limit)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().startswith("error: no space left on device writing")
    assert "intact" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert (tmp_path / "s.npz").read_bytes() == old and not list(tmp_path.glob("*.tmp*"))
    assert len(list((tmp_path / "s.npz.parts").glob("part_*.npz"))) == 4   # kept: a rerun assembles
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled again"))
    npz_run(run, tmp_path)
    assert (tmp_path / "s.npz").read_bytes() == one_process_npz.read_bytes()

def test_samples_that_cannot_fit_are_refused_before_sampling(run, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled first"))
    monkeypatch.setattr(cli, "_free_bytes", lambda path: 1000)
    with pytest.raises(UserError, match="the samples need .* but only .* are free there; make "
                                        "room and run again"):
        ddp_main(run, tmp_path, "--save_npz=s.npz", "--num_samples=12")
    assert not os.path.exists(tmp_path / "s.npz.parts")


# -----------------------------------------------------------------------------
# bad input, refused before sampling


@pytest.mark.parametrize("flags, message", [
    (["--save_npz=/nonexistent/dir/x.npz"], "the folder /nonexistent/dir does not exist"),
    (["--save_npz=."], "is a folder; name a file in it"),
    (["--save_npz=x.png"], "name a .npz file"),
])
def test_bad_npz_flags_are_refused_before_sampling(run, tmp_path, flags, message, monkeypatch):
    monkeypatch.setattr(sample, "load_sampler", lambda *a: pytest.fail("sampled before refusing"))
    with pytest.raises(UserError, match=message):
        ddp_main(run, tmp_path, *flags)


def test_pictures_and_many_samples_are_two_commands(run, tmp_path):
    with pytest.raises(UserError, match="unknown option '--trajectory'"):
        ddp_main(run, tmp_path, "--save_npz=x.npz", "--trajectory")
    with pytest.raises(UserError, match="unknown option '--save_npz'"):
        sample.main([f"--ckpt={run['ckpt']}", f"--out_dir={tmp_path}", "--save_npz=x.npz"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("flags, message", [
    (["--fid_model=/nonexistent/inception.pt"],
     "no feature extractor at /nonexistent/inception.pt"),
    (["--fid_model=PLACEHOLDER", "--fid_ref_dir=/nonexistent/val"], "no reference folder at"),
    (["--fid_model=PLACEHOLDER", "--fid_ref_stats=/nonexistent/ref.npz"],
     "no reference statistics"),
])
def test_a_missing_fid_extractor_or_reference_is_refused_before_sampling(run, tmp_path, flags,
                                                                          message, monkeypatch,
                                                                          stub):
    flags = [f.replace("PLACEHOLDER", stub) for f in flags]
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    with pytest.raises(UserError, match=message):
        ddp_main(run, tmp_path, "--fid", "--num_samples=4", *flags)


def test_a_fid_model_that_is_not_torchscript_is_one_line(run, tmp_path):
    bad = tmp_path / "not_a_model.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="is not a TorchScript file") as e:
        ddp_main(run, tmp_path, "--fid", f"--fid_model={bad}", "--num_samples=4")
    assert "\n" not in str(e.value)
