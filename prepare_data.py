"""
prepare_data.py: datasets -> uint8 images -> VQ tokenizer -> uint16 token files for purrception.py.

    python prepare_data.py --dataset=shapes     # procedural, offline: under a minute on 2 CPU cores
    python prepare_data.py --dataset=cifar10    # downloads the official tarball (163 MB) once
    python prepare_data.py --dataset=imagefolder --data_dir=ROOT --name=pets --image_size=64

It writes data/NAME/ next to this file, in three steps, each skipped when its output exists:
    1. {train,val}_images.u8   uint8 (N, H, W, 3) images; {train,val}_labels.bin: uint16 (N,)
    2. vq.pt                   the tokenizer (vq.train_vq)
    3. {train,val}.bin         uint16 (N, h*w) codebook indices, row-major; meta.json
Tokens are redone when vq.pt was retrained (`python vq.py`); --force redoes all three.
Tokenizer settings pass through as --vq.KEY=VALUE (vq.py's options), e.g. --vq.codebook_size=512.

With a tokenizer file (a released one: LlamaGen's VQ-8/VQ-16, LDM's vq-f8) an image folder of any
size streams straight to tokens, resumably, on one GPU or many (stream_folder):
    python prepare_data.py --dataset=imagefolder --data_dir=ROOT --name=imagenet256 \\
        --image_size=256 --tokenizer=vq_ds8_c2i.pt --workers=8
    torchrun --standalone --nproc_per_node=8 prepare_data.py ... (the same flags)

The checks of a data folder live here too, beside the code that writes it (open_folder,
open_for_training): sizes, token and label ranges, meta.json and the tokenizer's hash.
"""

import hashlib
import io
import json
import math
import os
import pickle
import shlex
import shutil
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import cli
import vq
import vqgan
from cli import UserError

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = ("cifar10", "imagefolder", "shapes")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"      # published on the CIFAR-10 page
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
SHAPES_COUNTS = (20000, 2000)      # train, val: enough for a small generator to learn the classes
IMAGE_FILES = ("train_images.u8", "val_images.u8", "train_labels.bin", "val_labels.bin")
TOKEN_FILES = ("train.bin", "val.bin")
FILES = (*IMAGE_FILES, "vq.pt", "vq_recon.png", *TOKEN_FILES, "meta.json")   # all a folder holds


def data_path(name):
    return os.path.join(DATA_ROOT, name)

# -----------------------------------------------------------------------------
# shapes: 10 classes of flat-coloured shapes, drawn at 4x and box-downsampled (anti-aliasing),
# upright but for a tilt of at most 15 degrees: freely rotated, a square is half the time a diamond.

SHAPES_CLASSES = ("circle", "square", "triangle", "plus", "ring", "star", "heart", "crescent",
                  "stripes", "ellipse")
# a dark navy background, and a foreground of bright yellow, white, sky or coral
BACKGROUND = (20, 24, 48)
FOREGROUNDS = ((250, 210, 50), (240, 240, 240), (90, 200, 250), (250, 130, 80))
MAX_TILT = math.radians(15)


def _ngon(n, inner=None):
    """Unit-radius regular polygon (a star given an `inner` radius), first vertex pointing up."""
    k = 2 * n if inner else n
    radii = [inner if inner and i % 2 else 1 for i in range(k)]
    return [(r * math.sin(2 * math.pi * i / k), -r * math.cos(2 * math.pi * i / k))
            for i, r in enumerate(radii)]


_t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
_CIRCLE = list(zip(np.cos(_t), np.sin(_t)))
_HEART = list(zip(np.sin(_t) ** 3,                  # the classic parametric heart, centred
                  (3 + np.cos(4 * _t) + 2 * np.cos(3 * _t) + 5 * np.cos(2 * _t) - 13 * np.cos(_t))
                  / 17))
