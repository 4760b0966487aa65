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

An image folder of any size through a tokenizer file is encode_folder.py's job (the same folder,
this file's image reading and writing). The checks a made folder passes before training and
sampling read it are token_folder.py's.
"""

import hashlib
import io
import math
import os
import pickle
import tarfile
import time
import unicodedata
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

import cli
import vq
import vqgan
from cli import UserError

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = ("cifar10", "imagefolder", "shapes")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"      # published on the CIFAR-10 page
CIFAR10_DIR = "cifar-10-batches-py"                    # the tarball's folder
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
    def write(tmp):
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            mib = -(-int(r.headers.get("Content-Length") or 0) >> 20) or None
            for chunk in cli.progress(iter(lambda: r.read(1 << 20), b""), mib, "download", "MiB"):
                f.write(chunk)
    try:
        cli.atomic_save(write, path)
    except OSError as e:                      # URLError, timeouts and HTTP errors are OSErrors
        raise UserError(f"could not download {url} ({e}); fetch it another way, then run "
                        f"`{cli.command('prepare_data.py', '--dataset=cifar10')} "
                        f"--data_dir=PATH/TO/cifar-10-python.tar.gz`") from None


def load_cifar10(data_dir=None, md5=None, log=print):
    """-> train images (50000, 32, 32, 3) uint8, train labels, val images (10000, ...), val labels,
    class names. data_dir: None (download into data/cifar10/), the tarball, a folder holding it, or
    the extracted folder."""
    md5 = CIFAR10_MD5 if md5 is None else md5
    folder = data_dir or data_path("cifar10")
    tarball = os.path.join(folder, "cifar-10-python.tar.gz")
    if data_dir is None and not os.path.exists(tarball):
        os.makedirs(folder, exist_ok=True)
        log(f"downloading {CIFAR10_URL} -> {tarball}")
        _download(CIFAR10_URL, tarball)
    found = lambda p: os.path.isfile(p) or os.path.isfile(os.path.join(p, "batches.meta"))
    path = next(filter(found, (tarball, os.path.join(folder, CIFAR10_DIR), folder)), None)
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
# Every image is read as a viewer shows it (its EXIF orientation applied; greyscale, CMYK, palette
# and 16-bit files as 8-bit RGB), then goes through ADM's centre crop (guided-diffusion's
# center_crop_arr, which LlamaGen uses for ImageNet too): halve with a box filter while the short
# side is at least twice the target, then bicubic to the target, then crop the centre square.


def center_crop(im, image_size):
    """A PIL RGB image -> uint8 (S, S, 3), ADM's way (box halvings, bicubic, centre square)."""
    while min(im.size) >= 2 * image_size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    scale = image_size / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(im)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def to_rgb(im):
    """A PIL image of any mode -> 8-bit RGB. Integer modes wider than 8 bits (I;16*, I) are scaled
    from 16 bits (65535 -> 255), floats (F) from [0, 1]: PIL's own convert clips them (white)."""
    if im.mode.startswith("I") or im.mode == "F":
        x = np.asarray(im, np.float64) * (255 if im.mode == "F" else 1 / 257)
        im = Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def load_image(path, image_size):
    """Any image file -> uint8 (S, S, 3): upright (EXIF), RGB, ADM's centre crop."""
    with Image.open(path) as im:
        return np.ascontiguousarray(center_crop(to_rgb(ImageOps.exif_transpose(im)), image_size))


