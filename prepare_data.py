"""
prepare_data.py: datasets -> uint8 images -> VQ tokenizer -> uint16 token files for purrception.py.

    python prepare_data.py --dataset=shapes            # procedural, offline: under a minute on 2 CPU cores
    python prepare_data.py --dataset=cifar10           # downloads the official python tarball (163 MB) once
    python prepare_data.py --dataset=imagefolder --data_dir=ROOT --name=pets --image_size=64

It writes data/NAME/ next to this file (whatever the working directory), in three steps:
    1. train_images.u8, val_images.u8      uint8 (N, H, W, 3) raw images, and
       train_labels.bin, val_labels.bin    uint16 (N,) class indices
    2. vq.pt                               the tokenizer, trained with vq.train_vq when it is missing
    3. train.bin, val.bin                  uint16 (N, h*w) codebook indices, row-major over the h x w grid,
       meta.json                           sizes, class names, tokenizer config and the command that made it
A step whose output exists is skipped; --force redoes all three. Other flags: --name (output folder, default the
dataset), --data_dir (a local CIFAR-10 copy, or the image folder), --image_size (default 16 for shapes, 32 for the
others), --seed (default 0).
Tokenizer settings pass through as --vq.KEY=VALUE: any VQConfig field or train_vq argument, for example
--vq.codebook_size=512 --vq.max_iters=2000 --vq.device=cuda.
"""

import difflib
import hashlib
import inspect
import json
import math
import os
import pickle
import shlex
import sys
import tarfile
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import MISSING, asdict, fields
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import vq
from cli import UserError

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = ("cifar10", "imagefolder", "shapes")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"      # published on the CIFAR-10 page
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
SHAPES_COUNTS = (20000, 2000)                          # train, val: enough for a small generator to learn the classes
# Image side and tokenizer settings per dataset; --image_size and --vq.KEY=VALUE override them. Shapes are 16x16 and
# flat-coloured, so a small VQ with 64 codes and 1000 steps is enough (29.7 dB PSNR, every code used, 27 s on a
# CPU): an 8x8 token grid that a CPU-sized generator learns in minutes.
IMAGE_SIZES = {"shapes": 16}                           # the rest: 32
VQ_DEFAULTS = {"shapes": dict(ch=32, n_res=1, codebook_size=64, max_iters=1000, batch_size=64, eval_interval=1000)}
NOT_COMPARED = ("device", "eval_interval")             # train_vq arguments that do not change the tokenizer


def data_path(name):
    return os.path.join(DATA_ROOT, name)

# -----------------------------------------------------------------------------
# shapes: 10 classes of flat-coloured shapes, drawn at 4x the size and downsampled (box filter) for anti-aliasing.
# The shape's kind is its class. Each class has an upright pose (squares sit flat, triangles and stars point up,
# stripes and ellipses lie horizontal) tilted by at most 15 degrees; size, a small offset from the centre and one of
# four bright colours on a dark background are random. Fixed poses keep the outline what an image is about: with free
# rotation a square is half the time a diamond, and a small CPU model spends its capacity on poses, not outlines.

SHAPES_CLASSES = ("circle", "square", "triangle", "plus", "ring", "star", "heart", "crescent", "stripes", "ellipse")


def _ngon(n, inner=None):
    """Unit-radius regular polygon (a star when `inner` radius is given), first vertex pointing up."""
    k = 2 * n if inner else n
    return [((inner if inner and i % 2 else 1) * math.sin(2 * math.pi * i / k),
             -(inner if inner and i % 2 else 1) * math.cos(2 * math.pi * i / k)) for i in range(k)]


_t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
_CIRCLE = list(zip(np.cos(_t), np.sin(_t)))
_HEART = list(zip(np.sin(_t) ** 3,                                    # the classic parametric heart, centred
                  (3 + np.cos(4 * _t) + 2 * np.cos(3 * _t) + 5 * np.cos(2 * _t) - 13 * np.cos(_t)) / 17))
_OUTLINES = {"square": ([(-1, -1), (1, -1), (1, 1), (-1, 1)], 0.88), "triangle": (_ngon(3), 1.3),
             "star": (_ngon(5, inner=0.42), 1.15),
             "plus": ([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
                       (-1, .3), (-1, -.3), (-.3, -.3)], 1.0),
             "heart": (_HEART, 1.05), "ellipse": ([(x, 0.45 * y) for x, y in _CIRCLE], 1.1), "circle": (_CIRCLE, 1.0)}


