"""
vq.py: the VQ tokenizer trained here, and the interface every tokenizer shares. A tokenizer turns
an image into a grid of codebook indices and back:

    32x32x3 image --encoder--> 16x16x d vectors --nearest code--> 16x16 indices in [0, K)
    16x16 indices --codebook E (K, d)--> 16x16x d vectors --decoder--> 32x32x3 image

behind one interface: encode(uint8 images) -> indices, decode(indices) -> images, codebook (K, d).
VQVAE is a small convolutional autoencoder trained here (`train_vq`) for the small data sets; the
released tokenizers the paper's ImageNet results use (LlamaGen's VQ-8 / VQ-16, LDM's vq-f8) are
read by vqgan.py, whose `load_tokenizer` opens any of them, telling the files apart by their keys.

The generator (purrception.py) never sees pixels: it learns to move Gaussian noise onto the rows of
the codebook E, so `model.codebook` is exported exactly as the decoder consumes it.

Run:
    python vq.py --dataset=shapes        # retrains data/shapes/vq.pt on data/shapes/train_images.u8
    python vq.py --dataset=cifar10 --max_iters=20000 --vq.codebook_size=512
(prepare_data.py calls `train_vq` itself when data/NAME/vq.pt is missing, and re-tokenizes after a
retraining.)

Notable choices of VQVAE (each measured on CIFAR-10, see README):
- Downsample by f=2 only (16x16 tokens for 32x32 images). Its cost is paid by the generator with a
  2x2 patchify, which brings the transformer back to 64 tokens.
- l2-normalised, low-dimensional codes (d=8), looked up by cosine similarity, as in ViT-VQGAN and
  LlamaGen: usage stays near 100% and the code vectors have a fixed scale (norm 1), which is what
  the flow's Gaussian path is built around.
- EMA codebook updates with k-means init and dead-code restarts instead of a codebook loss: no
  learning rate to tune for the codes, and no code stays dead for long.
- Plain MSE reconstruction loss: no perceptual or adversarial loss (those need pretrained networks).
"""

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli

# -----------------------------------------------------------------------------
# config


@dataclass
class VQConfig:
    image_size: int = 32          # side of the (square) images; must be a multiple of `downsample`
    downsample: int = 2           # f: a power of two; the token grid is (image_size / f)^2
    ch: int = 64                  # channels of the residual trunk at the latent resolution
    n_res: int = 2                # residual blocks in the encoder and in the decoder
    codebook_size: int = 1024     # K; at most 65536 (tokens are stored as uint16)
    code_dim: int = 8             # d: the space the generator's flow lives in
    beta: float = 0.25            # commitment weight (VQ-VAE, van den Oord et al. 2017)
    decay: float = 0.99           # EMA decay of the codebook statistics

    @property
    def grid(self):
        return self.image_size // self.downsample


def check_config(cfg):
    """One readable line for each mistake a user can make in the tokenizer config."""
    f = cfg.downsample
    if f < 1 or f & (f - 1):
        raise ValueError(f"vq downsample must be a power of two, got {f}")
    if cfg.image_size % f:
        raise ValueError(f"image side {cfg.image_size} is not divisible by the tokenizer's "
                         f"downsampling factor {f}; pick --image_size as a multiple of {f}")
    if not 2 <= cfg.codebook_size <= 65536:
        raise ValueError(f"codebook_size {cfg.codebook_size} must be in [2, 65536]: tokens are "
                         f"stored as uint16")
    if cfg.ch % 8 or cfg.ch // f < 1:
        raise ValueError(f"vq ch={cfg.ch} must be a multiple of 8 (GroupNorm uses 8 groups) and "
                         f"at least {f}")


# Per-dataset settings (VQConfig fields and train_vq arguments); the rest take the defaults. Shapes
# are 16x16 and flat-coloured, so a small VQ with 64 codes and 1000 steps is enough (29.7 dB PSNR,
# every code used, 27 s on a CPU): an 8x8 token grid that a CPU-sized generator learns in minutes.
PRESETS = {"shapes": dict(ch=32, n_res=1, codebook_size=64, max_iters=1000, batch_size=64,
                          eval_interval=1000)}

