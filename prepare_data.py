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
       meta.json                           sizes, class names and the tokenizer's settings
A step whose output exists is skipped; tokens are redone when vq.pt was retrained (`python vq.py`); --force redoes
all three. Tokenizer settings pass through as --vq.KEY=VALUE (vq.py's options), e.g. --vq.codebook_size=512.
"""

import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

import cli
import vq
from cli import UserError

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = ("cifar10", "imagefolder", "shapes")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"      # published on the CIFAR-10 page
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
SHAPES_COUNTS = (20000, 2000)                          # train, val: enough for a small generator to learn the classes
IMAGE_SIZES = {"shapes": 16}                           # the rest: 32


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


def _download(url, path):
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            for chunk in cli.progress(iter(lambda: r.read(1 << 20), b""), total and -(-total >> 20), "download",
                                      "MiB"):
                f.write(chunk)
    except OSError as e:                                              # URLError, timeouts and HTTP errors are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({e}); fetch it another way and pass "
                        f"--data_dir=PATH/TO/cifar-10-python.tar.gz") from None
    os.replace(tmp, path)


class ArrayUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles, and a pickle can name any function to call. This one admits only what the
    batches hold (plain containers, numpy arrays and dtypes), so a crafted file raises instead of running code."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a CIFAR-10 batch")
        return super().find_class(module, name)


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
            with open(path, "rb") as f:
                if md5 and hashlib.file_digest(f, "md5").hexdigest() != md5:
                    raise UserError(f"{path} is not the official CIFAR-10 tarball (its md5 is not {md5}); delete "
                                    f"it and download it again from {CIFAR10_URL}")
            with tarfile.open(path, "r:gz") as tar:
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                blobs = {n: tar.extractfile(members[n]).read() for n in names}
        # the batches are Python 2 pickles of {b"data": (n, 3072) uint8 as three 32x32 planes, b"labels": [...]}
        batches = {n: ArrayUnpickler(io.BytesIO(blobs[n]), encoding="bytes").load() for n in names}
        images = {n: np.asarray(b[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                  for n, b in batches.items() if n != "batches.meta"}
        labels = {n: np.array(b[b"labels"]) for n, b in batches.items() if n != "batches.meta"}
        classes = [s.decode() for s in batches["batches.meta"][b"label_names"]]
    except (KeyError, OSError, EOFError, TypeError, ValueError, tarfile.TarError, pickle.UnpicklingError) as e:
        if isinstance(e, UserError):
            raise
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
    for i, (path, _) in enumerate(cli.progress(files, desc=desc, unit="img")):
        try:
            images[i] = load_image(path, image_size)
        except Exception as e:                                        # PIL raises many kinds; name the file instead
            raise UserError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
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
        rng, labels, held = np.random.default_rng(seed), np.array([label for _, label in files]), set()
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
# the three preparation steps


def vq_options(dataset=None):
    """Every --vq.KEY with its default, after the dataset's preset: vq.VQConfig fields (image_size aside, that is
    --image_size) and vq.py's training settings (its output path and dataset aside)."""
    shape = {k: v for k, v in asdict(vq.VQConfig()).items() if k != "image_size"}
    train = {k: v for k, v in asdict(vq.TrainConfig()).items() if k not in ("dataset", "out")}
    return {**shape, **train, **{k: v for k, v in vq.PRESETS.get(dataset, {}).items()}}


def tokenize(model, images, path, batch_size=1000, desc="tokenize", log=print):
    """uint8 (N, H, W, 3) images -> uint16 (N, h*w) codebook indices written to `path`; returns (h, w)."""
    out, t0 = None, time.time()
    for i in cli.progress(range(0, len(images), batch_size), desc=desc, unit="batch"):
        idx = model.encode(np.array(images[i:i + batch_size]))        # (b, h, w) int64
        if out is None:
            out = np.memmap(path + ".tmp", dtype=np.uint16, mode="w+", shape=(len(images), idx[0].numel()))
        out[i:i + len(idx)] = idx.reshape(len(idx), -1).numpy()
    out.flush()
    del out
    os.replace(path + ".tmp", path)
    dt = time.time() - t0
    log(f"{desc}: {len(images)} images in {dt:.1f}s ({len(images) / dt:.0f} images/s)")
    return tuple(idx.shape[1:])