def _place(points, cx, cy, r, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _draw_shape(draw, kind, cx, cy, r, angle, fg, bg):
    if kind in _OUTLINES:
        points, scale = _OUTLINES[kind]
        draw.polygon(_place(points, cx, cy, r * scale, angle), fill=fg)
    elif kind == "ring":                                          # a disc with a background-coloured hole
        draw.polygon(_place(_CIRCLE, cx, cy, r, 0), fill=fg)
        draw.polygon(_place(_CIRCLE, cx, cy, 0.55 * r, 0), fill=bg)
    elif kind == "crescent":                                      # a disc with an offset bite taken out
        draw.polygon(_place(_CIRCLE, cx, cy, r, 0), fill=fg)
        bite = (cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle))
        draw.polygon(_place(_CIRCLE, *bite, 0.85 * r, 0), fill=bg)
    elif kind == "stripes":                                       # three parallel bars
        for dy in (-0.6, 0.0, 0.6):
            bar = [(-1, dy - .18), (1, dy - .18), (1, dy + .18), (-1, dy + .18)]
            draw.polygon(_place(bar, cx, cy, r, angle), fill=fg)


BACKGROUND = (20, 24, 48)                                                          # dark navy
FOREGROUNDS = ((250, 210, 50), (240, 240, 240), (90, 200, 250), (250, 130, 80))    # bright: yellow, white, sky, coral
MAX_TILT = math.radians(15)