# -----------------------------------------------------------------------------
# encoder and decoder


class ResnetBlock(nn.Module):
    """x + conv3x3(swish(norm(conv3x3(swish(norm(x)))))): the pre-activation residual block of both
    tokenizer families, with a 1x1 shortcut when the width changes. norm(ch) -> a GroupNorm."""

    def __init__(self, c_in, c_out, norm=lambda ch: nn.GroupNorm(8, ch)):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, d, H/f, W/f): strided convs down, then a residual trunk."""

    def __init__(self, cfg):
        super().__init__()
        n_down = int(math.log2(cfg.downsample))
        chs = [cfg.ch // 2 ** (n_down - i) for i in range(n_down)] + [cfg.ch]   # e.g. f=2: [32, 64]
        self.conv_in = nn.Conv2d(3, chs[0], 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(chs[i], chs[i + 1], 4, stride=2, padding=1)
                                  for i in range(n_down))
        self.res = nn.Sequential(*[ResnetBlock(cfg.ch, cfg.ch) for _ in range(cfg.n_res)])
        self.norm_out = nn.GroupNorm(8, cfg.ch)
        self.conv_out = nn.Conv2d(cfg.ch, cfg.code_dim, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for down in self.down:
            x = down(F.silu(x))                                             # halve H and W
        x = self.res(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """(B, d, h, w) code vectors -> (B, 3, h*f, w*f): residual trunk, then transposed convs up."""

    def __init__(self, cfg):
        super().__init__()
        n_up = int(math.log2(cfg.downsample))
        chs = [cfg.ch // 2 ** i for i in range(n_up + 1)]                    # e.g. f=2: [64, 32]
        self.conv_in = nn.Conv2d(cfg.code_dim, cfg.ch, 3, padding=1)
        self.res = nn.Sequential(*[ResnetBlock(cfg.ch, cfg.ch) for _ in range(cfg.n_res)])
        self.norm = nn.GroupNorm(8, cfg.ch)
        self.up = nn.ModuleList(nn.ConvTranspose2d(chs[i], chs[i + 1], 4, stride=2, padding=1)
                                for i in range(n_up))
        self.conv_out = nn.Conv2d(chs[-1], 3, 3, padding=1)

    def forward(self, z):
        x = self.res(self.conv_in(z))
        x = F.silu(self.norm(x))
        for up in self.up:
            x = F.silu(up(x))                                               # double H and W
        return self.conv_out(x)

# -----------------------------------------------------------------------------
# the quantizer: the part worth copying
#
# Codes and encoder outputs are both l2-normalised, so for unit vectors
#     ||z - e_k||^2 = 2 - 2 <z, e_k>       and the nearest code is  c = argmax_k <z, e_k>
# (nearest_code computes it as the L2 argmin, the way the released tokenizers' quantisers do).
# The decoder receives z_q = e_c. Its gradient is copied straight through to z (Bengio et al. 2013):
#     z_q = z + stopgrad(e_c - z)          (forward: e_c, backward: identity)
# The encoder is pulled towards its code by the commitment loss  beta * ||z - stopgrad(e_c)||^2.
# The codes themselves are not trained by gradient: each is the (normalised) running mean of the
# encoder outputs assigned to it (EMA k-means, VQ-VAE appendix; Razavi et al. 2019):
#     N_k <- decay * N_k + (1 - decay) * n_k
#     S_k <- decay * S_k + (1 - decay) * sum_{i: c_i = k} z_i
#     e_k  = normalise(S_k / N_k)
# A code whose usage N_k falls below `dead_threshold` is restarted at a random encoder output of the
# current batch, so probability mass the generator must learn is never spread over unused codes.


def nearest_code(z, E, chunk=2**24):
    """The readout of every tokenizer and sampler: z (..., d) -> the index of its nearest row of E
    (K, d), in fp32 whatever autocast is on, written as the official quantisers write it (z^2 + e^2
    - 2 z.e, so ties fall the same way); about `chunk` distances at a time (None: all at once)."""
    with torch.autocast(z.device.type, enabled=False):
        zs, E = z.float().reshape(-1, z.shape[-1]), E.float()
        e2 = E.pow(2).sum(-1)
        idx = torch.cat([(zc.pow(2).sum(-1, keepdim=True) + e2 - 2 * zc @ E.T).argmin(-1)
                         for zc in zs.split(max(1, (chunk or len(zs)) // len(E)))])
    return idx.view(z.shape[:-1])


class Quantizer(nn.Module):
    def __init__(self, K, d, beta=0.25, decay=0.99, dead_threshold=1.0):
        super().__init__()
        self.K, self.d, self.beta, self.decay = K, d, beta, decay
        self.dead_threshold = dead_threshold
        self.register_buffer("embed", F.normalize(torch.randn(K, d), dim=1))   # (K, d): E
        self.register_buffer("ema_count", torch.ones(K))                        # N_k
        self.register_buffer("ema_sum", self.embed.clone())                     # S_k
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def kmeans_init(self, z, iters=10):
        """Initialise the codes with a few Lloyd iterations of spherical k-means on one batch."""
        g = torch.Generator(device="cpu").manual_seed(0)
        pick = torch.randint(0, z.shape[0], (self.K,), generator=g).to(z.device)
        embed = z[pick].clone()
        for _ in range(iters):
            c = nearest_code(z, embed)
            sums = torch.zeros_like(embed).index_add_(0, c, z)
            counts = torch.bincount(c, minlength=self.K).float()
            embed = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), embed)
        self.embed.copy_(embed)
        self.ema_sum.copy_(embed)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, z, c):
        """One EMA k-means step on (M, d) vectors z with assignments c, then restart dead codes."""
        # counts by index_add_, not bincount: on a GPU bincount reads the largest index on the host
        counts = torch.zeros_like(self.ema_count).index_add_(0, c, torch.ones_like(z[:, 0]))
        sums = torch.zeros_like(self.ema_sum).index_add_(0, c, z)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # restart dead codes at random batch vectors: a vector is drawn for every code and kept
        # where the code is dead, so the step never waits for the device to count them
        dead = self.ema_count < self.dead_threshold                         # (K,)
        pick = torch.randint(0, z.shape[0], (self.K,), device=z.device)     # (K,)
        self.ema_sum.copy_(torch.where(dead[:, None], z[pick], self.ema_sum))
        self.ema_count.clamp_(min=self.dead_threshold)
        self.embed.copy_(F.normalize(self.ema_sum, dim=1))

    def forward(self, z):
        """z: (B, d, h, w) encoder output -> z_q (B, d, h, w), indices (B, h, w), commitment
        loss."""
        B, d, h, w = z.shape
        z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)         # (B*h*w, d) unit
        # the buffer is read on the host once (after a load too), not at every step
        if self.training and not getattr(self, "_initialized", False):
            self._initialized = bool(self.initialized)
            if not self._initialized:
                self.kmeans_init(z.detach())
                self._initialized = True
        c = nearest_code(z.detach(), self.embed)                             # (B*h*w,)
        if self.training:
            self.ema_update(z.detach(), c)
        e = self.embed[c]                                                    # (B*h*w, d)
        commit = self.beta * F.mse_loss(z, e)
        z_q = z + (e - z).detach()                                  # straight-through estimator
        z_q = z_q.reshape(B, h, w, d).permute(0, 3, 1, 2)
        return z_q, c.reshape(B, h, w), commit

# -----------------------------------------------------------------------------
# the autoencoder and the interface the rest of the repository uses


def to_float(images):
    """uint8 (N, H, W, 3) numpy/tensor -> float (N, 3, H, W) in [-1, 1]; float input passes
    through."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.float()


