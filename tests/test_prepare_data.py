"""Tests for prepare_data.py: CPU, tiny tokenizer configs, no network, a few seconds in all."""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import cli
import prepare_data as pd
import vq
from cli import UserError
from conftest import ROOT

# a tokenizer that trains in about a second: 16x16 images, 8x8 tokens, 16 codes
TINY_VQ = {k: v for k, v in dict(ch=16, n_res=1, codebook_size=16, code_dim=4, max_iters=3,
                                 batch_size=8, eval_interval=3, device="cpu").items()
           if k in pd.vq_options()}


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """Point data/ at a temporary folder and make the shapes dataset tiny."""
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setattr(pd, "SHAPES_COUNTS", (64, 16))
    return tmp_path / "data"


def tiny_prepare(logs=None, **kw):
    kw = {"image_size": 16, "vq_overrides": TINY_VQ, **kw}
    return pd.prepare("shapes", log=(logs.append if logs is not None else lambda *a: None), **kw)


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)

# -----------------------------------------------------------------------------
# shapes


def test_shapes_are_deterministic_by_seed():
    a, ya = pd.make_shapes(50, 32, seed=0)
    b, yb = pd.make_shapes(50, 32, seed=0)
    c, _ = pd.make_shapes(50, 32, seed=1)
    assert a.dtype == np.uint8 and a.shape == (50, 32, 32, 3)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert not np.array_equal(a, c)
    assert pd.make_shapes(4, 16, seed=0)[0].shape == (4, 16, 16, 3)


def luminance(x):
    return x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)       # (N, S, S)


def shape_mask(x):
    """(N, S, S) bool: the pixels that differ from the background (read in the top-left corner)."""
    lum = luminance(x)
    return np.abs(lum - lum[:, :1, :1]) > 30


def test_shapes_have_ten_balanced_classes_that_stand_out():
    x, y = pd.make_shapes(200, 32, seed=0)
    assert len(pd.SHAPES_CLASSES) == len(set(pd.SHAPES_CLASSES)) == 10
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 20))
    lum = luminance(x)
    assert (lum.max(axis=(1, 2)) - lum.min(axis=(1, 2)) > 60).all(), \
        "a shape is too faint against its background"
    # the classes differ in how much of the image they cover: a ring covers less than a disc of the
    # same radius
    cover = shape_mask(x).mean(axis=(1, 2))
    means = [cover[y == k].mean() for k in range(10)]
    assert means[pd.SHAPES_CLASSES.index("ring")] < means[pd.SHAPES_CLASSES.index("circle")]


def test_shapes_keep_an_upright_pose():
    x, y = pd.make_shapes(400, 32, seed=0)
    mask = shape_mask(x)

    def box(m):                                         # -> (height, width) of the bounding box
        rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1

    # a square tilted at most 15 degrees fills ~80% of its bounding box; a diamond (45 degrees)
    # fills half
    fill = [m.sum() / np.prod(box(m)) for m in mask[y == pd.SHAPES_CLASSES.index("square")]]
    assert np.mean(fill) > 0.7 and min(fill) > 0.55
    for kind in ("ellipse", "stripes"):                               # lying down: wider than tall
        assert all(box(m)[1] > box(m)[0] for m in mask[y == pd.SHAPES_CLASSES.index(kind)]), kind

# -----------------------------------------------------------------------------
# image folders


def test_imagefolder_flat_layout_resizes_crops_and_holds_out(tmp_path):
    root = tmp_path / "pets"
    wide = np.zeros((20, 40, 3), np.uint8)              # 40 wide, 20 high: blue sides, red centre
    wide[..., 2] = 255
    wide[:, 10:30] = (255, 0, 0)
    for i in range(12):
        save(str(root / "cat" / f"{i}.png"), wide)
    for i in range(8):
        save(str(root / "dog" / "sub" / f"{i}.jpg"), np.full((24, 24, 3), (0, 200, 0), np.uint8))
    (root / "dog" / "notes.txt").write_text("not an image")
    tx, ty, vx, vy, classes = pd.load_imagefolder(str(root), 16)
    assert classes == ["cat", "dog"]
    assert tx.shape[1:] == (16, 16, 3) and tx.dtype == np.uint8
    assert len(tx) + len(vx) == 20 and len(vx) == 2 and sorted(vy.tolist()) == [0, 1]
    cats = tx[ty == 0].astype(int)
    assert (cats[:, :, 2:-2, 0] > 200).all() and (cats[:, :, 2:-2, 2] < 60).all(), \
        "not a centre crop"
    assert np.array_equal(pd.load_imagefolder(str(root), 16)[2], vx), \
        "the held-out split is not deterministic"