def make_shapes(n, image_size=16, seed=0):
    """n random shape images, uint8 (n, S, S, 3), and labels (n,) int64: balanced classes, same seed same bytes."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES))
    S = 4 * image_size
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for i in range(n):
        fg = FOREGROUNDS[rng.integers(len(FOREGROUNDS))]
        r = S * rng.uniform(0.26, 0.36)                               # radius: the shape spans 50-70% of the image
        cx, cy = S / 2 + S * rng.uniform(-0.08, 0.08, 2)              # near the centre
        tilt = rng.uniform(-MAX_TILT, MAX_TILT)
        img = Image.new("RGB", (S, S), BACKGROUND)
        _draw_shape(ImageDraw.Draw(img), SHAPES_CLASSES[labels[i]], cx, cy, r, tilt, fg, BACKGROUND)
        images[i] = np.asarray(img.resize((image_size, image_size), Image.Resampling.BOX))
    return images, labels

# -----------------------------------------------------------------------------
# CIFAR-10: the official python tarball, read straight from the archive (five pickled train batches, one test batch)


def _digest(path, algorithm):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _download(url, path):
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            with tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                      desc="download") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:                                              # URLError, timeouts and HTTP errors are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({e}); fetch it another way and pass "
                        f"--data_dir=PATH/TO/cifar-10-python.tar.gz") from None
    os.replace(tmp, path)


def load_cifar10(data_dir=None, md5=CIFAR10_MD5, log=print):
    """-> train images (50000, 32, 32, 3) uint8, train labels, val images (10000, ...), val labels, class names.
    data_dir: None (download into data/cifar10/), the tarball, a folder holding it, or the extracted folder."""
    tarball = os.path.join(data_path("cifar10"), "cifar-10-python.tar.gz")
    if data_dir is None and not os.path.exists(tarball):
        os.makedirs(os.path.dirname(tarball), exist_ok=True)
        log(f"downloading {CIFAR10_URL} -> {tarball}")
        _download(CIFAR10_URL, tarball)
    path = tarball if data_dir is None else next(
        (p for p in (os.path.join(data_dir, "cifar-10-python.tar.gz"), os.path.join(data_dir, "cifar-10-batches-py"),
                     data_dir) if os.path.isfile(p) or os.path.isfile(os.path.join(p, "batches.meta"))), None)
    if path is None:
        raise UserError(f"no CIFAR-10 at {data_dir}: expected cifar-10-python.tar.gz or an extracted "
                        f"cifar-10-batches-py")
    names = ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    try:
        if os.path.isdir(path):                                       # extracted by the user: read the files directly
            blobs = {n: open(os.path.join(path, n), "rb").read() for n in names}
        else:
            if md5 and _digest(path, "md5") != md5:
                raise UserError(f"{path} is not the official CIFAR-10 tarball (its md5 is not {md5}); delete it and "
                                f"download it again from {CIFAR10_URL}")
            with tarfile.open(path, "r:gz") as tar:
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                blobs = {n: tar.extractfile(members[n]).read() for n in names}
        # the batches are Python 2 pickles of {b"data": (n, 3072) uint8 as three 32x32 planes, b"labels": [...]}
        batches = {n: pickle.loads(blobs[n], encoding="bytes") for n in names}
        images = {n: np.asarray(b[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                  for n, b in batches.items() if n != "batches.meta"}
        labels = {n: np.array(b[b"labels"]) for n, b in batches.items() if n != "batches.meta"}
        classes = [s.decode() for s in batches["batches.meta"][b"label_names"]]
    except (KeyError, OSError, EOFError, tarfile.TarError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is not a complete CIFAR-10 python copy ({type(e).__name__}: {e})") from None
    train = names[2:]
    return (np.concatenate([images[n] for n in train]), np.concatenate([labels[n] for n in train]),
            images["test_batch"], labels["test_batch"], classes)

# -----------------------------------------------------------------------------
# image folders: ROOT/<class>/*.png|jpg (10% of each class held out), or ROOT/train/<class> + ROOT/val|test/<class>


def load_image(path, image_size):
    """Any image file -> uint8 (S, S, 3): RGB, shorter side resized to S, centre square cropped."""
    with Image.open(path) as im:
        im.draft("RGB", (image_size, image_size))                     # JPEG: decode at a reduced scale, much faster
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (image_size, image_size):
            s = image_size / min(w, h)
            w, h = max(image_size, round(w * s)), max(image_size, round(h * s))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        return np.asarray(im)


def _resize_all(images, image_size):
    size = (image_size, image_size)
    return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BICUBIC)) for im in images])


def _load_one(job):
    try:
        return load_image(*job)
    except Exception as e:                                            # PIL raises many kinds; report the file instead
        return f"cannot read image {job[0]} ({type(e).__name__}: {e})"


def _scan(folder, classes=None):
    """-> class names (sorted folder names, or the given ones) and [(file, label)] for every image below them."""
    found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    classes = classes or found
    if set(found) - set(classes):
        raise UserError(f"{folder} has classes {sorted(set(found) - set(classes))} that the train split does not have")
    files = [(os.path.join(d, f), label) for label, c in enumerate(classes) if c in found
             for d, _, fs in sorted(os.walk(os.path.join(folder, c))) for f in sorted(fs)
             if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    if not files:
        raise UserError(f"no {'/'.join(IMAGE_EXTS)} images in {folder}/<class>/; expected ROOT/<class>/*.png|jpg")
    return classes, files


def _load_files(files, image_size, desc):
    images = np.empty((len(files), image_size, image_size, 3), np.uint8)
    # a process pool pays off for many large images; small ones (CIFAR's 32x32 JPEGs: ~9000/s on one core of a
    # 2-core machine, ~7000/s with a pool of 2) decode faster than a pool can ship them back
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with Image.open(files[0][0]) as im:
            large = im.size[0] * im.size[1] > 4 * image_size ** 2
    except Exception:
        large = False                                                 # reported with its name below
    workers = min(workers, 8) if len(files) >= 2000 and large else 1
    with (Pool(workers) if workers > 1 else nullcontext()) as pool:
        jobs = [(f, image_size) for f, _ in files]
        results = pool.imap(_load_one, jobs, chunksize=64) if pool else map(_load_one, jobs)
        for i, im in enumerate(tqdm(results, total=len(jobs), desc=desc, unit="img", dynamic_ncols=True)):
            if isinstance(im, str):
                raise UserError(im)
            images[i] = im
    return images, np.array([label for _, label in files])


def load_imagefolder(root, image_size, seed=0, val_fraction=0.1):
    """-> train images, train labels, val images, val labels, class names (sorted folder names)."""
    if not root or not os.path.isdir(root):
        raise UserError(f"image folder {root!r} does not exist; pass --data_dir=ROOT holding ROOT/<class>/*.png|jpg")
    split = next((os.path.join(root, s) for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), None)
    if split and os.path.isdir(os.path.join(root, "train")):
        classes, train = _scan(os.path.join(root, "train"))
        _, val = _scan(split, classes)
    else:
        classes, files = _scan(root)
        rng = np.random.default_rng(seed)
        labels = np.array([label for _, label in files])
        held = set()
        for c in range(len(classes)):                                 # per class, so val has every class
            idx = np.flatnonzero(labels == c)
            k = max(1, round(val_fraction * len(idx))) if len(idx) > 1 else 0
            held.update(rng.permutation(idx)[:k].tolist())
        train = [x for i, x in enumerate(files) if i not in held]
        val = [x for i, x in enumerate(files) if i in held]
    if not val:
        raise UserError(f"{root}: no images left for validation; give some class at least two images")
    return (*_load_files(train, image_size, "train images"), *_load_files(val, image_size, "val images"), list(classes))

# -----------------------------------------------------------------------------
# the tokenizer settings, and the three preparation steps


def vq_options():
    """Every --vq.KEY with its default (which also gives its type): VQConfig fields and train_vq keyword arguments."""
    opts = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(vq.VQConfig)}
    opts.update({k: p.default for k, p in inspect.signature(vq.train_vq).parameters.items()
                 if p.default is not inspect.Parameter.empty and k != "log"})
    opts.pop("image_size", None)                                      # that one is --image_size
    return opts


def _default_device():
    import torch
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _unknown(key, known):
    hint = difflib.get_close_matches(key, known, n=1)
    return f"unknown option {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")


def _tokenizer_settings(dataset, image_size, seed, overrides):
    """-> (VQConfig, train_vq keyword arguments) from the dataset's defaults under the user's overrides."""
    opts = vq_options()
    for key in overrides:
        if key not in opts:
            raise UserError("vq: " + _unknown(key, list(opts)) + ("; use --image_size" if key == "image_size" else ""))
    wanted = {k: v for k, v in {**VQ_DEFAULTS.get(dataset, {}), "seed": seed}.items() if k in opts}
    wanted.update(overrides)
    cfg_keys = {f.name for f in fields(vq.VQConfig)}
    cfg = vq.VQConfig(image_size=image_size, **{k: v for k, v in wanted.items() if k in cfg_keys})
    train_kw = {k: v for k, v in wanted.items() if k not in cfg_keys}
    try:
        vq.check_config(cfg)                           # side vs downsampling factor, K <= 65536, channels
    except ValueError as e:
        raise UserError(str(e)) from None
    return cfg, train_kw


def _check_same(folder, old, new, explicit):
    """Refuse to mix outputs of different settings in one folder (only settings the user asked for are compared)."""
    plain = lambda v: json.loads(json.dumps(v))                       # tuples -> lists, as meta.json stores them
    diff = [f"{k}={plain(old[k])} (asked for {plain(new[k])})"
            for k in explicit if k in old and plain(old[k]) != plain(new[k])]
    if diff:
        raise UserError(f"{folder} was made with {', '.join(diff)}; pass --force to redo it, or --name=OTHER")


def _save(path, array, dtype):
    np.ascontiguousarray(array, dtype=dtype).tofile(path + ".tmp")
    os.replace(path + ".tmp", path)                                   # a half-written file never looks finished


def _save_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def tokenize(model, images, path, batch_size=1000, desc="tokenize", log=print):
    """uint8 (N, H, W, 3) images -> uint16 (N, h*w) codebook indices written to `path`; returns (h, w)."""
    out, t0 = None, time.time()
    with tqdm(total=len(images), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for i in range(0, len(images), batch_size):
            idx = model.encode(np.array(images[i:i + batch_size]))    # (b, h, w) int64
            if out is None:
                out = np.memmap(path + ".tmp", dtype=np.uint16, mode="w+", shape=(len(images), idx[0].numel()))
            out[i:i + len(idx)] = idx.reshape(len(idx), -1).numpy()
            bar.update(len(idx))
    out.flush()
    del out
    os.replace(path + ".tmp", path)
    dt = time.time() - t0
    log(f"{desc}: {len(images)} images in {dt:.1f}s ({len(images) / dt:.0f} images/s)")
    return tuple(idx.shape[1:])


def _command(dataset, name, data_dir, image_size, seed, overrides):
    fmt = lambda v: str(v).lower() if isinstance(v, bool) else ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    flags = {"name": name if name != dataset else None, "data_dir": data_dir,
             "image_size": image_size if image_size != IMAGE_SIZES.get(dataset, 32) else None, "seed": seed or None}
    return " ".join(["python prepare_data.py", f"--dataset={dataset}"]
                    + [f"--{k}={shlex.quote(str(v))}" for k, v in flags.items() if v]
                    + [f"--vq.{k}={fmt(v)}" for k, v in overrides.items()])


def prepare(dataset, name=None, data_dir=None, force=False, image_size=0, seed=0, vq_overrides=None, log=print):
    """Make data/NAME/ (images, labels, tokenizer, tokens, meta.json), skipping what exists; returns the folder.
    image_size=0 means the dataset's default (IMAGE_SIZES, else 32)."""
    if dataset not in DATASETS:
        hint = difflib.get_close_matches(dataset, DATASETS, n=1)
        raise UserError(f"unknown dataset {dataset!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; choose one of {', '.join(DATASETS)}")
    if dataset == "imagefolder" and not data_dir:
        raise UserError("--dataset=imagefolder needs --data_dir=ROOT, a folder of ROOT/<class>/*.png|jpg")
    name, overrides = name or dataset, dict(vq_overrides or {})
    image_size = image_size or IMAGE_SIZES.get(dataset, 32)
    cfg, train_kw = _tokenizer_settings(dataset, image_size, seed, overrides)
    folder = data_path(name)
    p = {f: os.path.join(folder, f) for f in ("train_images.u8", "val_images.u8", "train_labels.bin", "val_labels.bin",
                                              "vq.pt", "vq_recon.png", "train.bin", "val.bin", "meta.json")}
    if force:
        for f in p.values():
            if os.path.exists(f):
                os.remove(f)
    meta = json.load(open(p["meta.json"])) if os.path.exists(p["meta.json"]) else {}
    _check_same(folder, meta, {"dataset": dataset, "image_size": image_size, "seed": seed},
                ["dataset", "image_size"] + (["seed"] if dataset != "cifar10" else []))
    model = vq.load_vq(p["vq.pt"]) if os.path.exists(p["vq.pt"]) else None
    if model is not None:
        explicit = [k for k in overrides if k not in NOT_COMPARED]
        _check_same(folder, {**meta.get("vq_train", {}), **asdict(model.cfg)}, {**train_kw, **asdict(cfg)}, explicit)

    # 1. raw images and labels
    if meta.get("class_names") and all(os.path.exists(p[f]) for f in list(p)[:4]):
        log(f"{folder}: images exist ({meta['train_count']} train, {meta['val_count']} val), skipping")
    else:
        t0 = time.time()
        if dataset == "shapes":
            x, y = make_shapes(sum(SHAPES_COUNTS), image_size, seed)
            n = SHAPES_COUNTS[0]
            train_x, train_y, val_x, val_y, classes = x[:n], y[:n], x[n:], y[n:], list(SHAPES_CLASSES)
        elif dataset == "cifar10":
            train_x, train_y, val_x, val_y, classes = load_cifar10(data_dir, log=log)
            if image_size != 32:
                train_x, val_x = _resize_all(train_x, image_size), _resize_all(val_x, image_size)
        else:
            train_x, train_y, val_x, val_y, classes = load_imagefolder(data_dir, image_size, seed)
        os.makedirs(folder, exist_ok=True)
        for split, x, y in (("train", train_x, train_y), ("val", val_x, val_y)):
            _save(p[f"{split}_images.u8"], x, np.uint8)
            _save(p[f"{split}_labels.bin"], y, np.uint16)
        meta = {"dataset": dataset, "image_size": image_size, "seed": seed, "num_classes": len(classes),
                "class_names": classes, "train_count": len(train_x), "val_count": len(val_x),
                "produced_by": "prepare_data.py",
                "command": _command(dataset, name, data_dir, image_size, seed, overrides)}
        _save_json(p["meta.json"], meta)
        log(f"wrote {len(train_x)} train and {len(val_x)} val {image_size}x{image_size} images to {folder} "
            f"in {time.time() - t0:.1f}s")
    shape = (-1, image_size, image_size, 3)
    train_u8 = np.memmap(p["train_images.u8"], dtype=np.uint8, mode="r").reshape(shape)
    val_u8 = np.memmap(p["val_images.u8"], dtype=np.uint8, mode="r").reshape(shape)

    # 2. the tokenizer, trained under a temporary name so an interrupted run never leaves a half-trained vq.pt
    if model is not None:
        log(f"{folder}: tokenizer vq.pt exists, skipping its training")
    else:
        train_kw = {"device": _default_device(), **train_kw}
        log(f"training the tokenizer: {asdict(cfg)} {train_kw}")
        partial = os.path.join(folder, "vq_partial.pt")
        vq.train_vq(train_u8, np.array(val_u8), cfg, partial, log=log, **train_kw)
        os.replace(partial, p["vq.pt"])
        if os.path.exists(os.path.join(folder, "vq_partial_recon.png")):
            os.replace(os.path.join(folder, "vq_partial_recon.png"), p["vq_recon.png"])
        meta["vq_train"] = {k: v for k, v in train_kw.items() if k not in NOT_COMPARED}
        _save_json(p["meta.json"], meta)
        model = vq.load_vq(p["vq.pt"])

    # 3. tokens; redone whenever vq.pt is not the file they were made with (say, after `python vq.py` retrained it)
    sha1 = _digest(p["vq.pt"], "sha1")
    if meta.get("tokenizer_sha1") == sha1 and os.path.exists(p["train.bin"]) and os.path.exists(p["val.bin"]):
        log(f"{folder}: tokens exist, skipping")
        return folder
    model.to(train_kw.get("device") or _default_device())
    h, w = tokenize(model, train_u8, p["train.bin"], desc="tokenize train", log=log)
    tokenize(model, val_u8, p["val.bin"], desc="tokenize val", log=log)
    K = model.cfg.codebook_size
    meta.update(grid_h=h, grid_w=w, codebook_size=K, code_dim=int(model.codebook.shape[1]),
                vq_config=asdict(model.cfg), tokenizer="vq.pt", tokenizer_sha1=sha1)
    _save_json(p["meta.json"], meta)
    log(f"wrote {folder}: {meta['train_count']} train / {meta['val_count']} val images as {h}x{w} tokens in [0, {K})")
    return folder