def to_uint8(x):
    """float (N, 3, H, W) in [-1, 1] -> numpy uint8 (N, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def psnr(a, b):
    """Peak signal-to-noise ratio in dB between two uint8 image arrays (over the whole set)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def batched(model, fn, x, batch_size):
    """fn over x in batches on the model's device; the results concatenated on the cpu."""
    dev = next(model.parameters()).device
    return torch.cat([fn(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])


class VQVAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = Quantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.decay)
        self.decoder = Decoder(cfg)

    @property
    def codebook(self):
        """E: (K, d) float32, exactly the vectors the decoder receives for each index."""
        return self.quantizer.embed.detach().float().clone()

    def forward(self, x):
        """x: (B, 3, H, W) in [-1, 1] -> reconstruction, indices (B, h, w), commitment loss."""
        z_q, idx, commit = self.quantizer(self.encoder(x))
        return self.decoder(z_q), idx, commit

    @torch.no_grad()
    def encode(self, images, batch_size=512):
        """images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] -> indices (N, h, w) int64,
        on cpu."""
        def enc(x):
            z = F.normalize(self.encoder(to_float(x)), dim=1)               # (b, d, h, w)
            return nearest_code(z.permute(0, 2, 3, 1), self.quantizer.embed)   # (b, h, w)
        return batched(self, enc, torch.as_tensor(images), batch_size)

    @torch.no_grad()
    def decode_z(self, z, batch_size=512):
        """z: (N, h, w, d) points in code space (codes, or posterior means) -> images
        (N, 3, H, W), on cpu."""
        return batched(self, lambda zb: self.decoder(zb.float().permute(0, 3, 1, 2)), z, batch_size)

    @torch.no_grad()
    def decode(self, indices, batch_size=512):
        """indices: (N, h, w) integers in [0, K) -> images (N, 3, H, W) in [-1, 1] (float), on
        cpu."""
        E = self.quantizer.embed
        idx = torch.as_tensor(indices).long()
        return batched(self, lambda i: self.decoder(E[i].permute(0, 3, 1, 2)), idx, batch_size)