def _scan(folder, classes=None):
    """-> class names (sorted folder names in Unicode NFC, as typed: macOS stores NFD, or the given
    ones), [(file, label)] of each image. A class folder without images is an error when the
    classes are read here (not for a val split)."""
    names = {unicodedata.normalize("NFC", d): d for d in os.listdir(folder)
             if os.path.isdir(os.path.join(folder, d)) and not d.startswith(".")}
    found = sorted(names)
    if set(found) - set(classes or found):
        raise UserError(f"{folder} has classes {sorted(set(found) - set(classes))} that the train "
                        f"split does not have")
    files, counts, ext = [], {}, "/".join(IMAGE_EXTS)
    is_image = lambda f: f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")
    for label, c in enumerate(classes or found):
        walk = sorted(os.walk(os.path.join(folder, names[c]))) if c in names else []
        mine = [(os.path.join(d, f), label) for d, _, fs in walk for f in sorted(fs) if is_image(f)]
        files += mine
        counts[c] = len(mine)
    if not files and any(map(is_image, os.listdir(folder))):
        raise UserError(f"{folder} holds its images directly, not in <class> folders; sort them "
                        f"into {folder}/<class>/ (ImageNet's val: valprep.sh does it)")
    if not files:
        raise UserError(f"no {ext} images in {folder}/<class>/; expected ROOT/<class>/*.png|jpg")
    empty = [c for c, n in counts.items() if n == 0]
    if classes is None and empty:             # a class the generator could never learn
        raise UserError(f"the class folder {os.path.join(folder, names[empty[0]])} has no {ext} "
                        f"images ({len(empty)} such); add images or remove it")
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
    t0, grid = time.time(), model.cfg.grid
    batches = cli.progress(range(0, len(images), batch_size), desc=desc, unit="batch")
    write_file(path, (model.encode(np.array(images[i:i + batch_size])).reshape(-1, grid * grid)
                      .numpy().astype(np.uint16).tobytes() for i in batches))   # (b, h*w)
    dt = time.time() - t0
    log(f"{desc}: {len(images)} images in {dt:.1f}s ({len(images) / dt:.0f} images/s)")
    return grid, grid


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
    if data_dir and not os.path.exists(data_dir):
        raise UserError(f"--data_dir={data_dir} does not exist")
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
        raise UserError(f"{folder} holds the tokens of {ckpt['released']}, made by "
                        f"{remake(folder, meta)}; pass --force to train a tokenizer here "
                        f"instead, or --name=OTHER")
    on, px = ckpt.get("trained_on"), ckpt.get("vq_config", {}).get("image_size")
    if px != image_size or on not in (None, "", name):
        raise UserError(f"{p['vq.pt']} was trained for other images ({on or 'another folder'}, "
                        f"{px}px); remove it, or pass --force to retrain it")
    return meta, vqgan.load_tokenizer(p["vq.pt"])


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
    for split, x, y in (("train", train_x, train_y), ("val", val_x, val_y)):
        write_file(p[f"{split}_images.u8"], [np.asarray(x, np.uint8).tobytes()])
        write_file(p[f"{split}_labels.bin"], [np.asarray(y, np.uint16).tobytes()])
    meta = {"dataset": dataset, "image_size": image_size, "seed": seed,
            "num_classes": len(classes), "class_names": classes, "train_count": len(train_x),
            "val_count": len(val_x)}
    cli.write_json(meta, p["meta.json"])
    log(f"wrote {len(train_x)} train and {len(val_x)} val {image_size}x{image_size} images to "
        f"{folder} in {time.time() - t0:.1f}s")
    return meta


PARTIAL = ("vq_partial.pt", "vq_partial_recon.png")    # the tokenizer as it trains


def make_tokenizer(train_u8, val_u8, cfg, train_kw, device, folder, p, meta, name, log):
    """Step 2: vq.pt, trained under another name (PARTIAL), so an interruption leaves no
    half-trained vq.pt. -> the tokenizer."""
    log(f"training the tokenizer: {asdict(cfg)} {train_kw}")
    partial, recon = (os.path.join(folder, f) for f in PARTIAL)
    try:
        vq.train_vq(train_u8, np.array(val_u8), cfg, partial, device=device, log=log,
                    trained_on=name, **train_kw)
        os.replace(partial, p["vq.pt"])
        if os.path.exists(recon):
            os.replace(recon, p["vq_recon.png"])
    finally:
        remove(partial, recon)
    meta["vq_train"] = train_kw
    cli.write_json(meta, p["meta.json"])
    return vqgan.load_tokenizer(p["vq.pt"])