# -----------------------------------------------------------------------------
# command line


CLI_DEFAULTS = {"dataset": "", "name": "", "data_dir": "", "image_size": 0, "force": False, "seed": 0}


def _convert(key, value, default):
    """A flag's text -> the type of its default (bool from true/false, tuples from comma lists)."""
    try:
        if isinstance(default, bool):
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
        if isinstance(default, tuple):
            return tuple(type(default[0])(v) for v in value.split(","))
        return value if default is None else type(default)(value)
    except (KeyError, ValueError):
        raise UserError(f"--{key} expects {type(default).__name__}, got {value!r}") from None


def parse_args(argv):
    """['--dataset=shapes', '--force', '--vq.max_iters=500'] -> ({flag: value}, {vq key: value}), typed."""
    opts, overrides, vq_opts = dict(CLI_DEFAULTS), {}, vq_options()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        key, eq, value = arg[2:].partition("=")
        table, name = (vq_opts, key[3:]) if key.startswith("vq.") else (opts, key)
        if not arg.startswith("--") or name not in table:
            raise UserError(_unknown(arg.partition("=")[0], ["--" + k for k in opts] + ["--vq." + k for k in vq_opts]))
        if not eq and not isinstance(table[name], bool):
            raise UserError(f"--{key} needs a value: --{key}=VALUE")
        value = _convert(key, value if eq else "true", table[name])
        (overrides if table is vq_opts else opts)[name] = value
    if not opts["dataset"]:
        raise UserError(f"pass --dataset=NAME, one of {', '.join(DATASETS)} (see --help)")
    return opts, overrides


def main(argv):
    t0 = time.time()
    try:
        opts, overrides = parse_args(argv)
        folder = prepare(opts["dataset"], opts["name"] or None, opts["data_dir"] or None, opts["force"],
                         opts["image_size"], opts["seed"], overrides)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"done in {time.time() - t0:.0f}s: {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])


# Expected output of `python prepare_data.py --dataset=shapes` (idle 2-core CPU, torch's default 2 threads):
#   wrote 20000 train and 2000 val 16x16 images to .../data/shapes in 1.4s
#   vq: 0.06M parameters, 8x8 tokens, K=64, d=8, 1000 iters of batch 64
#   vq iter 1000: val psnr 29.72 dB, codebook usage 100.0%, perplexity 49, 0.4 min
#   tokenize train: 20000 images in 1.1s (17841 images/s)
#   tokenize val: 2000 images in 0.1s (17356 images/s)
#   wrote .../data/shapes: 20000 train / 2000 val images as 8x8 tokens in [0, 64)
#   done in 27s: .../data/shapes
