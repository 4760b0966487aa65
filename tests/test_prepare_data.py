"""Tests for prepare_data.py: CPU, tiny tokenizer configs, no network, a few seconds in all."""

import hashlib
import io
import json
import os
import pickle
import shlex
import subprocess
import unicodedata
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import cli
import prepare_data as pd
import token_folder as tf
import vq
import vqgan
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


def test_class_names_are_nfc_whatever_the_file_system_stores(tmp_path):
    nfd = unicodedata.normalize("NFD", "café")                       # as macOS names a folder
    for split, n in (("train", 3), ("val", 1)):
        for c in (nfd, "tea"):
            for i in range(n):
                save(str(tmp_path / split / c / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
    classes, train, val = pd.split_imagefolder(str(tmp_path))
    assert classes == ["café", "tea"] and classes[0] == unicodedata.normalize("NFC", "café")
    assert len(train) == 6 and sorted(y for _, y in val) == [0, 1]


def test_a_flat_val_folder_names_valprep(tmp_path):
    save(str(tmp_path / "train" / "n01" / "a.JPEG"), np.zeros((8, 8, 3), np.uint8))
    save(str(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match=r"val holds its images directly, not in <class> folders; "
                                        r"sort them into .*val/<class>/ .*valprep.sh"):
        pd.split_imagefolder(str(tmp_path))


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
    assert not os.listdir(data_root / "cifar10")                  # no part of a download left
    os.rmdir(data_root / "cifar10")
    with pytest.raises(UserError, match="could not download"):
        pd.prepare("cifar10", log=lambda *a: None)
    assert not os.path.exists(data_root / "cifar10")              # no empty folder left


def test_a_cifar10_tarball_given_to_training_suggests_a_command_that_keeps_it(data_root,
                                                                            monkeypatch):
    tarball = data_root.parent / "dl" / "cifar-10-python.tar.gz"
    os.makedirs(tarball.parent)
    make_cifar_tarball(str(tarball))
    monkeypatch.setattr(pd, "CIFAR10_MD5", hashlib.md5(tarball.read_bytes()).hexdigest())
    monkeypatch.setattr(vq, "PRESETS", {"cifar10": {**vq.PRESETS.get("cifar10", {}), **TINY_VQ}})
    for given in (tarball, tarball.parent):
        with pytest.raises(UserError, match="no prepared tokens") as e:
            tf.open_for_training("cifar10", str(given))
        command = str(e.value).split("`")[1]
        assert command == cli.command("prepare_data.py", "--dataset=cifar10",
                                      f"--data_dir={given}")
        assert f"it writes {data_root / 'cifar10'}: pass that as --data_dir" in str(e.value)
    pd.main(shlex.split(command)[2:])                              # typed: it keeps the tarball
    assert tf.open_for_training("cifar10", str(data_root / "cifar10"))[1]["train_count"] == 15
    assert not os.path.exists(data_root / "cifar10" / "cifar-10-python.tar.gz")

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
    model = vqgan.load_tokenizer(os.path.join(folder, meta["tokenizer"]))
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
        with pytest.raises(UserError, match=message) as e:
            tiny_prepare(**kw)
        assert "\n" not in str(e.value)                   # one line, as cli.run prints it
    with pytest.raises(UserError, match="did you mean 'cifar10'"):
        pd.prepare("cifar", log=lambda *a: None)
    with pytest.raises(UserError, match="--data_dir"):
        pd.prepare("imagefolder", log=lambda *a: None)
    assert not os.path.exists(data_root)


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