def make_tokens(model, train_u8, val_u8, device, folder, p, meta, log):
    """Step 3: {train,val}.bin, redone whenever vq.pt is not the file they were made with (after
    `python vq.py`); meta.json completed."""
    sha1 = vq.file_sha1(p["vq.pt"])
    if meta.get("tokenizer_sha1") == sha1 and all(os.path.exists(p[f]) for f in TOKEN_FILES):
        log(f"{folder}: tokens exist, skipping")
        return False
    model.to(device)
    h, w = tokenize(model, train_u8, p["train.bin"], desc="tokenize train", log=log)
    tokenize(model, val_u8, p["val.bin"], desc="tokenize val", log=log)
    K = model.cfg.codebook_size
    meta.update(grid_h=h, grid_w=w, codebook_size=K, code_dim=int(model.codebook.shape[1]),
                vq_config=asdict(model.cfg), tokenizer="vq.pt", tokenizer_sha1=sha1)
    cli.write_json(meta, p["meta.json"])
    log(f"wrote {folder}: {meta['train_count']} train / {meta['val_count']} val images as {h}x{w} "
        f"tokens in [0, {K})")
    return True


def remove(*paths):
    for path in filter(os.path.exists, paths):
        os.remove(path)


def check_writable(folder):
    """One line, before any image is read, when folder (or where it is to be made: data/) is
    read-only."""
    where = os.path.abspath(folder)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {where} (read-only for this user); make it writable"
                        + ", or pass --name=OTHER" * (where == os.path.abspath(folder)))


def prepare(dataset, name=None, data_dir=None, force=False, image_size=0, seed=0, vq_overrides=None,
            log=print):
    """Make data/NAME/ (images, labels, tokenizer, tokens, meta.json, source.json) as its only
    writer, skipping what exists; -> the folder. image_size=0: 16 for shapes, else 32. Settings
    and the folder are checked before anything is written; after a stop, the same call goes on."""
    name, image_size = name or dataset, image_size or (16 if dataset == "shapes" else 32)
    cfg, train_kw, settings, asked = check_settings(dataset, data_dir, image_size, seed,
                                                    vq_overrides)
    folder, note = data_path(name), cli.stop_note
    check_writable(folder)
    p = {f: os.path.join(folder, f) for f in FILES}
    kept = lambda what: setattr(cli, "stop_note", f"{what} in {folder} are kept; the same "
                                                  f"command continues")
    with cli.one_writer(folder, "pass --name=OTHER"):
        remove(*(os.path.join(folder, f) for f in PARTIAL), *(p.values() if force else ()))
        meta, model = check_folder(folder, p, dataset, image_size, cfg, train_kw, asked, name)
        new_images = not (meta.get("class_names")
                          and all(os.path.exists(p[f]) for f in IMAGE_FILES))
        if new_images:
            meta = make_images(dataset, data_dir, image_size, seed, folder, p, log)
        else:
            log(f"{folder}: images exist ({meta['train_count']} train, {meta['val_count']} val), "
                f"skipping")
        kept("the images")
        train_u8, val_u8 = (np.memmap(p[f"{s}_images.u8"], np.uint8, "r").reshape(
            -1, image_size, image_size, 3) for s in ("train", "val"))
        device = cli.pick_device(settings["device"])
        if model is not None:
            log(f"{folder}: tokenizer vq.pt exists, skipping its training")
        else:
            model = make_tokenizer(train_u8, val_u8, cfg, train_kw, device, folder, p, meta, name,
                                   log)
        kept("the images and the tokenizer")
        if make_tokens(model, train_u8, val_u8, device, folder, p, meta, log) or new_images:
            record_source(folder, dataset=dataset, data_dir=data_dir, name=name,
                          image_size=image_size, seed=seed, vq=dict(vq_overrides or {}))
    cli.stop_note = note
    return folder


# -----------------------------------------------------------------------------
# source.json: the command that makes a folder again, for prepare(), token_folder.py and fid.py


SOURCE = "source.json"     # the flags that made the folder; outlives meta.json