# -----------------------------------------------------------------------------
# tokenizer files: vq.py's own, and the released ones (vqgan.load_tokenizer reads them all)

LAYOUTS = ("a tokenizer written by vq.py", "LlamaGen VQ-8/VQ-16 ({'model': state_dict})",
           "LDM vq-f8 ({'state_dict': state_dict})")


def save_vq(model, path, metrics=None, trained_on=""):
    """Atomic save of weights + constructor arguments (loadable with weights_only=True); trained_on
    names the data folder whose images trained it, so a tokenizer is never used on another folder's
    images by mistake."""
    ckpt = {"model": model.state_dict(), "vq_config": asdict(model.cfg), "metrics": metrics or {},
            "trained_on": trained_on}
    save_torch(ckpt, path)


def save_torch(obj, path):
    """torch.save through cli.atomic_save, into an open file: the archive inside is then named
    'archive', not after the temporary file, so the same tokenizer is the same bytes."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    cli.atomic_save(write, path)


def read_vq(path):
    """The checkpoint dict of a tokenizer file of any of LAYOUTS, or a UserError naming the file."""
    if not os.path.exists(path):
        raise cli.UserError(f"no tokenizer at {path}; run `python prepare_data.py --dataset=NAME` "
                            f"to train one, or pass --tokenizer=FILE (LlamaGen's or LDM's)")
    kinds = "; it reads " + ", ".join(LAYOUTS)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                       # truncated, foreign, or pickled objects
        if "unsupported global" in str(e).lower():
            # never unpickled here: objects in a pickle run code. The user may, once, knowingly.
            weights = os.path.splitext(path)[0] + "_weights.pt"
            raise cli.UserError(
                f"{path} holds pickled Python objects besides its weights (a Lightning file), "
                f"which are never unpickled here; if you trust the file, keep its state dict alone "
                f"once with `python -c \"import torch; torch.save({{'state_dict': torch.load("
                f"'{path}', weights_only=False)['state_dict']}}, '{weights}')\"` and pass "
                f"{weights}") from None
        raise cli.UserError(f"cannot read the tokenizer {path} ({type(e).__name__}): not a torch "
                            f"file, or one cut short (fetch or prepare it again){kinds}") from None
    if not isinstance(ckpt, dict) or not (isinstance(ckpt.get("released"), str) or any(
            isinstance(ckpt.get(k), dict) for k in ("vq_config", "model", "state_dict"))):
        raise cli.UserError(f"{path} is not a tokenizer file{kinds}")
    if "vq_config" in ckpt:
        try:
            VQConfig(**ckpt["vq_config"])
        except TypeError:                        # from another version of vq.py
            raise cli.UserError(f"cannot read the tokenizer {path} (another version's settings); "
                                f"delete it and prepare the data again") from None
    return ckpt


_SHA1 = {}                       # (path, size, mtime) -> sha1: each file hashed once a process


def file_sha1(path):
    """sha1 of a file, cached by its path, size and mtime (281 MB: about 0.15 s on a 2-core CPU)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA1:
        with open(path, "rb") as f:
            _SHA1[key] = hashlib.file_digest(f, "sha1").hexdigest()
    return _SHA1[key]