_PLUS = [(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
         (-1, .3), (-1, -.3), (-.3, -.3)]
_OUTLINES = {"square": ([(-1, -1), (1, -1), (1, 1), (-1, 1)], 0.88), "triangle": (_ngon(3), 1.3),
             "star": (_ngon(5, inner=0.42), 1.15), "plus": (_PLUS, 1.0), "heart": (_HEART, 1.05),
             "ellipse": ([(x, 0.45 * y) for x, y in _CIRCLE], 1.1), "circle": (_CIRCLE, 1.0)}


def _place(points, cx, cy, r, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def make_shapes(n, image_size=16, seed=0):
    """n random shape images, uint8 (n, S, S, 3), and labels (n,) int64: balanced classes; the same
    seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES))
    S = 4 * image_size
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for i in range(n):
        fg = FOREGROUNDS[rng.integers(len(FOREGROUNDS))]
        r = S * rng.uniform(0.26, 0.36)                      # the shape spans 50-70% of the image
        cx, cy = S / 2 + S * rng.uniform(-0.08, 0.08, 2)     # near the centre
        tilt = rng.uniform(-MAX_TILT, MAX_TILT)
        img = Image.new("RGB", (S, S), BACKGROUND)
        draw, kind = ImageDraw.Draw(img), SHAPES_CLASSES[labels[i]]
        if kind in _OUTLINES:
            points, scale = _OUTLINES[kind]
            draw.polygon(_place(points, cx, cy, r * scale, tilt), fill=fg)
        elif kind in ("ring", "crescent"):                   # a disc with a hole, or an offset bite
            draw.polygon(_place(_CIRCLE, cx, cy, r, 0), fill=fg)
            hole = (cx, cy, 0.55 * r) if kind == "ring" else \
                (cx + 0.5 * r * math.cos(tilt), cy + 0.5 * r * math.sin(tilt), 0.85 * r)
            draw.polygon(_place(_CIRCLE, *hole, 0), fill=BACKGROUND)
        else:                                                # stripes: three parallel bars
            for dy in (-0.6, 0.0, 0.6):
                bar = [(-1, dy - .18), (1, dy - .18), (1, dy + .18), (-1, dy + .18)]
                draw.polygon(_place(bar, cx, cy, r, tilt), fill=fg)
        images[i] = np.asarray(img.resize((image_size, image_size), Image.Resampling.BOX))
    return images, labels

# -----------------------------------------------------------------------------
# CIFAR-10: the official python tarball, read straight from the archive (5 train batches, 1 test)


class ArrayUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles, and a pickle can name any function to call. This one admits
    only what the batches hold (containers, numpy arrays, dtypes): a crafted file raises."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{module}", name) for core in ("core", "_core") for module, name in
        (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a CIFAR-10 batch")
        return super().find_class(module, name)


def _download(url, path):
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            mib = -(-int(r.headers.get("Content-Length") or 0) >> 20) or None
            for chunk in cli.progress(iter(lambda: r.read(1 << 20), b""), mib, "download", "MiB"):
                f.write(chunk)
    except OSError as e:                      # URLError, timeouts and HTTP errors are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({e}); fetch it another way, then run "
                        f"`{cli.command('prepare_data.py', '--dataset=cifar10')} "
                        f"--data_dir=PATH/TO/cifar-10-python.tar.gz`") from None
    os.replace(tmp, path)


def load_cifar10(data_dir=None, md5=CIFAR10_MD5, log=print):
    """-> train images (50000, 32, 32, 3) uint8, train labels, val images (10000, ...), val labels,
    class names. data_dir: None (download into data/cifar10/), the tarball, a folder holding it, or
    the extracted folder."""
    folder = data_dir or data_path("cifar10")
    tarball = os.path.join(folder, "cifar-10-python.tar.gz")
    if data_dir is None and not os.path.exists(tarball):
        os.makedirs(folder, exist_ok=True)
        log(f"downloading {CIFAR10_URL} -> {tarball}")
        _download(CIFAR10_URL, tarball)
    found = lambda p: os.path.isfile(p) or os.path.isfile(os.path.join(p, "batches.meta"))
    path = next(filter(found, (tarball, os.path.join(folder, "cifar-10-batches-py"), folder)), None)
    if path is None:
        raise UserError(f"no CIFAR-10 at {data_dir}: expected cifar-10-python.tar.gz or an "
                        f"extracted cifar-10-batches-py")
    if md5 and os.path.isfile(path):
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "md5").hexdigest() != md5:
                raise UserError(f"{path} is not the official CIFAR-10 tarball (its md5 is not "
                                f"{md5}); delete it and download it again from {CIFAR10_URL}")
    names = ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    try:
        if os.path.isdir(path):               # extracted by the user: read the files directly
            blobs = [Path(path, n).read_bytes() for n in names]
        else:
            with tarfile.open(path, "r:gz") as tar:
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                blobs = [tar.extractfile(members[n]).read() for n in names]
        # Python 2 pickles of {b"data": (n, 3072) uint8 as three 32x32 planes, b"labels": [...]}
        meta, *batches = [ArrayUnpickler(io.BytesIO(b), encoding="bytes").load() for b in blobs]
        classes = [s.decode() for s in meta[b"label_names"]]
        images = [np.asarray(b[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                  for b in batches]
        labels = [np.array(b[b"labels"]) for b in batches]
    except (KeyError, OSError, EOFError, TypeError, ValueError, tarfile.TarError,
            pickle.UnpicklingError) as e:
        raise UserError(f"{path} is not a complete CIFAR-10 python copy ({type(e).__name__}: "
                        f"{e})") from None
    return np.concatenate(images[1:]), np.concatenate(labels[1:]), images[0], labels[0], classes

# -----------------------------------------------------------------------------
# image folders: ROOT/<class>/*.png|jpg (10% of each class held out), or ROOT/train|val|test/<class>
#
# Every image goes through ADM's centre crop (guided-diffusion's center_crop_arr, which LlamaGen
# uses for ImageNet too): halve with a box filter while the short side is at least twice the
# target, then bicubic to the target, then crop the centre square. Greyscale, CMYK and palette
# files become RGB first.


def center_crop(im, image_size):
    """A PIL RGB image -> uint8 (S, S, 3), ADM's way (box halvings, bicubic, centre square)."""
    while min(im.size) >= 2 * image_size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    scale = image_size / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(im)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def load_image(path, image_size):
    """Any image file -> uint8 (S, S, 3): RGB, ADM's centre crop."""
    with Image.open(path) as im:
        return np.ascontiguousarray(center_crop(im.convert("RGB"), image_size))


def _scan(folder, classes=None):
    """-> class names (sorted folder names, or the given ones), [(file, label)] of each image. A
    class folder without images is an error when the classes are read here (not for a val split)."""
    found = sorted(d for d in os.listdir(folder)
                   if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    if set(found) - set(classes or found):
        raise UserError(f"{folder} has classes {sorted(set(found) - set(classes))} that the train "
                        f"split does not have")
    files, counts = [], {}
    for label, c in enumerate(classes or found):
        walk = sorted(os.walk(os.path.join(folder, c))) if c in found else []
        mine = [(os.path.join(d, f), label) for d, _, fs in walk for f in sorted(fs)
                if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
        files += mine
        counts[c] = len(mine)
    if not files:
        raise UserError(f"no {'/'.join(IMAGE_EXTS)} images in {folder}/<class>/; expected "
                        f"ROOT/<class>/*.png|jpg")
    empty = [c for c, n in counts.items() if n == 0]
    if classes is None and empty:             # a class the generator could never learn
        raise UserError(f"the class folder {os.path.join(folder, empty[0])} has no "
                        f"{'/'.join(IMAGE_EXTS)} images ({len(empty)} such); add images or "
                        f"remove it")
    return found if classes is None else classes, files


def split_imagefolder(root, seed=0, val_fraction=0.1):
    """-> class names (sorted folder names), [(file, label)] of train and of val."""
    if not root or not os.path.isdir(root):
        raise UserError(f"image folder {root!r} does not exist; pass --data_dir=ROOT holding "
                        f"ROOT/<class>/*.png|jpg")
    split = next((os.path.join(root, s) for s in ("val", "test")
                  if os.path.isdir(os.path.join(root, s))), None)
    if split and os.path.isdir(os.path.join(root, "train")):
        classes, train = _scan(os.path.join(root, "train"))
        val = _scan(split, classes)[1]
    else:                                     # held out per class, so val has every class
        classes, files = _scan(root)
        rng, labels, held = np.random.default_rng(seed), np.array([y for _, y in files]), set()
        for c in range(len(classes)):
            idx = np.flatnonzero(labels == c)
            k = max(1, round(val_fraction * len(idx))) if len(idx) > 1 else 0
            held.update(rng.permutation(idx)[:k].tolist())
        train = [x for i, x in enumerate(files) if i not in held]
        val = [files[i] for i in sorted(held)]
    if not val:
        raise UserError(f"{root}: no images left for validation; give some class at least two "
                        f"images")
    return list(classes), train, val


def load_imagefolder(root, image_size, seed=0, val_fraction=0.1):
    """-> train images, train labels, val images, val labels, class names (sorted folder names),
    all in memory: for small folders whose tokenizer is trained here."""
    classes, train, val = split_imagefolder(root, seed, val_fraction)

    def load(files, desc):
        images = np.empty((len(files), image_size, image_size, 3), np.uint8)
        for i, (path, _) in enumerate(cli.progress(files, desc=desc, unit="img")):
            try:
                images[i] = load_image(path, image_size)
            except Exception as e:            # PIL raises many kinds; name the file instead
                raise UserError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
        return images, np.array([y for _, y in files])
    return (*load(train, "train images"), *load(val, "val images"), classes)


def vq_options(dataset=None):
    """Every --vq.KEY with its default after the dataset's preset: vq.VQConfig's fields (but
    image_size, a flag of its own) and vq.py's training settings (but its dataset and output)."""
    shape = {k: v for k, v in asdict(vq.VQConfig()).items() if k != "image_size"}
    train = {k: v for k, v in asdict(vq.TrainConfig()).items() if k not in ("dataset", "out")}
    return {**shape, **train, **vq.PRESETS.get(dataset, {})}


def write_file(path, parts, size=None):
    """Write the byte strings `parts` yields, one after another, to path through cli.atomic_save
    (a full disk or a file-size limit: one line, the old file intact, no temporary left)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
    cli.atomic_save(write, path, size)


def tokenize(model, images, path, batch_size=1000, desc="tokenize", log=print):
    """uint8 (N, H, W, 3) images -> uint16 (N, h*w) code indices written to `path`; -> (h, w)."""
    t0, grid = time.time(), []

    def parts():
        for i in cli.progress(range(0, len(images), batch_size), desc=desc, unit="batch"):
            idx = model.encode(np.array(images[i:i + batch_size]))     # (b, h, w) int64
            grid[:] = idx.shape[1:]
            yield idx.reshape(len(idx), -1).numpy().astype(np.uint16).tobytes()
    write_file(path, parts())
    dt = time.time() - t0
    log(f"{desc}: {len(images)} images in {dt:.1f}s ({len(images) / dt:.0f} images/s)")
    return tuple(grid)


def _save(path, obj):
    """Write atomically: a dict as JSON, an array as its raw bytes."""
    if isinstance(obj, dict):
        return cli.write_json(obj, path)
    write_file(path, [np.ascontiguousarray(obj).tobytes()])


# -----------------------------------------------------------------------------
# prepare(): the small-data path, in three steps, each skipped when its output exists


def check_settings(dataset, data_dir, image_size, seed, vq_overrides):
    """Every setting checked before anything is read or written. -> (tokenizer config, its
    training arguments, the options the user set)."""
    if dataset not in DATASETS:
        hint = next((f" (did you mean {d!r}?)" for d in DATASETS if d.startswith(dataset[:3])), "")
        raise UserError(f"unknown dataset {dataset!r}{hint}; choose one of {', '.join(DATASETS)}")
    if dataset == "imagefolder" and not data_dir:
        raise UserError("--dataset=imagefolder needs --data_dir=ROOT, a folder of "
                        "ROOT/<class>/*.png|jpg")
    opts, asked = vq_options(dataset), dict(vq_overrides or {})
    for key in (k for k in asked if k not in opts):
        hint = next((f" (did you mean {k!r}?)" for k in opts if k[:4] == key[:4]), "")
        raise UserError(f"vq: unknown option {key!r}{hint}")
    settings = {**opts, "seed": seed, **asked}
    try:                                  # side vs downsampling factor, K <= 65536, channels
        shape = asdict(vq.VQConfig()).keys() - {"image_size"}
        cfg = vq.VQConfig(image_size=image_size, **{k: settings[k] for k in shape})
        vq.check_config(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    train_kw = {k: settings[k] for k in ("max_iters", "batch_size", "lr", "eval_interval", "seed")}
    return cfg, train_kw, settings, asked


def check_folder(folder, p, dataset, image_size, cfg, train_kw, asked, name):
    """The folder's own settings must be the asked ones (those the user set explicitly), and a
    vq.pt in it must have been trained for these images. -> (meta, the tokenizer or None)."""
    meta = cli.read_json(p["meta.json"]) if os.path.exists(p["meta.json"]) else {}
    have = {"dataset": meta.get("dataset"), "image_size": meta.get("image_size"),
            **meta.get("vq_config", {}), **meta.get("vq_train", {})}
    want = {"dataset": dataset, "image_size": image_size, **asdict(cfg), **train_kw}
    diff = [f"{k}={have[k]} (asked for {want[k]})" for k in ["dataset", "image_size", *asked]
            if k not in ("device", "eval_interval") and have.get(k) not in (None, want.get(k))]
    if diff:
        raise UserError(f"{folder} was made with {', '.join(diff)}; pass --force to redo it, "
                        f"or --name=OTHER")
    if not os.path.exists(p["vq.pt"]):
        return meta, None
    ckpt = vq.read_vq(p["vq.pt"])         # one trained for other images must not tokenize these
    if "released" in ckpt:
        raise UserError(f"{folder} was tokenized with {ckpt['released']}: pass --tokenizer="
                        f"{ckpt['released']} to use it, or --force to train a tokenizer here")
    on, px = ckpt.get("trained_on"), ckpt.get("vq_config", {}).get("image_size")
    if px != image_size or on not in (None, "", name):
        raise UserError(f"{p['vq.pt']} was trained for other images ({on or 'another folder'}, "
                        f"{px}px); remove it, or pass --force to retrain it")
    return meta, vq.load_vq(p["vq.pt"])


def make_images(dataset, data_dir, image_size, seed, folder, p, log):
    """Step 1: {train,val}_images.u8 and _labels.bin, and meta.json's first fields. -> meta."""
    t0 = time.time()
    if dataset == "shapes":
        (x, y), n = make_shapes(sum(SHAPES_COUNTS), image_size, seed), SHAPES_COUNTS[0]
        splits = x[:n], y[:n], x[n:], y[n:], list(SHAPES_CLASSES)
    elif dataset == "cifar10":
        splits = load_cifar10(data_dir, log=log)
    else:
        splits = load_imagefolder(data_dir, image_size, seed)
    train_x, train_y, val_x, val_y, classes = splits
    if train_x.shape[1] != image_size:       # CIFAR-10 at another size
        resize = lambda ims: np.stack([np.asarray(Image.fromarray(im).resize(
            (image_size, image_size), Image.Resampling.BICUBIC)) for im in ims])
        train_x, val_x = resize(train_x), resize(val_x)
    os.makedirs(folder, exist_ok=True)
    for split, x, y in (("train", train_x, train_y), ("val", val_x, val_y)):
        _save(p[f"{split}_images.u8"], np.asarray(x, np.uint8))
        _save(p[f"{split}_labels.bin"], np.asarray(y, np.uint16))
    meta = {"dataset": dataset, "image_size": image_size, "seed": seed,
            "num_classes": len(classes), "class_names": classes, "train_count": len(train_x),
            "val_count": len(val_x)}
    _save(p["meta.json"], meta)
    log(f"wrote {len(train_x)} train and {len(val_x)} val {image_size}x{image_size} images to "
        f"{folder} in {time.time() - t0:.1f}s")
    return meta


def make_tokenizer(train_u8, val_u8, cfg, train_kw, device, folder, p, meta, name, log):
    """Step 2: vq.pt, trained under another name, so an interruption leaves no half-trained
    vq.pt. -> the tokenizer."""
    log(f"training the tokenizer: {asdict(cfg)} {train_kw}")
    partial = os.path.join(folder, "vq_partial.pt")
    vq.train_vq(train_u8, np.array(val_u8), cfg, partial, device=device, log=log,
                trained_on=name, **train_kw)
    os.replace(partial, p["vq.pt"])
    if os.path.exists(os.path.join(folder, "vq_partial_recon.png")):
        os.replace(os.path.join(folder, "vq_partial_recon.png"), p["vq_recon.png"])
    meta["vq_train"] = train_kw
    _save(p["meta.json"], meta)
    return vq.load_vq(p["vq.pt"])


def make_tokens(model, train_u8, val_u8, device, folder, p, meta, log):
    """Step 3: {train,val}.bin, redone whenever vq.pt is not the file they were made with (after
    `python vq.py`); meta.json completed."""
    sha1 = vq.file_sha1(p["vq.pt"])
    if meta.get("tokenizer_sha1") == sha1 and all(os.path.exists(p[f]) for f in TOKEN_FILES):
        log(f"{folder}: tokens exist, skipping")
        return
    model.to(device)
    h, w = tokenize(model, train_u8, p["train.bin"], desc="tokenize train", log=log)
    tokenize(model, val_u8, p["val.bin"], desc="tokenize val", log=log)
    K = model.cfg.codebook_size
    meta.update(grid_h=h, grid_w=w, codebook_size=K, code_dim=int(model.codebook.shape[1]),
                vq_config=asdict(model.cfg), tokenizer="vq.pt", tokenizer_sha1=sha1)
    _save(p["meta.json"], meta)
    log(f"wrote {folder}: {meta['train_count']} train / {meta['val_count']} val images as {h}x{w} "
        f"tokens in [0, {K})")


def prepare(dataset, name=None, data_dir=None, force=False, image_size=0, seed=0, vq_overrides=None,
            log=print, tokenizer="", **stream):
    """Make data/NAME/ (images, labels, tokenizer, tokens, meta.json), skipping what exists;
    -> the folder. image_size=0: 16 for shapes, 256 with a tokenizer file, else 32. Every
    setting, and the folder's files against them, is checked before anything is written. With
    a tokenizer file (tokenizer=PATH) an image folder streams straight to tokens (stream_folder:
    its keywords pass through)."""
    if tokenizer:
        if dataset != "imagefolder" or not data_dir:
            raise UserError("--tokenizer=FILE tokenizes an image folder: pass "
                            "--dataset=imagefolder --data_dir=ROOT too")
        if vq_overrides:
            raise UserError(f"--vq.{next(iter(vq_overrides))} trains a tokenizer here; with "
                            f"--tokenizer=FILE none is trained: drop it")
        return stream_folder(data_dir, name or dataset, tokenizer, image_size or 256, force=force,
                             seed=seed, log=log, **stream)
    name, image_size = name or dataset, image_size or (16 if dataset == "shapes" else 32)
    cfg, train_kw, settings, asked = check_settings(dataset, data_dir, image_size, seed,
                                                    vq_overrides)
    folder = data_path(name)
    p = {f: os.path.join(folder, f) for f in FILES}
    if force:
        for f in filter(os.path.exists, p.values()):
            os.remove(f)
    meta, model = check_folder(folder, p, dataset, image_size, cfg, train_kw, asked, name)

    if meta.get("class_names") and all(os.path.exists(p[f]) for f in IMAGE_FILES):
        log(f"{folder}: images exist ({meta['train_count']} train, {meta['val_count']} val), "
            f"skipping")
    else:
        meta = make_images(dataset, data_dir, image_size, seed, folder, p, log)
    train_u8, val_u8 = (np.memmap(p[f"{s}_images.u8"], np.uint8, "r").reshape(
        -1, image_size, image_size, 3) for s in ("train", "val"))
    device = cli.pick_device(settings["device"])
    if model is not None:
        log(f"{folder}: tokenizer vq.pt exists, skipping its training")
    else:
        model = make_tokenizer(train_u8, val_u8, cfg, train_kw, device, folder, p, meta, name, log)
    make_tokens(model, train_u8, val_u8, device, folder, p, meta, log)
    return folder

# -----------------------------------------------------------------------------
# an image folder at ImageNet scale, with a tokenizer brought as a file (--tokenizer=FILE)
#
# Nothing per image is kept but its tokens. Worker processes decode and crop (--workers); the
# encoder takes batches on the best device; every `chunk` images become one small file
# data/NAME/.tokens-KEY/{split}.{c:06d}.npz (tokens, labels, unreadable files), written
# atomically as it comes. A run killed at any moment (kill -9) resumes from the chunks on disk.
# Under torchrun process r encodes chunks r, r + world, ...; a chunk's batches are the same
# whichever process encodes it, so the token files, assembled in order at the end, are
# byte-identical to one process's. KEY hashes all the tokens depend on (the tokenizer file, the
# image size, the file list, chunk and batch sizes), so other settings never mix with a run's
# chunks.


class ImageFiles(torch.utils.data.Dataset):
    """[(file, label)] -> (index, uint8 (S, S, 3) image or None, what went wrong). The paths live
    in one numpy array: a forked worker that reads Python strings writes their reference counts,
    and so copies, page by page, the list it inherited (162 bytes an image)."""

    def __init__(self, files, image_size):
        self.paths, self.image_size = np.array([os.fsencode(f) for f, _ in files]), image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, load_image(os.fsdecode(self.paths[i]), self.image_size), ""
        except Exception as e:                # PIL raises many kinds; name the file instead
            return i, None, f"{type(e).__name__}: {e}"


def as_list(batch):
    return batch


def end_with_parent(worker_id):
    """Linux: a decoding worker ends when the process that started it does, even after a kill -9
    (which leaves the loader no chance to stop it)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):       # another OS: the loader's own checks remain
        pass


def check_space(folder, nbytes, largest):
    """Refuse before writing when the disk cannot hold nbytes more, or this process may not
    write a file of `largest` bytes (ulimit -f)."""
    free, limit = cli._free_bytes(os.path.join(folder, "x")), cli._file_size_limit()
    size = lambda n: f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"
    why = (f"only {size(free)} are free there" if free < nbytes else
           f"this process may write files of at most {size(limit)} (ulimit -f)"
           if limit is not None and limit < largest else "")
    if why:
        raise UserError(f"the tokens need {size(nbytes)} in {folder} (the largest file "
                        f"{size(largest)}), but {why}; make room and run again")


def stream_split(model, files, workdir, split, image_size, *, chunk, batch_size, workers,
                 skip_unreadable, rank=0, world=1, log=print):
    """Encode this process's missing chunks of files [(file, label)] into workdir."""
    n_chunks = -(-len(files) // chunk)
    todo = [c for c in range(rank, n_chunks, world)
            if not os.path.exists(os.path.join(workdir, f"{split}.{c:06d}.npz"))]
    bounds = [(c * chunk, min((c + 1) * chunk, len(files))) for c in todo]
    batches = [range(s, min(s + batch_size, end)) for start, end in bounds
               for s in range(start, end, batch_size)]
    if len(todo) < len(range(rank, n_chunks, world)):
        log(f"tokenize {split}: resuming, {len(todo)} of {n_chunks} chunks left to this process")
    # the loader keeps at most 2 batches a worker in flight: memory does not grow with the images
    loader = torch.utils.data.DataLoader(ImageFiles(files, image_size), batch_sampler=batches,
                                         num_workers=workers, collate_fn=as_list,
                                         worker_init_fn=end_with_parent)
    tokens, labels, skipped, t0, n = [], [], [], time.time(), 0
    for batch in cli.progress(loader, total=len(batches), desc=f"tokenize {split}", unit="batch"):
        for i, _, err in (b for b in batch if b[1] is None):
            if not skip_unreadable:
                raise UserError(f"cannot read image {files[i][0]} ({err}); replace it, or pass "
                                f"--skip_unreadable=true to leave out such files (counted)")
            skipped.append(i)
        good = [(i, image) for i, image, _ in batch if image is not None]
        if good:
            idx = model.encode(np.stack([image for _, image in good]), batch_size=len(good))
            tokens.append(idx.reshape(len(good), -1).numpy().astype(np.uint16))   # (b, h*w)
            labels += [files[i][1] for i, _ in good]
        n, last = n + len(batch), batch[-1][0]
        if last + 1 == min((last // chunk + 1) * chunk, len(files)):     # the chunk is complete
            arrays = dict(tokens=np.concatenate(tokens) if tokens else np.zeros((0, 0), np.uint16),
                          labels=np.array(labels, np.uint16), skipped=np.array(skipped, np.int64))
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            write_file(os.path.join(workdir, f"{split}.{last // chunk:06d}.npz"),
                       [buffer.getvalue()])
            tokens, labels, skipped = [], [], []
    if n:
        dt = time.time() - t0
        log(f"tokenize {split}: {n} images in {dt:.1f}s ({n / dt:.2f} images/s, "
            f"{workers} decoding workers)")


def read_chunks(workdir, split, n):
    """The chunk files of a split, in order, one at a time -> (tokens, labels, skipped)."""
    for c in range(n):
        path = os.path.join(workdir, f"{split}.{c:06d}.npz")
        if not os.path.exists(path):
            raise UserError(f"{path} is missing; run the same command again to encode it")
        with np.load(path, allow_pickle=False) as z:
            yield z["tokens"], z["labels"], z["skipped"]


def remove_chunks(folder, keep, log):
    """Remove the chunk folders in folder but keep (a path, or None)."""
    for old in os.listdir(folder):
        if old.startswith(".tokens-") and os.path.join(folder, old) != keep:
            log(f"removing {old}: the chunks of other settings or of a finished run")
            shutil.rmtree(os.path.join(folder, old))


def all_agree(ok, world, device):
    """True when every process says ok (one all-reduce; the processes wait for each other)."""
    if world == 1:
        return ok
    import torch.distributed as dist
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def stream_folder(data_dir, name, tokenizer, image_size=256, *, force=False, seed=0, workers=4,
                  batch_size=64, chunk=1024, skip_unreadable=False, device="", rank=0, world=1,
                  log=print):
    """An image folder -> data/NAME/{train,val}.bin and _labels.bin and meta.json, streamed
    through the tokenizer file (vq.load_vq: vq.py's own, LlamaGen's, LDM's). -> the folder."""
    for key, value in (("workers", workers), ("batch_size", batch_size), ("chunk", chunk)):
        if value < (0 if key == "workers" else 1):
            raise UserError(f"--{key}={value} is impossible: it must be at least "
                            f"{0 if key == 'workers' else 1}")
    classes, train, val = split_imagefolder(data_dir, seed)
    device = device or cli.pick_device("")
    model = vq.load_vq(tokenizer, device)
    f = model.cfg.image_size // model.cfg.grid
    if isinstance(model, vqgan.VQGAN):
        model.cfg = replace(model.cfg, image_size=image_size)
    if model.cfg.image_size != image_size or image_size % f:
        raise UserError(f"the tokenizer {tokenizer} takes {model.cfg.image_size}px images with a "
                        f"grid of {f}px cells; pass a matching --image_size")
    K, L = model.cfg.codebook_size, model.cfg.grid ** 2
    if K > 65536:
        raise UserError(f"the tokenizer {tokenizer} has K={K} codes: more than uint16 tokens hold")
    folder, sha1 = data_path(name), vq.file_sha1(tokenizer)
    p = {f: os.path.join(folder, f) for f in FILES}
    meta = cli.read_json(p["meta.json"]) if os.path.exists(p["meta.json"]) else {}
    made = {"dataset": meta.get("dataset"), "image_size": meta.get("image_size"),
            "released_sha1": meta.get("released_sha1")}
    asked = {"dataset": "imagefolder", "image_size": image_size, "released_sha1": sha1}
    if made == asked and "tokenizer" in meta and not force and all(
            os.path.exists(p[f]) for f in TOKEN_FILES):
        if rank == 0:
            remove_chunks(folder, None, log)   # left by a run stopped after its last write
        log(f"{folder}: tokens exist, skipping")
        return folder
    if meta and made != asked and not force:     # (made == asked: a run stopped while finishing)
        diff = [f"{k}={v} (asked for {asked[k]})" if k != "released_sha1" else
                f"the tokenizer {meta.get('released_tokenizer', 'vq.pt')} (not {tokenizer})"
                for k, v in made.items() if v != asked[k]]
        raise UserError(f"{folder} was made with {', '.join(diff) or 'other settings'}; pass "
                        f"--force to redo it (its files are replaced only when the new ones "
                        f"are complete), or --name=OTHER")
    splits, key = {"train": train, "val": val}, hashlib.sha1(
        json.dumps([sha1, image_size, chunk, batch_size, skip_unreadable]).encode())
    for split, files in splits.items():           # the file list, without one big string
        for path, label in files:
            key.update(f"{split}\0{path}\0{label}\n".encode())
    key = key.hexdigest()[:12]
    workdir = os.path.join(folder, f".tokens-{key}")
    os.makedirs(workdir, exist_ok=True)
    if rank == 0:                             # chunks of other settings can never be used
        remove_chunks(folder, workdir, log)
    done = sum(os.path.getsize(os.path.join(workdir, c)) for c in os.listdir(workdir))
    total = 2 * L * (len(train) + len(val)) + 2 * (len(train) + len(val))
    check_space(folder, 2 * total - done, 2 * L * len(train))
    log(f"tokenizing {len(train)} train and {len(val)} val images of {len(classes)} classes from "
        f"{data_dir} with {tokenizer} (K={K}, {model.cfg.grid}x{model.cfg.grid} grid) on "
        f"{device}, {world} process{'es' * (world > 1)}")
    error = None
    try:
        for split, files in splits.items():
            stream_split(model, files, workdir, split, image_size, chunk=chunk,
                         batch_size=batch_size, workers=workers, skip_unreadable=skip_unreadable,
                         rank=rank, world=world, log=log)
    except UserError as e:                    # the others must not wait for this process forever
        error = e
    if not all_agree(error is None, world, device):
        raise error or UserError("another process stopped (its error is above); fix it and run "
                                 "the same command again: it resumes")
    if rank != 0:
        return folder

    # every chunk is on disk: the new files are assembled beside the old ones (FILE.new), and
    # replace them only once all are written; until meta.json is, the folder reads as half made
    counts, unreadable, staged = {}, [], []
    try:
        for split, files in (("val", val), ("train", train)):
            n = -(-len(files) // chunk)
            labels = np.concatenate([y for _, y, _ in read_chunks(workdir, split, n)])
            unreadable += [files[i][0] for _, _, s in read_chunks(workdir, split, n) for i in s]
            staged += [p[f"{split}.bin"], p[f"{split}_labels.bin"]]
            chunks = read_chunks(workdir, split, n)
            write_file(p[f"{split}.bin"] + ".new", (t.tobytes() for t, _, _ in chunks),
                       2 * L * len(labels))
            write_file(p[f"{split}_labels.bin"] + ".new", [labels.tobytes()])
            counts[split] = len(labels)
        staged.append(p["vq.pt"])              # data/NAME/vq.pt stands for the tokenizer file
        vq.save_pointer(p["vq.pt"] + ".new", tokenizer, image_size)
    except UserError as e:
        for f in (f + ".new" for f in staged if os.path.exists(f + ".new")):
            os.remove(f)
        raise UserError(f"{e} ({folder}'s own files are as they were, and the same command "
                        f"resumes from the chunks on disk)") from None
    if "tokenizer" in meta:
        _save(p["meta.json"], {k: v for k, v in meta.items() if k != "tokenizer"})
    for f in staged:
        os.replace(f + ".new", f)
    meta = {"dataset": "imagefolder", "image_size": image_size, "seed": seed,
            "num_classes": len(classes), "class_names": classes, "train_count": counts["train"],
            "val_count": counts["val"], "grid_h": model.cfg.grid, "grid_w": model.cfg.grid,
            "codebook_size": K, "code_dim": int(model.codebook.shape[1]), "tokenizer": "vq.pt",
            "tokenizer_sha1": vq.file_sha1(p["vq.pt"]), "released_tokenizer":
            os.path.abspath(tokenizer), "released_sha1": sha1,
            "tokenizer_config": asdict(model.cfg), "preprocessing": "ADM centre crop",
            "unreadable_skipped": len(unreadable)}
    _save(p["meta.json"], meta)
    shutil.rmtree(workdir)
    for stale in ("train_images.u8", "val_images.u8", "vq_recon.png"):   # of a run without one
        if os.path.exists(p[stale]):
            os.remove(p[stale])
    if unreadable:
        log(f"skipped {len(unreadable)} unreadable images, e.g. {unreadable[0]}")
    log(f"wrote {folder}: {counts['train']} train / {counts['val']} val images as "
        f"{model.cfg.grid}x{model.cfg.grid} tokens in [0, {K})")
    return folder


# -----------------------------------------------------------------------------
# the checks of a token folder, for every reader of one (purrception.py, sample.py, bench.py)


SOURCE = "source.json"     # how prepare_data.py was asked to make the folder; outlives meta.json


def remake_command(data_dir, meta=None, force=False):
    """-> (the prepare_data.py command line that makes data_dir again, the folder it writes), from
    data_dir's source.json (written by every `python prepare_data.py` run), else from meta.json;
    ROOT stands for an image folder that neither records."""
    source = os.path.join(data_dir, SOURCE)
    try:
        args = cli.read_json(source) if os.path.exists(source) else {}
    except UserError:
        args = {}
    if not args:
        name, meta = os.path.basename(os.path.normpath(data_dir)), meta or {}
        dataset = meta.get("dataset") or name
        args = {"dataset": dataset if dataset in DATASETS else "imagefolder", "name": name,
                "image_size": meta.get("image_size", 0), "seed": meta.get("seed", 0)}
        if args["dataset"] == "imagefolder":
            args["data_dir"] = "ROOT"
    default_size = 16 if args["dataset"] == "shapes" else 256 if args.get("tokenizer") else 32
    words = [f"--dataset={args['dataset']}"] + [
        f"--{k}={args[k]}" for k in ("data_dir", "name", "image_size", "seed", "tokenizer")
        if args.get(k) and not (k == "name" and args[k] == args["dataset"])
        and not (k == "image_size" and args[k] == default_size)]
    words += [f"--vq.{k}={v}" for k, v in args.get("vq", {}).items()] + ["--force"] * force
    return cli.command("prepare_data.py", *words), data_path(args.get("name") or args["dataset"])


def remake(data_dir, meta=None, force=False):
    """remake_command as a hint: in backticks, and where it writes when that is not data_dir."""
    command, made = remake_command(data_dir, meta, force)
    if os.path.abspath(made) == os.path.abspath(data_dir):
        return f"`{command}`"
    return f"`{command}` (it writes {made}: pass --data_dir={made})"


def record_source(folder, opt, vq_overrides):
    """source.json: the arguments that made folder, with absolute paths, for remake_command."""
    args = {k: v for k, v in asdict(opt).items() if k != "force"}
    for key in ("data_dir", "tokenizer"):
        if args.get(key):
            args[key] = os.path.abspath(args[key])
    cli.write_json({**args, "vq": dict(vq_overrides)}, os.path.join(folder, SOURCE))


def load_meta(data_dir):
    """meta.json of a token folder (K, d, grid, classes, counts, the tokenizer file), checked
    against the token files it describes: any mismatch is a UserError naming the file and the
    command that makes it again, before anything is trained."""
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        raise UserError(f"no prepared tokens in {data_dir} (no meta.json); make them with "
                        f"{remake(data_dir)}")
    meta = cli.read_json(os.path.join(data_dir, "meta.json"))
    need = ("grid_h", "grid_w", "codebook_size", "code_dim", "num_classes", "train_count",
            "val_count", "tokenizer")
    if not isinstance(meta, dict) or not all(k in meta for k in need):
        meta = meta if isinstance(meta, dict) else {}
        raise UserError(f"{data_dir} is only half prepared; finish it with "
                        f"{remake(data_dir, meta)}")
    for split in ("train", "val"):
        n, hw = meta[f"{split}_count"], meta["grid_h"] * meta["grid_w"]
        for name, size in ((f"{split}.bin", n * hw * 2), (f"{split}_labels.bin", n * 2)):
            path = os.path.join(data_dir, name)
            have = os.path.getsize(path) if os.path.exists(path) else None
            if have != size:
                raise UserError(
                    f"{path} " + ("is missing" if have is None else f"holds {have} bytes where "
                                  f"meta.json says {size}")
                    + f"; it is damaged: make the folder again with "
                      f"{remake(data_dir, meta, force=True)}")
    return meta


def check_tokens(data_dir, meta):
    """Every token < K and every label < num_classes: a cheap pass over the files
    (31 MB for CIFAR-10)."""
    for split in ("train", "val"):
        for name, limit in ((f"{split}.bin", meta["codebook_size"]),
                            (f"{split}_labels.bin", meta["num_classes"])):
            top = int(np.memmap(os.path.join(data_dir, name), dtype=np.uint16, mode="r")
                      .max(initial=0))
            if top >= limit:
                raise UserError(f"{os.path.join(data_dir, name)} holds {top}, but meta.json allows "
                                f"< {limit}: the tokens and meta.json disagree; make the folder "
                                f"again with {remake(data_dir, meta, force=True)}")


def open_folder(data_dir, device="cpu", check=True):
    """A token folder -> (meta, tokenizer on device), with meta.json checked against the token
    files (and, with check, every token against K) and the tokenizer checked, not trusted, to be
    the file that made the tokens: the images' size, the downsampling factor, K, d and the grid,
    then its sha1 against meta.json's tokenizer_sha1. A UserError naming the file and the command
    to re-run otherwise."""
    meta = load_meta(data_dir)
    if check:
        check_tokens(data_dir, meta)
    path = os.path.join(data_dir, meta["tokenizer"])
    if not os.path.exists(path):
        raise UserError(f"no tokenizer at {path}; train it again and re-tokenize with "
                        f"{remake(data_dir, meta)}")
    tokenizer = vq.load_vq(path, device)
    command, made = remake_command(data_dir, meta)
    redo = (f"put the tokenizer that made them back, or train another and retokenize: "
            + (f"`rm {shlex.quote(path)} && {command}`" if os.path.samefile(made, data_dir)
               else remake(data_dir, meta)) if os.path.isdir(made) else remake(data_dir, meta))
    c, made = tokenizer.cfg, meta.get("vq_config", {})
    have = (getattr(c, "image_size", None), getattr(c, "downsample", None))
    px = meta.get("image_size", have[0])
    want = (px, made.get("downsample", px // meta["grid_h"] if px else have[1]))
    if have != want:
        raise UserError(f"the tokenizer {path} reads {have[0]}px images downsampled {have[1]}x, "
                        f"but the tokens in {data_dir} were made from {want[0]}px images "
                        f"downsampled {want[1]}x; {redo}")
    have = (c.codebook_size, c.code_dim, c.grid)
    if have != (meta["codebook_size"], meta["code_dim"], meta["grid_h"]):
        raise UserError(f"the tokenizer {path} has K={have[0]}, d={have[1]}, a {have[2]}-grid but "
                        f"the tokens were made with K={meta['codebook_size']}, d={meta['code_dim']}"
                        f", a {meta['grid_h']}-grid; {redo}")
    if meta.get("tokenizer_sha1") and vq.file_sha1(path) != meta["tokenizer_sha1"]:
        raise UserError(f"the tokenizer {path} is not the file that made the tokens in {data_dir} "
                        f"(its sha1 is not meta.json's tokenizer_sha1); put that one back, or "
                        f"retokenize with this one: {remake(data_dir, meta)}")
    return meta, tokenizer


@dataclass
class PrepareConfig:
    dataset: str = ""             # cifar10 | imagefolder | shapes
    name: str = ""                # the folder data/<name>; '' means the dataset's name
    data_dir: str = ""            # a local CIFAR-10 copy (tarball or extracted), or an image folder
    image_size: int = 0           # image side; 0 means 16 for shapes, 256 with --tokenizer, else 32
    force: bool = False           # redo all three steps (with --tokenizer: redo the tokens)
    seed: int = 0                 # shapes: the images; imagefolder: the held out; tokenizer init
    # an image folder streamed through a tokenizer file (LlamaGen's, LDM's or one of vq.py's)
    tokenizer: str = ""           # the tokenizer file; '' trains one here (small data sets)
    workers: int = 4              # processes that decode and crop images (0: this process)
    batch_size: int = 64          # images a batch of the encoder
    chunk: int = 1024             # images a resumable piece (a kill loses at most one a process)
    skip_unreadable: bool = False  # leave out (and count) files that do not decode, not stop
    device: str = ""              # encoder device; '' picks cuda, then mps, then cpu


def open_for_training(dataset, data_dir="", launched=False, device="cpu"):
    """The token folder a training run reads: data_dir, else data/<dataset>, prepared on the spot
    when missing (shapes and cifar10, unless launched by torchrun) -> (folder, meta, tokenizer on
    device), checked by open_folder. The grid must be square (the DiT's)."""
    folder = data_dir or data_path(dataset)
    if not os.path.exists(os.path.join(folder, "meta.json")):
        if data_dir or launched or dataset not in ("shapes", "cifar10"):
            raise UserError(f"no prepared tokens in {folder}; run "
                            f"{remake(folder, {'dataset': dataset})}"
                            + (" once before torchrun" if launched else ""))
        print(f"no prepared data in {folder}: preparing it now (prepare_data.prepare('{dataset}'))")
        prepare(dataset)
    meta, tokenizer = open_folder(folder, device)
    if meta["grid_h"] != meta["grid_w"]:
        raise UserError(f"the token grid {(meta['grid_h'], meta['grid_w'])} is not square; "
                        "prepare square images (prepare_data crops them)")
    return folder, meta, tokenizer

def main(argv):
    t0 = time.time()
    dataset = next((a.partition("=")[2] for a in argv if a.startswith("--dataset=")), None)
    vq_help = {**cli.field_comments(vq.VQConfig), **cli.field_comments(vq.TrainConfig)}
    opt, extra = cli.parse_args(argv, PrepareConfig(), doc=__doc__,
                                extra={"vq.": vq_options(dataset)}, extra_help=vq_help)
    if not opt.dataset:
        raise UserError(f"pass --dataset=NAME, one of {', '.join(DATASETS)} (see --help)")
    cli.check_ranges(opt, {"image_size": (lambda v: v >= 0,
                                           "at least 0 (0: the dataset's default)")})
    cli.pick_device(extra.get("vq.", {}).get("device", ""), "--vq.device")   # before any write
    if not opt.tokenizer:
        folder = prepare(opt.dataset, opt.name or None, opt.data_dir or None, opt.force,
                         opt.image_size, opt.seed, extra.get("vq.", {}))
        record_source(folder, opt, extra.get("vq.", {}))
        return print(f"done in {time.time() - t0:.0f}s: {folder}")
    rank, _, world, device = cli.setup_distributed(opt.device)
    try:
        folder = prepare(opt.dataset, opt.name or None, opt.data_dir or None, opt.force,
                         opt.image_size, opt.seed, extra.get("vq.", {}),
                         log=print if rank == 0 else lambda *a: None, tokenizer=opt.tokenizer,
                         workers=opt.workers, batch_size=opt.batch_size, chunk=opt.chunk,
                         skip_unreadable=opt.skip_unreadable, device=device, rank=rank,
                         world=world)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        record_source(folder, opt, extra.get("vq.", {}))
        print(f"done in {time.time() - t0:.0f}s: {folder}")


if __name__ == "__main__":
    cli.run(main)


# Expected output of `python prepare_data.py --dataset=shapes` (2-core CPU, 1 torch thread):
#   wrote 20000 train and 2000 val 16x16 images to .../data/shapes in 1.0s
#   vq: 0.06M parameters, 8x8 tokens, K=64, d=8, 1000 iters of batch 64
#   vq iter 1000: val psnr 29.75 dB, codebook usage 100.0%, perplexity 47, 0.4 min
#   tokenize train: 20000 images in 0.9s (21967 images/s)
#   tokenize val: 2000 images in 0.1s (20320 images/s)
#   wrote .../data/shapes: 20000 train / 2000 val images as 8x8 tokens in [0, 64)
#   done in 27s: .../data/shapes
