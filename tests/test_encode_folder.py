"""Tests for encode_folder.py: an image folder streamed through a tokenizer file (ADM's crop,
chunks, resume after kill -9, torchrun, bad files, the space checks) and the folder it writes, as
training reads it. CPU, a tiny tokenizer file in LlamaGen's layout, no network."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cli
import encode_folder as ef
import prepare_data as pd
import token_folder as tf
import vqgan
from cli import UserError
from conftest import MODES, ROOT, make_folder

TOKEN_FILES = ("train.bin", "val.bin", "train_labels.bin", "val_labels.bin")


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """An image folder, a LlamaGen-layout tokenizer file and the folder's tokens from one
    process."""
    from conftest import released_file
    base = tmp_path_factory.mktemp("stream")
    root = make_folder(base / "images")
    released_file(str(base / "tok.pt"), "llamagen")
    data = base / "data"
    old, pd.DATA_ROOT = pd.DATA_ROOT, str(data)
    try:
        ef.stream_folder(str(root), "ref", str(base / "tok.pt"), 16, workers=0, batch_size=3,
                         chunk=4, device="cpu", log=lambda *a: None)
    finally:
        pd.DATA_ROOT = old
    return base, root, data / "ref"


def stream_args(base, root, name, *more):
    return [f"--data_dir={root}", f"--name={name}", "--image_size=16",
            f"--tokenizer={base / 'tok.pt'}", "--workers=0", "--batch_size=3", "--chunk=4",
            "--device=cpu", *more]


def same_tokens(folder, ref):
    for f in TOKEN_FILES:
        assert (folder / f).read_bytes() == (ref / f).read_bytes(), f

# -----------------------------------------------------------------------------
# the images: ADM's centre crop, every file's tokens


def test_adm_center_crop_box_halves_then_bicubic_then_crops():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (32, 80, 3), dtype=np.uint8))     # 80 x 32, to 16
    out = pd.center_crop(im, 16)
    halved = np.asarray(im.resize((40, 16), Image.Resampling.BOX))     # short side 32 >= 2 * 16
    assert out.shape == (16, 16, 3) and np.array_equal(out, halved[:, 12:28])
    small = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))  # 30 x 20 to 16
    resized = np.asarray(small.resize((24, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(pd.center_crop(small, 16), resized[:, 4:20])
    for mode in MODES:                                      # every mode comes back RGB
        assert pd.center_crop(im.convert(mode).convert("RGB"), 16).shape == (16, 16, 3)


def test_streamed_tokens_are_the_tokenizers_codes_of_every_file(streamed):
    base, root, folder = streamed
    meta = json.load(open(folder / "meta.json"))
    # the folder's pointer to tok.pt
    model = vqgan.load_tokenizer(str(folder / "vq.pt"))
    assert meta["released_tokenizer"] == str(base / "tok.pt") and model.cfg.image_size == 16
    classes, train, val = pd.split_imagefolder(str(root))
    assert meta["class_names"] == classes == ["n01", "n02", "n03"]
    assert (meta["train_count"], meta["val_count"], meta["grid_h"]) == (len(train), len(val), 8)
    for split, files in (("train", train), ("val", val)):
        images = np.stack([pd.load_image(f, 16) for f, _ in files])
        tokens = np.fromfile(folder / f"{split}.bin", np.uint16).reshape(len(files), 64)
        assert np.array_equal(tokens, model.encode(images).reshape(len(files), 64).numpy())
        assert np.array_equal(np.fromfile(folder / f"{split}_labels.bin", np.uint16),
                              [y for _, y in files])
    assert [f for f in os.listdir(folder) if f.startswith(".")] == []       # chunks cleaned up
    meta2, tokenizer = tf.open_folder(str(folder))                 # what training reads
    assert tokenizer.cfg.grid == meta2["grid_h"] == 8


def test_streaming_with_workers_gives_the_same_bytes_and_reruns_skip(streamed, tmp_path,
                                                                     monkeypatch):
    base, root, ref = streamed
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path))
    logs = []
    folder = ef.stream_folder(str(root), "w2", str(base / "tok.pt"), 16, workers=2, batch_size=3,
                              chunk=4, device="cpu", log=logs.append)
    same_tokens(tmp_path / "w2", ref)
    ef.stream_folder(str(root), "w2", str(base / "tok.pt"), 16, workers=0, log=logs.append)
    assert folder == str(tmp_path / "w2") and "tokens exist, skipping" in logs[-1]


def test_streaming_memory_does_not_grow_with_the_images(streamed, tmp_path, monkeypatch):
    """Python-side peak (tracemalloc sees numpy's buffers: decoded images, token arrays) for a
    folder and one 4x larger: the same but for the file list."""
    import tracemalloc
    base, _, _ = streamed
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path / "data"))
    peaks = []
    for n in (8, 32):
        root = make_folder(tmp_path / f"f{n}", per_class=n, classes=("a", "b"), seed=n)
        tracemalloc.start()
        ef.stream_folder(str(root), f"m{n}", str(base / "tok.pt"), 32, workers=0, batch_size=4,
                         chunk=8, device="cpu", log=lambda *a: None)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    per_image = 32 * 32 * 3                                     # one decoded image, uint8
    assert peaks[1] - peaks[0] < 8 * per_image, peaks          # 48 more images: not 48 kept

# -----------------------------------------------------------------------------
# the command line: kill -9 and resume, torchrun, a file-size limit, a stopped run


def runner(tmp_path):
    """A script that runs encode_folder.py's command line with data/ under tmp_path. SLOW makes
    every batch take that many seconds; STOP_AFTER=N sends SIGINT to its process group (Ctrl-C)
    once N chunks are written. With FSIZE (a file-size limit) it runs twice: as it is,
    then with the space check off, so that the write itself meets the limit; each error line is
    followed by its exit status."""
    script = tmp_path / "run_encode.py"
    script.write_text(f'''import os, sys, time
sys.path.insert(0, {ROOT!r})
import cli, encode_folder as ef, prepare_data as pd, vq, vqgan
pd.DATA_ROOT = os.environ["DATA_ROOT"]
if os.environ.get("SLOW"):
    encode = vqgan.VQGAN.encode
    vqgan.VQGAN.encode = lambda *a, **k: (time.sleep(float(os.environ["SLOW"])), encode(*a, **k))[1]
if os.environ.get("STOP_AFTER"):      # Ctrl-C, to every process of the group, after N chunks
    note = ef.note_chunks
    def note_chunks(workdir, *a):
        note(workdir, *a)
        if len(os.listdir(workdir)) == int(os.environ["STOP_AFTER"]):
            os.killpg(0, 2)
    ef.note_chunks = note_chunks
if not os.environ.get("FSIZE"):
    cli.run(ef.main, sys.argv[1:])
    sys.exit()
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["FSIZE"]),) * 2)
for check in (cli.check_space, lambda *a: None):
    cli.check_space = check
    try:
        cli.run(ef.main, sys.argv[1:])
    except SystemExit as e:
        print("exit status", e.code)
''')
    return str(script)


def test_kill_9_while_tokenizing_then_the_same_command_resumes_to_the_same_bytes(
        streamed, tmp_path, monkeypatch, capsys):
    import signal
    import time
    base, root, ref = streamed
    env = {**os.environ, "DATA_ROOT": str(tmp_path), "SLOW": "0.1", "OMP_NUM_THREADS": "1"}
    args = stream_args(base, root, "k")
    proc = subprocess.Popen([sys.executable, runner(tmp_path), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, chunks = time.time() + 60, []
    while time.time() < deadline and proc.poll() is None and len(chunks) < 2:
        work = list((tmp_path / "k").glob(".tokens-*"))
        chunks = list(work[0].glob("*.npz")) if work else []
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: make SLOW larger"
    proc.send_signal(signal.SIGKILL)                       # mid-run, at no particular point
    proc.wait()
    assert not (tmp_path / "k" / "train.bin").exists() and len(chunks) >= 2
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path))
    ef.main(args)                                          # the same command, in this process
    assert "resuming" in capsys.readouterr().out
    same_tokens(tmp_path / "k", ref)


def test_ctrl_c_while_tokenizing_keeps_the_chunks_in_one_line_and_the_same_command_resumes(
        streamed, tmp_path):
    base, root, ref = streamed
    env = {**os.environ, "DATA_ROOT": str(tmp_path), "STOP_AFTER": "2", "OMP_NUM_THREADS": "1"}
    args = stream_args(base, root, "c")
    args[args.index("--workers=0")] = "--workers=2"             # the workers get Ctrl-C too
    r = subprocess.run([sys.executable, runner(tmp_path), *args], env=env, capture_output=True,
                       text=True, timeout=120, start_new_session=True)
    assert r.returncode == -2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and re.match(r"stopped by SIGINT: 2 of 8 chunks in .*\.tokens-\w+ "
                                          r"are kept; the same command resumes$", line), line
    left = [f for _, _, fs in os.walk(tmp_path / "c") for f in fs]
    assert sorted(left) == ["train.000000.npz", "train.000001.npz"], left
    del env["STOP_AFTER"]
    r = subprocess.run([sys.executable, runner(tmp_path), *args], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    same_tokens(tmp_path / "c", ref)


def test_two_torchrun_processes_write_the_bytes_of_one(streamed, tmp_path):
    base, root, ref = streamed
    env = {**os.environ, "DATA_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", runner(tmp_path), *stream_args(base, root, "t2")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    same_tokens(tmp_path / "t2", ref)


def test_a_file_size_limit_is_one_line_and_the_old_tokens_stay(streamed, tmp_path):
    base, root, ref = streamed
    shutil.copytree(ref, tmp_path / "lim")                        # a good folder, made before
    before = {f: (tmp_path / "lim" / f).read_bytes() for f in os.listdir(tmp_path / "lim")}
    from conftest import released_file
    released_file(str(tmp_path / "other.pt"), "llamagen", seed=1)   # another tokenizer
    args = [*stream_args(base, root, "lim", "--force"), f"--tokenizer={tmp_path / 'other.pt'}"]
    limit = (tmp_path / "lim" / "train.bin").stat().st_size // 2
    env = {**os.environ, "DATA_ROOT": str(tmp_path), "FSIZE": str(limit), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, runner(tmp_path), *args], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("exit status 2") == 2, r.stdout
    refused, met = r.stderr.strip().split("\n")                   # one line each
    assert refused.startswith("error: ") and "ulimit" in refused, refused
    assert met.startswith("error: no space left") and "train.bin" in met and "resumes" in met
    for f, data in before.items():
        assert (tmp_path / "lim" / f).read_bytes() == data, f
    temporaries = [f for _, _, fs in os.walk(tmp_path / "lim") for f in fs
                   if ".tmp" in f or f.endswith(".new")]
    assert not temporaries, "a temporary was left"


def test_a_run_stopped_before_its_meta_json_is_finished_by_the_same_command(streamed, tmp_path,
                                                                            monkeypatch):
    base, root, ref = streamed
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path))
    run = lambda **kw: ef.stream_folder(str(root), "h", str(base / "tok.pt"), 16, workers=0,
                                        batch_size=3, chunk=4, device="cpu",
                                        log=lambda *a: None, **kw)
    write_json = cli.write_json

    def stop_at_the_last_write(obj, path):             # stands for a kill at that moment
        if path.endswith("meta.json") and "tokenizer" in obj:
            raise KeyboardInterrupt
        write_json(obj, path)
    monkeypatch.setattr(cli, "write_json", stop_at_the_last_write)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(cli, "write_json", write_json)
    folder = run()                                      # no --force: the same command
    assert "tokenizer" in json.load(open(os.path.join(folder, "meta.json")))
    assert (tmp_path / "h" / "train.bin").read_bytes() == (ref / "train.bin").read_bytes()
    assert not list((tmp_path / "h").glob(".tokens-*"))


def test_missing_or_impossible_flags_are_one_line_before_anything_is_written(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path / "data"))
    with pytest.raises(UserError, match=r"^pass --data_dir=ROOT --tokenizer=FILE too"):
        ef.main(["--name=x"])
    with pytest.raises(UserError, match=r"^pass --name=NAME too"):
        ef.main(["--data_dir=d", "--tokenizer=t.pt"])
    for flag, must in (("workers=-1", "at least 0"), ("chunk=0", "at least 1")):
        with pytest.raises(UserError, match=f"^--{flag} is impossible: it must be {must}$"):
            ef.main(["--data_dir=d", "--name=x", "--tokenizer=t.pt", f"--{flag}"])
    assert not (tmp_path / "data").exists()

# -----------------------------------------------------------------------------
# the folder's hints name encode_folder.py, and work typed back in


def typed(hint):
    """The encode_folder.py command between the first backticks of hint, run in this process
    (a monkeypatched data root holds). -> its flags."""
    words = shlex.split(hint.split("`")[1])
    assert words[0] == "python" and os.path.samefile(words[1], ef.__file__), hint
    ef.main(words[2:])
    return words[2:]


def test_prepare_data_sends_a_tokenizer_file_to_encode_folder_with_the_same_flags(
        streamed, tmp_path, monkeypatch):
    base, root, ref = streamed
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path))
    flags = [a for a in stream_args(base, root, "p") if not a.startswith("--name=")]
    argv = ["--dataset=imagefolder", *flags, "--vq.lr=0.1"]
    with pytest.raises(UserError, match="encode_folder.py") as e:
        pd.main(argv)
    assert "\n" not in str(e.value) and not (tmp_path / "imagefolder").exists()
    flags = typed(str(e.value))
    assert "--name=imagefolder" in flags and "--vq.lr=0.1" not in flags
    same_tokens(tmp_path / "imagefolder", ref)


def test_a_damaged_streamed_folder_names_encode_folder_and_the_hint_rebuilds_it(
        streamed, tmp_path, monkeypatch):
    base, root, ref = streamed
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path))
    ef.main(stream_args(base, root, "d"))
    assert json.load(open(tmp_path / "d" / "source.json"))["tokenizer"] == str(base / "tok.pt")
    train_bin = tmp_path / "d" / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])
    with pytest.raises(UserError, match="damaged: make the folder again with `python "
                                        ".*encode_folder.py .*--force`$") as e:
        tf.open_folder(str(tmp_path / "d"))
    typed(str(e.value))
    same_tokens(tmp_path / "d", ref)
    with pytest.raises(UserError, match="holds the tokens of .*tok.pt, made by `python "
                                        ".*encode_folder.py .*`; pass --force"):
        pd.prepare("imagefolder", "d", str(root), image_size=16, log=lambda *a: None)
    (tmp_path / "d" / "source.json").unlink()              # then meta.json says what made it
    meta = json.load(open(tmp_path / "d" / "meta.json"))
    command, folder = pd.remake_command(str(tmp_path / "d"), meta, force=True)
    assert command == cli.command("encode_folder.py", "--data_dir=ROOT", "--name=d",
                                  f"--tokenizer={base / 'tok.pt'}", "--image_size=16", "--force")
    assert folder == str(tmp_path / "d")


def test_unreadable_files_and_empty_class_folders(streamed, tmp_path, monkeypatch):
    base, _, _ = streamed
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path / "data"))
    root = make_folder(tmp_path / "bad", per_class=4, classes=("a", "b"))
    (root / "b" / "broken.png").write_bytes(b"not a png")
    run = lambda **kw: ef.stream_folder(str(root), "bad", str(base / "tok.pt"), 16, workers=0,
                                        batch_size=2, chunk=4, device="cpu",
                                        log=lambda *a: None, **kw)
    with pytest.raises(UserError, match="cannot read image .*broken.png.*--skip_unreadable"):
        run()
    folder = run(skip_unreadable=True)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["unreadable_skipped"] == 1 and meta["train_count"] + meta["val_count"] == 8
    labels = np.fromfile(os.path.join(folder, "train_labels.bin"), np.uint16)
    assert len(labels) == meta["train_count"] and sorted(set(labels.tolist())) == [0, 1]
    (root / "c").mkdir()
    with pytest.raises(UserError, match="class folder .*c has no"):
        pd.split_imagefolder(str(root))
