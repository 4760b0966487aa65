"""One writer per folder, writes that survive a full disk, tokenizers checked against the tokens
they made, every hint a command that works when typed back in, and flag mistakes as one line before
any work. CPU, seconds."""

import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import baselines
import cli
import prepare_data as pd
import purrception
import sample
import sample_ddp
import token_folder as tf
import vq
from cli import UserError
from conftest import K, ROOT, tiny_config
from purrception import train

TINY_VQ = ["--vq.ch=8", "--vq.n_res=1", "--vq.codebook_size=16", "--vq.code_dim=4",
           "--vq.max_iters=2", "--vq.batch_size=8", "--vq.eval_interval=2"]


def files(folder):
    """{relative path: bytes} of every file under folder."""
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(folder) for f in fs}


def temporaries(folder):
    return [f for f in files(folder) if ".tmp" in f]


def type_in(hint):
    """Run the command between the first pair of backticks in hint as a user would type it:
    `rm X && python script.py ARGS` (in this process, so a monkeypatched data root holds). -> what
    the script's main returned."""
    line = hint.split("`")[1]
    result = None
    for part in line.split("&&"):
        words = shlex.split(part)
        if words[0] == "rm":
            os.remove(words[1])
            continue
        assert words[0] == "python", line
        assert os.path.isfile(os.path.join(ROOT, os.path.basename(words[1]))), line
        script = importlib.import_module(os.path.basename(words[1])[:-3])
        result = script.main(words[2:])
    return result


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An empty data/ root and a small shapes set (64 train, 16 val images)."""
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setattr(pd, "SHAPES_COUNTS", (64, 16))
    return tmp_path / "data"

# -----------------------------------------------------------------------------
# one writer per out_dir


def test_a_second_run_refuses_naming_the_holder_and_a_killed_holder_does_not_block_a_resume(
        data_dir, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(data_dir, out, max_iters=100000, eval_interval=2, log_interval=1000)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "purrception.py"),
                             *[f"--{k}={v}" for k, v in vars(cfg).items()]],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        holder = json.loads((out / cli.LOCK_FILE).read_text())
        assert holder["pid"] == proc.pid
        before = (out / "ckpt.pt").stat().st_mtime_ns
        second = (rf"{out} is in use by purrception.py \(pid {proc.pid} on .*\); "
                  rf"wait for it to end or stop it \(kill {proc.pid}\), or pick another --out_dir$")
        with pytest.raises(UserError, match=second):
            train(tiny_config(data_dir, out, max_iters=8, init_from="resume"))
        with pytest.raises(UserError, match=second):
            train(tiny_config(data_dir, out, max_iters=8, overwrite=True))
        with pytest.raises(UserError, match=rf"in use by purrception.py \(pid {proc.pid}.*or "
                                            rf"sample into another folder meanwhile: "
                                            rf"--ckpt={out}/ckpt.pt --out_dir=OTHER$"):
            sample.main([f"--out_dir={out}", "--steps=2"])
        # reading is no writing: a bare FID, or pictures sent elsewhere, go ahead while it trains
        got = sample.main([f"--ckpt={out}/ckpt.pt", f"--out_dir={tmp_path / 'elsewhere'}",
                           "--steps=2", "--num_samples=3"])
        assert os.path.exists(got)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert before <= (out / "ckpt.pt").stat().st_mtime_ns
    # left behind by kill -9
    assert (out / cli.LOCK_FILE).exists()
    done = cli.load_checkpoint(str(out / "ckpt.pt"))["iter"]
    train(tiny_config(data_dir, out, max_iters=done + 2, eval_interval=2, init_from="resume"))
    assert cli.load_checkpoint(str(out / "ckpt.pt"))["iter"] == done + 2
    # released on exit
    assert not (out / cli.LOCK_FILE).exists() and not temporaries(out)


def test_the_lock_is_released_on_an_error_and_a_folder_it_made_is_removed(data_dir, tmp_path):
    with pytest.raises(UserError, match="no checkpoint at"):
        train(tiny_config(data_dir, tmp_path / "new", init_from="resume"))
    assert not (tmp_path / "new").exists()
    with cli.one_writer(str(tmp_path / "held")):
        with pytest.raises(UserError, match="in use by .*pid %d" % os.getpid()):
            with cli.one_writer(str(tmp_path / "held")):
                pass
    assert not (tmp_path / "held").exists()
    (tmp_path / "run").mkdir()
    # a writer killed mid-write
    for name in ("ckpt.tmp-123-abcdef01.pt", "notes.tmp-1"):
        (tmp_path / "run" / name).write_bytes(b"x")
    with cli.one_writer(str(tmp_path / "run")):
        assert sorted(os.listdir(tmp_path / "run")) == ["notes.tmp-1", cli.LOCK_FILE]

# -----------------------------------------------------------------------------
# atomic writes: a full disk or a file-size limit is one line, the old file intact, no
# temporary left


def test_a_checkpoint_write_over_a_file_size_limit_is_one_line_and_keeps_the_old_checkpoint(
        data_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny_config(data_dir, out, max_iters=3))
    before = files(out)
    # the sample grid fits under it, the checkpoint does not
    limit = len(before["ckpt.pt"]) // 3
    flags = [f"--{k}={v}"
             for k, v in vars(tiny_config(data_dir, out, max_iters=6, init_from="resume")).items()]
    script = (f"import resource, sys; sys.path.insert(0, {ROOT!r}); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
              f"import cli, purrception; cli.run(purrception.main, {flags!r})")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: no space left on device writing {out}/ckpt.pt: ")
    assert (f": about {len(before['ckpt.pt']) / 1e6:.1f} MB needed, the file-size limit "
            f"(ulimit -f) is {limit / 1e6:.1f} MB; the previous ckpt.pt is intact; "
            f"raise the limit (ulimit -f unlimited) and run it again\n") in r.stderr
    after = files(out)
    assert after["ckpt.pt"] == before["ckpt.pt"] and not temporaries(out)
    # what fitted was written
    assert "samples_000006.png" in after


def test_atomic_save_removes_its_temporary_on_any_failure_and_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "x.bin")
    cli.atomic_save(lambda tmp: open(tmp, "wb").write(b"good"), path)

    def half_then(error):
        def write(tmp):
            # PIL and numpy read the ending
            assert tmp.endswith(".bin") and tmp != path
            open(tmp, "wb").write(b"ha")
            raise error
        return write
    # not a disk error: as it was
    with pytest.raises(KeyError):
        cli.atomic_save(half_then(KeyError("boom")), path)
    with pytest.raises(UserError, match=r"^no space left on device writing .*x.bin: over \d+ MB "
                                        r"needed, \d+ MB free; the previous x.bin is intact"):
        cli.atomic_save(half_then(OSError(28, "No space left on device")), path)
    assert os.listdir(tmp_path) == ["x.bin"] and open(path, "rb").read() == b"good"


def test_every_file_the_commands_leave_was_renamed_into_place_from_a_temporary(data_root, tmp_path,
                                                                               monkeypatch):
    """Whoever writes it, every file the commands leave arrived by a rename from a temporary of its
    own (atomic_save, or the data pipeline's own): a writer that opens its final name directly is
    caught, whatever file it writes."""
    landed, rename = set(), os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (rename(a, b), landed.add(os.path.abspath(b))))
    monkeypatch.setattr(os, "rename", os.replace)
    pd.main(["--dataset=shapes", *TINY_VQ])
    out = tmp_path / "out"
    train(tiny_config(data_root / "shapes", out, max_iters=3))
    sample.main([f"--out_dir={out}", "--steps=2", "--trajectory", "--num_samples=2", "--frames=2"])
    sample.main([f"--out_dir={out}", "--steps=2", "--uncertainty", "--num_samples=2"])
    sample_ddp.main([f"--out_dir={out}", "--steps=2", "--num_samples=3", "--batch_size=2"])
    vq.save_pairs(np.zeros((8, 8, 8, 3), np.uint8), np.zeros((8, 8, 8, 3), np.uint8),
                  str(tmp_path / "r.png"))
    import compare
    for value in "12":
        compare.add_row(str(tmp_path / "results.csv"), {f: value for f in compare.FIELDS})
    left = {os.path.abspath(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path) for f in fs}
    locks = {f for f in left if f.endswith(".lock") and os.path.getsize(f) == 0}   # flock files
    assert len(left) > 15 and left - locks <= landed, sorted(left - locks - landed)
    assert [r["iter"] for r in compare.read_rows(str(tmp_path / "results.csv"))] == ["1", "2"]


# -----------------------------------------------------------------------------
# a tokenizer is checked, not trusted


def test_a_foreign_tokenizer_with_the_same_K_is_refused_by_training_resume_and_sample(
        data_dir, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["tokenizer_sha1"] = vq.file_sha1(str(data / "vq.pt"))
    (data / "meta.json").write_text(json.dumps(meta))
    train(tiny_config(data, out, max_iters=3))
    # same shape, other weights
    torch.manual_seed(1)
    vq.save_vq(vq.VQVAE(vq.VQConfig(image_size=8, ch=8, n_res=1, codebook_size=K, code_dim=4)),
               str(data / "vq.pt"))
    foreign = f"the tokenizer {data}/vq.pt is not the file that made the tokens in {data} .its sha1"
    for attempt in (lambda: train(tiny_config(data, tmp_path / "fresh", max_iters=3)),
                    lambda: train(tiny_config(data, out, max_iters=6, init_from="resume")),
                    lambda: sample.main([f"--out_dir={out}", "--steps=2"])):
        with pytest.raises(UserError, match=foreign):
            attempt()
    # same K, d and 4x4 grid, but for 16px images: the image size and downsampling factor differ
    vq.save_vq(vq.VQVAE(vq.VQConfig(image_size=16, downsample=4, ch=8, n_res=1, codebook_size=K,
                                    code_dim=4)), str(data / "vq.pt"))
    with pytest.raises(UserError, match=f"the tokenizer {data}/vq.pt reads 16px images downsampled "
                                        f"4x, but the tokens in {data} were made from 8px images "
                                        "downsampled 2x"):
        sample.main([f"--out_dir={out}", "--steps=2"])


def test_a_checkpoint_refuses_a_folder_whose_tokenizer_is_another_and_names_its_own(data_dir,
                                                                                  tmp_path):
    """Another folder with the same images, K, d and classes but another tokenizer (a consistent
    folder: its tokens and meta.json are its tokenizer's) is refused by sample.py and by a resume,
    in one line naming the run's folder, whose hint works typed back in; a checkpoint from before
    the record still samples."""
    data, other, out = tmp_path / "data", tmp_path / "other", tmp_path / "out"
    for folder, seed in ((data, 0), (other, 1)):
        shutil.copytree(data_dir, folder)
        torch.manual_seed(seed)
        vq.save_vq(vq.VQVAE(vq.VQConfig(image_size=8, ch=8, n_res=1, codebook_size=K,
                                        code_dim=4)), str(folder / "vq.pt"))
        meta = json.loads((folder / "meta.json").read_text())
        meta["tokenizer_sha1"] = vq.file_sha1(str(folder / "vq.pt"))
        (folder / "meta.json").write_text(json.dumps(meta))
    train(tiny_config(data, out, max_iters=3))
    before = files(out)
    for attempt in (lambda: sample.main([f"--out_dir={out}", "--steps=2", f"--data_dir={other}"]),
                    lambda: train(tiny_config(other, out, max_iters=6, init_from="resume"))):
        with pytest.raises(UserError, match=f"was trained with the tokenizer of {data} .*"
                                            f"but {other} holds another") as e:
            attempt()
        assert "\n" not in str(e.value) and str(e.value).endswith(f"--data_dir={data}")
    assert files(out) == before
    sample.main([f"--out_dir={out}", "--steps=2", f"--data_dir={data}"])       # the hint, typed
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["tokenizer_sha1"]                                       # a checkpoint from before
    torch.save(ckpt, out / "ckpt.pt")
    sample.main([f"--out_dir={out}", "--steps=2", f"--data_dir={other}"])


def test_the_tokenizer_hash_is_computed_once_per_file_version(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"a" * 1000)
    first = vq.file_sha1(str(path))
    assert vq.file_sha1(str(path)) == first
    path.write_bytes(b"b" * 1001)
    assert vq.file_sha1(str(path)) != first

# -----------------------------------------------------------------------------
# every hint is a command that works when typed as printed


def test_a_damaged_folder_and_a_foreign_tokenizer_get_hints_that_work_typed_back_in(data_root,
                                                                                   tmp_path):
    pd.main(["--dataset=shapes", *TINY_VQ])
    train_bin = data_root / "shapes" / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])
    with pytest.raises(UserError, match="train.bin holds .* bytes where meta.json says .*; it is "
                                        "damaged: make the folder again with `python "
                                        ".*prepare_data.py --dataset=shapes --vq.ch=8 .*"
                                        "--force`$") as e:
        tf.open_folder(str(data_root / "shapes"))
    type_in(str(e.value))
    tf.open_folder(str(data_root / "shapes"))                                        # whole again
    pd.main(["--dataset=shapes", "--name=other", "--seed=1", *TINY_VQ])
    shutil.copy(data_root / "other" / "vq.pt", data_root / "shapes" / "vq.pt")
    with pytest.raises(UserError) as e:
        tf.open_folder(str(data_root / "shapes"))
    assert "is not the file that made the tokens" in str(e.value)
    assert "`rm " in str(e.value) and "--vq.codebook_size=16" in str(e.value)   # its own settings
    type_in(str(e.value))                                          # typed as printed, it works
    tf.open_folder(str(data_root / "shapes"))


def test_a_deleted_meta_json_of_an_image_folder_names_its_source_and_the_command_rebuilds_it(
        data_root, tmp_path):
    # a space, quoted
    root = tmp_path / "my photos"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    pd.main(["--dataset=imagefolder", f"--data_dir={root}", "--name=pets", "--image_size=8",
             *TINY_VQ])
    (data_root / "pets" / "meta.json").unlink()
    with pytest.raises(UserError) as e:
        train(tiny_config(data_root / "pets", tmp_path / "out", dataset="pets"))
    hint = str(e.value)
    assert shlex.quote(f"--data_dir={root}") in hint
    assert "--dataset=imagefolder" in hint and "--name=pets" in hint
    type_in(hint)
    meta, _ = tf.open_folder(str(data_root / "pets"))                                # whole again
    assert meta["class_names"] == ["cat", "dog"]


def test_the_offline_cifar10_hint_names_prepare_data_and_its_flag(data_root, tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(pd.urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as e:
        train(tiny_config("", tmp_path / "out", dataset="cifar10"))
    hint = str(e.value)
    assert "`python " in hint
    assert "prepare_data.py --dataset=cifar10 --data_dir=PATH/TO/cifar-10-python.tar.gz`" in hint
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not it")
    # further: it reads the file
    with pytest.raises(UserError, match="is not the official CIFAR-10 tarball"):
        type_in(hint.replace("PATH/TO", str(tmp_path)))


def test_shape_hints_offer_only_values_that_work(data_dir, tmp_path):
    with pytest.raises(UserError) as e:
        cli.check_transformer(384, 6, 2, 15)
    assert str(e.value) == ("--patch_size=2 does not divide the 15x15 token grid; "
                            "try --patch_size=1, --patch_size=3, --patch_size=5")
    for p in (1, 3, 5):
        cli.check_transformer(384, 6, p, 15)
        purrception.DiT(4, 16, 15, p, 1, 6, 384)
    with pytest.raises(UserError, match=r"^--n_head=5 does not divide --n_embd=32: "
                                        r"try --n_head=4 or --n_head=8$"):
        train(tiny_config(data_dir, tmp_path / "out", n_head=5))
    with pytest.raises(UserError, match=r"^--n_embd=30 must be a multiple of 4 .* "
                                        r"try --n_embd=28 or --n_embd=32$"):
        train(tiny_config(data_dir, tmp_path / "out", n_embd=30))
    assert not (tmp_path / "out").exists()
    # the suggestion, typed in
    train(tiny_config(data_dir, tmp_path / "out", n_head=4, max_iters=1))


def test_a_resume_with_nothing_left_to_do_says_so(data_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny_config(data_dir, out, max_iters=3))
    before = files(out)
    for max_iters in (3, 2):
        with pytest.raises(UserError, match=f"ckpt.pt is already at iter 3: "
                                            f"--max_iters={max_iters} leaves nothing to do; "
                                            "pass a larger --max_iters"):
            train(tiny_config(data_dir, out, max_iters=max_iters, init_from="resume"))
    assert files(out) == before
    train(tiny_config(data_dir, out, max_iters=4, eval_interval=4, init_from="resume"))

# -----------------------------------------------------------------------------
# flag mistakes: one line, before any work, with no config dump in front


def test_a_head_count_that_does_not_divide_the_width_is_one_line_in_every_trainer(capsys, tmp_path):
    for main in (purrception.main, baselines.main, bench.main):
        with pytest.raises(UserError, match=r"^--n_head=5 does not divide --n_embd=128: "
                                            r"try --n_head=4 or --n_head=8$"):
            main(["--dataset=shapes", "--n_head=5",
                  f"--out_dir={tmp_path / 'out'}"][:2 + (main is not bench.main)])
        # no config line, no work
        assert capsys.readouterr().out == ""
    assert not (tmp_path / "out").exists()
    # as the entry points run
    with pytest.raises(SystemExit) as e:
        cli.run(purrception.main, ["--n_head=5", "--lr=-1"])
    assert e.value.code == 2
    assert capsys.readouterr() == ("", "error: --lr=-1.0 is impossible: it must be positive\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_tokenizer_device_that_does_not_exist_fails_before_anything_is_written(data_root):
    with pytest.raises(UserError, match=r"^--vq.device=cuda, but this machine has no cuda; "
                                        r"try --vq.device=cpu$"):
        pd.main(["--dataset=shapes", "--vq.device=cuda"])
    assert not data_root.exists()