def _save(path, array, dtype):
    cli.atomic_save(lambda tmp: np.ascontiguousarray(array, dtype=dtype).tofile(tmp), path)


def _save_json(path, obj):
    cli.atomic_save(lambda tmp: json.dump(obj, open(tmp, "w"), indent=2), path)


def prepare(dataset, name=None, data_dir=None, force=False, image_size=0, seed=0, vq_overrides=None, log=print):
    """Make data/NAME/ (images, labels, tokenizer, tokens, meta.json), skipping what exists; returns the folder.
    image_size=0 means the dataset's default (IMAGE_SIZES, else 32). Every setting is checked, and the folder's
    existing files are checked against it, before anything is written."""
    if dataset not in DATASETS:
        hint = [d for d in DATASETS if d.startswith(dataset[:3])]
        raise UserError(f"unknown dataset {dataset!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; choose one of {', '.join(DATASETS)}")
    if dataset == "imagefolder" and not data_dir:
        raise UserError("--dataset=imagefolder needs --data_dir=ROOT, a folder of ROOT/<class>/*.png|jpg")
    name, image_size = name or dataset, image_size or IMAGE_SIZES.get(dataset, 32)
    opts, asked = vq_options(dataset), dict(vq_overrides or {})
    for key in asked:
        if key not in opts:
            close = [k for k in opts if k[:4] == key[:4]]
            raise UserError(f"vq: unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    settings = {**opts, "seed": seed, **asked}
    try:
        cfg = vq.VQConfig(image_size=image_size, **{k: settings[k] for k in asdict(vq.VQConfig()) if k in settings})
        vq.check_config(cfg)                           # side vs downsampling factor, K <= 65536, channels
    except ValueError as e:
        raise UserError(str(e)) from None
    train_kw = {k: v for k, v in settings.items() if k in ("max_iters", "batch_size", "lr", "eval_interval", "seed")}
    folder = data_path(name)
    p = {f: os.path.join(folder, f) for f in ("train_images.u8", "val_images.u8", "train_labels.bin", "val_labels.bin",
                                              "vq.pt", "vq_recon.png", "train.bin", "val.bin", "meta.json")}
    if force:
        for f in p.values():
            if os.path.exists(f):
                os.remove(f)
    meta = cli.read_json(p["meta.json"]) if os.path.exists(p["meta.json"]) else {}
    # the folder's own settings must be the asked ones: compare what the user set explicitly
    have = {"dataset": meta.get("dataset"), "image_size": meta.get("image_size"), **meta.get("vq_config", {}),
            **meta.get("vq_train", {})}
    want = {"dataset": dataset, "image_size": image_size, **asdict(cfg), **train_kw}
    explicit = ["dataset", "image_size"] + [k for k in asked if k not in ("device", "eval_interval")]
    diff = [f"{k}={have[k]} (asked for {want[k]})" for k in explicit if have.get(k) not in (None, want.get(k))]
    if diff:
        raise UserError(f"{folder} was made with {', '.join(diff)}; pass --force to redo it, or --name=OTHER")
    model = None
    if os.path.exists(p["vq.pt"]):               # a tokenizer trained for other images must not tokenize these
        ckpt = vq.read_vq(p["vq.pt"])
        if ckpt["vq_config"]["image_size"] != image_size or ckpt.get("trained_on", name) not in ("", name):
            raise UserError(f"{p['vq.pt']} was trained for other images ({ckpt.get('trained_on') or 'another folder'}"
                            f", {ckpt['vq_config']['image_size']}px); remove it, or pass --force to retrain it")
        model = vq.load_vq(p["vq.pt"])

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
                resize = lambda ims: np.stack([np.asarray(Image.fromarray(im).resize(
                    (image_size, image_size), Image.Resampling.BICUBIC)) for im in ims])
                train_x, val_x = resize(train_x), resize(val_x)
        else:
            train_x, train_y, val_x, val_y, classes = load_imagefolder(data_dir, image_size, seed)
        os.makedirs(folder, exist_ok=True)
        for split, x, y in (("train", train_x, train_y), ("val", val_x, val_y)):
            _save(p[f"{split}_images.u8"], x, np.uint8)
            _save(p[f"{split}_labels.bin"], y, np.uint16)
        meta = {"dataset": dataset, "image_size": image_size, "seed": seed, "num_classes": len(classes),
                "class_names": classes, "train_count": len(train_x), "val_count": len(val_x)}
        _save_json(p["meta.json"], meta)
        log(f"wrote {len(train_x)} train and {len(val_x)} val {image_size}x{image_size} images to {folder} "
            f"in {time.time() - t0:.1f}s")
    shape = (-1, image_size, image_size, 3)
    train_u8 = np.memmap(p["train_images.u8"], dtype=np.uint8, mode="r").reshape(shape)
    val_u8 = np.memmap(p["val_images.u8"], dtype=np.uint8, mode="r").reshape(shape)
    device = cli.pick_device(settings.get("device", ""))

    # 2. the tokenizer, trained under a temporary name so an interrupted run never leaves a half-trained vq.pt
    if model is not None:
        log(f"{folder}: tokenizer vq.pt exists, skipping its training")
    else:
        log(f"training the tokenizer: {asdict(cfg)} {train_kw}")
        partial = os.path.join(folder, "vq_partial.pt")
        vq.train_vq(train_u8, np.array(val_u8), cfg, partial, device=device, log=log, trained_on=name, **train_kw)
        os.replace(partial, p["vq.pt"])
        if os.path.exists(os.path.join(folder, "vq_partial_recon.png")):
            os.replace(os.path.join(folder, "vq_partial_recon.png"), p["vq_recon.png"])
        meta["vq_train"] = train_kw
        _save_json(p["meta.json"], meta)
        model = vq.load_vq(p["vq.pt"])

    # 3. tokens; redone whenever vq.pt is not the file they were made with (say, after `python vq.py` retrained it)
    with open(p["vq.pt"], "rb") as f:
        sha1 = hashlib.file_digest(f, "sha1").hexdigest()
    if meta.get("tokenizer_sha1") == sha1 and os.path.exists(p["train.bin"]) and os.path.exists(p["val.bin"]):
        log(f"{folder}: tokens exist, skipping")
        return folder
    model.to(device)
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


@dataclass
class PrepareConfig:
    dataset: str = ""             # cifar10 | imagefolder | shapes
    name: str = ""                # the folder data/<name>; '' means the dataset's name
    data_dir: str = ""            # a local CIFAR-10 copy (tarball or extracted), or the image folder's root
    image_size: int = 0           # image side; 0 means 16 for shapes, 32 for the others
    force: bool = False           # redo all three steps
    seed: int = 0                 # shapes: which images; imagefolder: which are held out; the tokenizer's init


def main(argv):
    t0 = time.time()
    dataset = next((a.partition("=")[2] for a in argv if a.startswith("--dataset=")), None)
    opt, extra = cli.parse_args(argv, PrepareConfig(), doc=__doc__, extra={"vq.": vq_options(dataset)},
                                extra_help={**cli.field_comments(vq.VQConfig), **cli.field_comments(vq.TrainConfig)})
    if not opt.dataset:
        raise UserError(f"pass --dataset=NAME, one of {', '.join(DATASETS)} (see --help)")
    cli.check_ranges(opt, {"image_size": (lambda v: v >= 0, "at least 0 (0: the dataset's default)")})
    folder = prepare(opt.dataset, opt.name or None, opt.data_dir or None, opt.force, opt.image_size, opt.seed,
                     extra.get("vq.", {}))
    print(f"done in {time.time() - t0:.0f}s: {folder}")


if __name__ == "__main__":
    cli.run(main)


# Expected output of `python prepare_data.py --dataset=shapes` (idle 2-core CPU, torch's default 2 threads):
#   wrote 20000 train and 2000 val 16x16 images to .../data/shapes in 1.4s
#   vq: 0.06M parameters, 8x8 tokens, K=64, d=8, 1000 iters of batch 64
#   vq iter 1000: val psnr 29.72 dB, codebook usage 100.0%, perplexity 49, 0.4 min
#   tokenize train: 20000 images in 1.1s (17841 images/s)
#   tokenize val: 2000 images in 0.1s (17356 images/s)
#   wrote .../data/shapes: 20000 train / 2000 val images as 8x8 tokens in [0, 64)
#   done in 27s: .../data/shapes