def remake_command(data_dir, meta=None, force=False):
    """-> (the command line that makes data_dir again, the folder it writes), from data_dir's
    source.json (written by every prepare_data.py and encode_folder.py run), else from
    meta.json; ROOT stands for an image folder that neither records. The tokens of a tokenizer
    file (source.json's tokenizer, meta.json's released_tokenizer) are encode_folder.py's."""
    try:
        args = cli.read_json(os.path.join(data_dir, SOURCE))
    except UserError:                         # none, or damaged
        args = {}
    if not args:
        name, meta = os.path.basename(os.path.normpath(data_dir)), meta or {}
        dataset = meta.get("dataset") or name
        args = {"dataset": dataset if dataset in DATASETS else "imagefolder", "name": name,
                "image_size": meta.get("image_size", 0), "seed": meta.get("seed", 0),
                "tokenizer": meta.get("released_tokenizer")}
        if args["dataset"] == "imagefolder":
            args["data_dir"] = "ROOT"
    args["name"] = args.get("name") or args["dataset"]
    if args.get("tokenizer"):                 # the tokens of a tokenizer file: encode_folder.py's
        script, default = "encode_folder.py", {"image_size": 256}
        keys = ("data_dir", "name", "tokenizer", "image_size", "seed", "skip_unreadable")
    else:
        script, keys = "prepare_data.py", ("dataset", "data_dir", "name", "image_size", "seed")
        size = 16 if args["dataset"] == "shapes" else 32
        default = {"name": args["dataset"], "image_size": size}
    words = [f"--{k}={args[k]}" for k in keys if args.get(k) and args[k] != default.get(k)]
    words += [f"--vq.{k}={v}" for k, v in args.get("vq", {}).items()] + ["--force"] * force
    return cli.command(script, *words), data_path(args["name"])


def remake(data_dir, meta=None, force=False):
    """remake_command as a hint: in backticks, and where it writes when that is not data_dir."""
    command, target = remake_command(data_dir, meta, force)
    if os.path.abspath(target) == os.path.abspath(data_dir):
        return f"`{command}`"
    return f"`{command}` (it writes {target}: pass --data_dir={target})"


def record_source(folder, **args):
    """source.json: the arguments that made folder, with absolute paths, for remake_command."""
    for key in ("data_dir", "tokenizer"):
        if args.get(key):
            args[key] = os.path.abspath(args[key])
    cli.write_json(args, os.path.join(folder, SOURCE))


# -----------------------------------------------------------------------------
# command line


@dataclass
class PrepareConfig:
    dataset: str = ""             # cifar10 | imagefolder | shapes
    name: str = ""                # the folder data/<name>; '' means the dataset's name
    data_dir: str = ""            # a local CIFAR-10 copy (tarball or extracted), or an image folder
    image_size: int = 0           # image side; 0 means 16 for shapes, else 32
    force: bool = False           # redo all three steps
    seed: int = 0                 # shapes: the images; imagefolder: the held out; tokenizer init


def main(argv):
    t0 = time.time()
    dataset = next((a.partition("=")[2] for a in argv if a.startswith("--dataset=")), None)
    if any(a.startswith("--tokenizer") for a in argv):   # the same folder, through the file
        words = [a for a in argv if not a.startswith(("--dataset=", "--vq.", "--help", "-h"))]
        if not any(a.startswith("--name=") for a in argv):
            words.insert(0, f"--name={dataset or 'imagefolder'}")
        raise UserError(f"a tokenizer file encodes an image folder with encode_folder.py: run "
                        f"`{cli.command('encode_folder.py', *words)}`")
    vq_help = {**cli.field_comments(vq.VQConfig), **cli.field_comments(vq.TrainConfig)}
    opt, extra = cli.parse_args(argv, PrepareConfig(), doc=__doc__,
                                extra={"vq.": vq_options(dataset)}, extra_help=vq_help)
    if not opt.dataset:
        raise UserError(f"pass --dataset=NAME, one of {', '.join(DATASETS)} (see --help)")
    cli.check_ranges(opt, {"image_size": (lambda v: v >= 0,
                                           "at least 0 (0: the dataset's default)")})
    cli.pick_device(extra.get("vq.", {}).get("device", ""), "--vq.device")   # before any write
    folder = prepare(opt.dataset, opt.name or None, opt.data_dir or None, opt.force,
                     opt.image_size, opt.seed, extra.get("vq.", {}))
    print(f"done in {time.time() - t0:.0f}s: {folder}")


if __name__ == "__main__":
    cli.run(main)