def save_pointer(path, released, image_size):
    """A data folder's tokenizer when it is a file brought from elsewhere (a released one): where
    that file is, its sha1, and the image size the folder feeds it (vqgan.load_tokenizer follows
    it)."""
    ckpt = {"released": os.path.abspath(released), "sha1": file_sha1(released),
            "image_size": image_size}
    save_torch(ckpt, path)


# -----------------------------------------------------------------------------
# training


def tile(images, ncol, pad=2, scale=1):
    """uint8 images (N, H, W, 3) -> one uint8 image with ncol of them a row, on white; scale > 1
    enlarges each pixel into a scale x scale block (32x32 images are small on a screen)."""
    images = np.asarray(images).repeat(scale, axis=1).repeat(scale, axis=2)
    N, H, W, C = images.shape
    canvas = np.full((pad + math.ceil(N / ncol) * (H + pad), pad + ncol * (W + pad), C), 255,
                     dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[pad + r * (H + pad):(r + 1) * (H + pad),
               pad + c * (W + pad):(c + 1) * (W + pad)] = image
    return canvas


def save_pairs(originals, recons, path, n=32, cols=8):
    """A PNG with rows of originals, each followed by a row of their reconstructions."""
    from PIL import Image
    n = min(n, len(originals)) // cols * cols or min(n, len(originals))   # whole rows when possible
    cols = min(cols, n)
    # (rows, 2, cols, H, W, 3): a row of originals, then the same row reconstructed
    pairs = np.stack([originals[:n], recons[:n]]).reshape(2, -1, cols, *originals.shape[1:])
    pairs = pairs.transpose(1, 0, 2, 3, 4, 5).reshape(-1, *originals.shape[1:])
    cli.atomic_save(Image.fromarray(tile(pairs, cols, pad=0)).save, path)


@torch.no_grad()
def evaluate(model, val_u8, batch_size=500):
    """Reconstruction PSNR on held-out images, codebook usage (fraction of codes hit) and
    perplexity."""
    model.eval()
    idx = model.encode(val_u8, batch_size)
    recon = to_uint8(model.decode(idx, batch_size))
    counts = torch.bincount(idx.flatten(), minlength=model.cfg.codebook_size).float()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    model.train()
    usage = float((counts > 0).float().mean())
    return {"psnr": psnr(val_u8, recon), "usage": usage, "perplexity": perplexity}, recon


def train_vq(train_u8, val_u8, cfg, out_path, *, max_iters=1200, batch_size=128, lr=2e-3,
             device="cpu", eval_interval=1000, seed=0, log=print, trained_on=""):
    """Train the tokenizer on uint8 (N, H, W, 3) images; write out_path (+ a reconstruction PNG
    beside it)."""
    check_config(cfg)
    if train_u8.shape[1] != cfg.image_size:
        raise ValueError(f"images are {train_u8.shape[1]}px but the tokenizer config says "
                         f"image_size={cfg.image_size}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = VQVAE(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"vq: {n_params / 1e6:.2f}M parameters, {cfg.grid}x{cfg.grid} tokens, "
        f"K={cfg.codebook_size}, d={cfg.code_dim}, {max_iters} iters of batch {batch_size}")
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    # 2000 val images are enough for a stable PSNR and cheap to encode: a fixed random subset, in
    # random order, so figures and the preview stand for every class (val sets are often sorted by
    # class)
    val_u8 = val_u8[np.random.default_rng(0).permutation(len(val_u8))[:2000]]
    metrics, t0 = {}, time.time()
    for it in cli.progress(range(1, max_iters + 1), desc="vq", unit="iter"):
        # cosine decay to 10% of lr after a short warmup: long training at full lr makes the codes
        # churn
        warm = min(1.0, it / min(200, max_iters // 10 + 1))
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * it / max_iters))
        opt.param_groups[0]["lr"] = lr * warm * cosine
        x = to_float(train_u8[np.sort(rng.integers(0, len(train_u8), batch_size))])
        # pinned + non_blocking: the copy does not wait for the previous step to finish
        x = (x.pin_memory().to(device, non_blocking=True) if device.startswith("cuda")
             else x.to(device))
        if rng.random() < 0.5:
            x = x.flip(3)                       # horizontal flips: free data for natural images
        recon, _, commit = model(x)
        rec = F.mse_loss(recon, x)
        loss = rec + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % eval_interval == 0 or it == max_iters:
            metrics, recon_u8 = evaluate(model, val_u8)
            metrics["iter"] = it            # no clock time: the same run, the same bytes
            log(f"vq iter {it}: val psnr {metrics['psnr']:.2f} dB, codebook usage "
                f"{metrics['usage']:.1%}, perplexity {metrics['perplexity']:.0f}, "
                f"{(time.time() - t0) / 60:.1f} min")
            save_vq(model, out_path, metrics, trained_on)     # the picture only of a saved one
            save_pairs(val_u8, recon_u8, os.path.splitext(out_path)[0] + "_recon.png")
    return model.eval()

# -----------------------------------------------------------------------------
# command line: python vq.py --dataset=NAME [--max_iters=N ...] [--vq.KEY=VALUE ...]


@dataclass
class TrainConfig:
    dataset: str = "shapes"       # data/<dataset>/ with train_images.u8 from prepare_data.py
    out: str = ""                 # the tokenizer; '' means data/<dataset>/vq.pt (then re-tokenized)
    max_iters: int = 1200         # optimizer steps
    batch_size: int = 128         # images per step
    lr: float = 2e-3              # Adam's peak learning rate (cosine to 10%)
    eval_interval: int = 1000     # iters between val PSNR evals and saves
    seed: int = 0                 # initial weights and batches
    device: str = ""              # '' picks cuda, then mps, then cpu


def main(argv):
    train_keys = asdict(TrainConfig())
    presets = {name: {k: v for k, v in p.items() if k in train_keys} for name, p in PRESETS.items()}
    preset = next((PRESETS.get(a.partition("=")[2], {}) for a in argv
                   if a.startswith("--dataset=")), PRESETS.get(TrainConfig.dataset, {}))
    shape_keys = {k: v for k, v in asdict(VQConfig()).items() if k != "image_size"}
    opt, extra = cli.parse_args(argv, TrainConfig(), presets, __doc__, {"vq.": {**shape_keys, **{
        k: v for k, v in preset.items() if k in shape_keys}}}, cli.field_comments(VQConfig))
    cli.check_ranges(opt, {k: (lambda v: v >= 1, "at least 1")
                           for k in ("max_iters", "batch_size", "eval_interval")})
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", opt.dataset)
    meta = cli.read_json(os.path.join(root, "meta.json"),
                         f"prepared images (run `python prepare_data.py --dataset={opt.dataset}` "
                         f"first)")
    S = meta["image_size"]                       # the images' size is the folder's, not a flag
    shape = (-1, S, S, 3)
    images = lambda split: np.memmap(os.path.join(root, f"{split}_images.u8"), dtype=np.uint8,
                                     mode="r").reshape(shape)
    train_u8, val_u8 = images("train"), np.array(images("val"))
    fields = {**{k: v for k, v in preset.items() if k in shape_keys}, **extra.get("vq.", {})}
    try:
        cfg = VQConfig(**{**fields, "image_size": S})
        check_config(cfg)
    except ValueError as e:
        raise cli.UserError(str(e)) from None
    train_vq(train_u8, val_u8, cfg, opt.out or os.path.join(root, "vq.pt"),
             max_iters=opt.max_iters, batch_size=opt.batch_size, lr=opt.lr,
             device=cli.pick_device(opt.device), eval_interval=opt.eval_interval, seed=opt.seed,
             trained_on=opt.dataset)


if __name__ == "__main__":
    cli.run(main)