def test_imagefolder_train_and_test_layout(tmp_path):
    for split, n in (("train", 5), ("test", 2)):
        for c, colour in (("a", 0), ("b", 255)):
            for i in range(n):
                save(str(tmp_path / split / c / f"{i}.png"), np.full((8, 8, 3), colour, np.uint8))
    tx, ty, vx, vy, classes = pd.load_imagefolder(str(tmp_path), 8)
    assert classes == ["a", "b"] and len(tx) == 10 and len(vx) == 4
    assert np.array_equal(vy, [0, 0, 1, 1]) and (vx[vy == 1] == 255).all()


def test_imagefolder_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        pd.load_imagefolder(str(tmp_path / "missing"), 16)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no .*images"):
        pd.load_imagefolder(str(tmp_path / "empty"), 16)
    for i in range(3):
        save(str(tmp_path / "broken" / "cls" / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "broken" / "cls" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        pd.load_imagefolder(str(tmp_path / "broken"), 16)

# -----------------------------------------------------------------------------
# CIFAR-10, from a tiny tarball in the official format (Python pickles of dicts with bytes keys)


def make_cifar_tarball(path, n=3):
    rng = np.random.default_rng(0)
    data = lambda: rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    batches = {f"data_batch_{i}": {b"data": data(), b"labels": [(i + j) % 10 for j in range(n)]}
               for i in range(1, 6)}
    batches["test_batch"] = {b"data": data(), b"labels": [9] * n}
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    blobs = {k: pickle.dumps(v, protocol=2) for k, v in batches.items()}
    blobs["batches.meta"] = pickle.dumps({b"label_names": [s.encode() for s in names]}, protocol=2)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches, names


def test_cifar10_reads_the_tarball_the_folder_and_the_extracted_copy(tmp_path):
    path = str(tmp_path / "cifar-10-python.tar.gz")
    batches, names = make_cifar_tarball(path)
    md5 = hashlib.md5(open(path, "rb").read()).hexdigest()
    tx, ty, vx, vy, classes = pd.load_cifar10(path, md5=md5)
    assert tx.shape == (15, 32, 32, 3) and vx.shape == (3, 32, 32, 3) and tx.dtype == np.uint8
    assert classes == names and ty.tolist()[:3] == [1, 2, 3] and vy.tolist() == [9, 9, 9]
    raw = batches["data_batch_1"][b"data"][0]           # rows of 1024 red, then green, then blue
    for c in range(3):
        assert tx[0, 2, 5, c] == raw[c * 1024 + 2 * 32 + 5]
    # the folder holding the tarball
    assert np.array_equal(pd.load_cifar10(str(tmp_path), md5=md5)[0], tx)
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    assert np.array_equal(pd.load_cifar10(str(tmp_path / "x"))[2], vx)    # extracted: no checksum
    assert np.array_equal(pd.load_cifar10(str(tmp_path / "x" / "cifar-10-batches-py"))[2], vx)
    with pytest.raises(UserError, match="md5"):
        pd.load_cifar10(path)                                         # not the official file


def test_cifar10_offline_names_the_url_and_data_dir(data_root, monkeypatch):
    # nothing listens there
    monkeypatch.setattr(pd, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(UserError, match="--data_dir") as e:
        pd.load_cifar10(None, log=lambda *a: None)
    assert "http://127.0.0.1:9/cifar-10-python.tar.gz" in str(e.value)
    assert not os.path.exists(data_root / "cifar10" / "cifar-10-python.tar.gz.part")

# -----------------------------------------------------------------------------
# prepare(): the files it writes, skipping, --force, and refusals


def test_prepare_writes_memmaps_that_round_trip(data_root):
    folder = tiny_prepare()
    assert folder == str(data_root / "shapes")
    meta = json.load(open(os.path.join(folder, "meta.json")))
    for key in ("dataset", "image_size", "grid_h", "grid_w", "codebook_size", "code_dim",
                "num_classes", "class_names", "train_count", "val_count", "vq_config", "vq_train",
                "tokenizer"):
        assert key in meta, key
    assert meta["train_count"] == 64 and meta["val_count"] == 16
    assert meta["class_names"] == list(pd.SHAPES_CLASSES)
    assert meta["vq_config"]["codebook_size"] == 16 and meta["vq_train"]["max_iters"] == 3
    images, labels = pd.make_shapes(80, 16, seed=0)
    train_u8 = np.memmap(os.path.join(folder, "train_images.u8"), dtype=np.uint8,
                         mode="r").reshape(-1, 16, 16, 3)
    assert np.array_equal(train_u8, images[:64])
    assert np.array_equal(np.fromfile(os.path.join(folder, "val_labels.bin"), np.uint16),
                          labels[64:])
    model = vq.load_vq(os.path.join(folder, meta["tokenizer"]))
    L = meta["grid_h"] * meta["grid_w"]
    assert meta["codebook_size"] == 16 and meta["code_dim"] == model.codebook.shape[1]
    assert L == 8 * 8
    for split, n, x in (("train", 64, images[:64]), ("val", 16, images[64:])):
        path = os.path.join(folder, f"{split}.bin")
        assert os.path.getsize(path) == n * L * 2
        tokens = np.memmap(path, dtype=np.uint16, mode="r").reshape(n, L)
        assert tokens.max() < 16
        assert np.array_equal(tokens, model.encode(x).reshape(n, L).numpy())


def test_rerun_skips_force_redoes_and_a_new_tokenizer_retokenizes(data_root):
    folder = tiny_prepare()
    stamp = lambda: {f: os.stat(os.path.join(folder, f)).st_mtime_ns
                     for f in sorted(os.listdir(folder))}
    before, logs = stamp(), []
    tiny_prepare(logs)
    assert stamp() == before and sum("skipping" in line for line in logs) == 3
    tiny_prepare(vq_overrides=None)      # no explicit settings: whatever is there is fine
    assert stamp() == before
    # a tokenizer retrained outside prepare_data.py (`python vq.py`) makes the tokens stale
    u8 = np.fromfile(os.path.join(folder, "train_images.u8"), np.uint8).reshape(-1, 16, 16, 3)
    cfg = vq.VQConfig(image_size=16, **{k: v for k, v in TINY_VQ.items()
                                        if hasattr(vq.VQConfig, k)})
    vq.train_vq(u8, u8[:8], cfg, os.path.join(folder, "vq.pt"), max_iters=2, batch_size=8,
                eval_interval=2, seed=5, log=lambda *a: None)
    after_vq = stamp()
    tiny_prepare()
    now = stamp()
    assert now["train.bin"] != after_vq["train.bin"]
    assert now["train_images.u8"] == before["train_images.u8"]
    tiny_prepare(force=True)
    assert all(stamp()[f] != now[f] for f in ("train_images.u8", "vq.pt", "train.bin", "meta.json"))


def test_prepare_refuses_a_folder_made_with_other_settings(data_root):
    tiny_prepare()
    with pytest.raises(UserError, match="codebook_size=16 .asked for 32.*--force.*--name"):
        tiny_prepare(vq_overrides={**TINY_VQ, "codebook_size": 32})
    with pytest.raises(UserError, match="image_size=16 .asked for 24."):
        tiny_prepare(image_size=24)
    tiny_prepare(vq_overrides={**TINY_VQ, "codebook_size": 32}, name="other")   # another name: fine


def test_prepare_rejects_bad_settings_before_writing(data_root):
    cases = [({"image_size": 15}, "not divisible by the tokenizer's downsampling factor"),
             ({"vq_overrides": {"codebook_size": 70000}}, "65536"),
             ({"vq_overrides": {"codebok_size": 8}}, "did you mean 'codebook_size'")]
    for kw, message in cases:
        with pytest.raises(UserError, match=message):
            tiny_prepare(**kw)
    with pytest.raises(UserError, match="did you mean 'cifar10'"):
        pd.prepare("cifar", log=lambda *a: None)
    with pytest.raises(UserError, match="--data_dir"):
        pd.prepare("imagefolder", log=lambda *a: None)
    assert not os.path.exists(data_root)
    assert isinstance(UserError("x"), ValueError)


def test_data_path_is_relative_to_the_repository():
    assert pd.data_path("cifar10") == os.path.join(ROOT, "data", "cifar10")

# -----------------------------------------------------------------------------
# command line


def parse(argv):
    return cli.parse_args(argv, pd.PrepareConfig(), extra={"vq.": pd.vq_options()})


def test_parse_args_types_and_unknown_keys():
    opts, extra = parse(["--dataset=shapes", "--force", "--image_size=16", "--seed=3",
                         "--vq.lr=0.01", "--vq.max_iters=7", "--vq.device=cpu"])
    assert opts.dataset == "shapes" and opts.force is True
    assert opts.image_size == 16 and opts.seed == 3
    assert extra["vq."] == {"lr": 0.01, "max_iters": 7, "device": "cpu"}
    assert isinstance(extra["vq."]["lr"], float)
    assert parse(["--dataset=x", "--force=false"])[0].force is False
    # as in every script
    assert parse(["--dataset=x", "--vq.max_iters=1e4"])[1]["vq."]["max_iters"] == 10000
    with pytest.raises(UserError, match="--image_size expects int"):
        parse(["--dataset=shapes", "--image_size=big"])
    with pytest.raises(UserError, match="did you mean --image_size"):
        parse(["--dataset=shapes", "--imagesize=16"])
    with pytest.raises(UserError, match="did you mean --vq.codebook_size"):
        parse(["--dataset=shapes", "--vq.codebok_size=16"])
    with pytest.raises(UserError, match="--dataset"):
        pd.main([])


def test_cli_error_is_one_line(tmp_path):
    name = "_test_cli_error"
    args = ["--dataset=imagefolder", "--data_dir=/no/such/folder", f"--name={name}"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)   # any cwd
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: ") and "does not exist" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert not os.path.exists(pd.data_path(name))

# -----------------------------------------------------------------------------
# an image folder streamed through a tokenizer file: ADM's crop, chunks, resume, torchrun, bad files

MODES = ("RGB", "L", "P", "CMYK", "RGBA")                 # CMYK and L as JPEG, the others as PNG


def make_folder(root, per_class=10, classes=("n01", "n02", "n03"), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(18, 70, 2))
            mode = MODES[i % len(MODES)]
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
            os.makedirs(root / c, exist_ok=True)
            im.save(root / c / f"{i:03d}.{'jpg' if mode in ('L', 'CMYK') else 'png'}")
    return root


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
        pd.stream_folder(str(root), "ref", str(base / "tok.pt"), 16, workers=0, batch_size=3,
                         chunk=4, device="cpu", log=lambda *a: None)
    finally:
        pd.DATA_ROOT = old
    return base, root, data / "ref"


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
    model = vq.load_vq(str(folder / "vq.pt"))                      # the folder's pointer to tok.pt
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
    meta2, tokenizer = pd.open_folder(str(folder))                 # what training reads
    assert tokenizer.cfg.grid == meta2["grid_h"] == 8


def test_streaming_with_workers_gives_the_same_bytes_and_reruns_skip(streamed, tmp_path,
                                                                     monkeypatch):
    base, root, ref = streamed
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path))
    logs = []
    folder = pd.stream_folder(str(root), "w2", str(base / "tok.pt"), 16, workers=2, batch_size=3,
                              chunk=4, device="cpu", log=logs.append)
    for f in ("train.bin", "val.bin", "train_labels.bin", "val_labels.bin"):
        assert open(os.path.join(folder, f), "rb").read() == (ref / f).read_bytes(), f
    pd.stream_folder(str(root), "w2", str(base / "tok.pt"), 16, workers=0, log=logs.append)
    assert "tokens exist, skipping" in logs[-1]


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
        pd.stream_folder(str(root), f"m{n}", str(base / "tok.pt"), 32, workers=0, batch_size=4,
                         chunk=8, device="cpu", log=lambda *a: None)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    per_image = 32 * 32 * 3                                     # one decoded image, uint8
    assert peaks[1] - peaks[0] < 8 * per_image, peaks          # 48 more images: not 48 kept


def runner(tmp_path):
    """A script that runs prepare_data.py's command line with data/ under tmp_path. SLOW makes
    every batch take that many seconds. With FSIZE (a file-size limit) it runs twice: as it is,
    then with the space check off, so that the write itself meets the limit; each error line is
    followed by its exit status."""
    script = tmp_path / "run_prepare.py"
    script.write_text(f'''import os, sys, time
sys.path.insert(0, {ROOT!r})
import cli, prepare_data as pd, vqgan
pd.DATA_ROOT = os.environ["DATA_ROOT"]
if os.environ.get("SLOW"):
    encode = vqgan.VQGAN.encode
    vqgan.VQGAN.encode = lambda *a, **k: (time.sleep(float(os.environ["SLOW"])), encode(*a, **k))[1]
if not os.environ.get("FSIZE"):
    cli.run(pd.main, sys.argv[1:])
    sys.exit()
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["FSIZE"]),) * 2)
for check in (pd.check_space, lambda *a: None):
    pd.check_space = check
    try:
        cli.run(pd.main, sys.argv[1:])
    except SystemExit as e:
        print("exit status", e.code)
''')
    return str(script)


def stream_args(base, root, name, *more):
    return ["--dataset=imagefolder", f"--data_dir={root}", f"--name={name}", "--image_size=16",
            f"--tokenizer={base / 'tok.pt'}", "--workers=0", "--batch_size=3", "--chunk=4",
            "--device=cpu", *more]


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
    pd.main(args)                                          # the same command, in this process
    assert "resuming" in capsys.readouterr().out
    for f in ("train.bin", "val.bin", "train_labels.bin", "val_labels.bin"):
        assert (tmp_path / "k" / f).read_bytes() == (ref / f).read_bytes(), f


def test_two_torchrun_processes_write_the_bytes_of_one(streamed, tmp_path):
    base, root, ref = streamed
    env = {**os.environ, "DATA_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", runner(tmp_path), *stream_args(base, root, "t2")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("train.bin", "val.bin", "train_labels.bin", "val_labels.bin"):
        assert (tmp_path / "t2" / f).read_bytes() == (ref / f).read_bytes(), f


def test_a_file_size_limit_is_one_line_and_the_old_tokens_stay(streamed, tmp_path):
    import shutil
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
    assert not [f for _, _, fs in os.walk(tmp_path / "lim") for f in fs if ".tmp" in f or
        f.endswith(".new")], "a temporary was left"


def test_a_run_stopped_before_its_meta_json_is_finished_by_the_same_command(streamed, tmp_path,
                                                                            monkeypatch):
    base, root, ref = streamed
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path))
    run = lambda **kw: pd.stream_folder(str(root), "h", str(base / "tok.pt"), 16, workers=0,
                                        batch_size=3, chunk=4, device="cpu",
                                        log=lambda *a: None, **kw)
    save = pd._save

    def stop_at_the_last_write(path, obj):             # stands for a kill at that moment
        if path.endswith("meta.json") and "tokenizer" in obj:
            raise KeyboardInterrupt
        save(path, obj)
    monkeypatch.setattr(pd, "_save", stop_at_the_last_write)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(pd, "_save", save)
    folder = run()                                      # no --force: the same command
    assert "tokenizer" in json.load(open(os.path.join(folder, "meta.json")))
    assert (tmp_path / "h" / "train.bin").read_bytes() == (ref / "train.bin").read_bytes()
    assert not list((tmp_path / "h").glob(".tokens-*"))


def test_unreadable_files_and_empty_class_folders(streamed, tmp_path, monkeypatch):
    base, _, _ = streamed
    monkeypatch.setattr(pd, "DATA_ROOT", str(tmp_path / "data"))
    root = make_folder(tmp_path / "bad", per_class=4, classes=("a", "b"))
    (root / "b" / "broken.png").write_bytes(b"not a png")
    run = lambda **kw: pd.stream_folder(str(root), "bad", str(base / "tok.pt"), 16, workers=0,
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
