"""
purrception.py: class-conditional image generation by variational flow matching over VQ tokens, in
one file (Matişan et al., "Purrception: Variational Flow Matching for Vector-Quantized Image
Generation", ICLR 2026, https://arxiv.org/abs/2510.01478).

A transformer reads a noisy point z_t in the codebook's embedding space (vq.py's tokenizer) and
predicts a categorical posterior over the K codes at every latent position; training is plain
cross-entropy. Time runs as in the paper's code (the reverse of minRF): t = 0 is noise, t = 1 data.

    python purrception.py --dataset=shapes                      # CPU quick start: ~3 min to samples
    python purrception.py --dataset=cifar10                     # one GPU (DiT-B/2)
    torchrun --standalone --nproc_per_node=8 purrception.py --dataset=cifar10  # 8 GPUs, one batch

Every random draw of a training step is a function of (seed, iter, image slot), so a resume, or
any split of the batch over processes and micro-steps, replays the run.
"""

import copy
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import cli
import token_folder
import vq
from cli import UserError
from vq import nearest_code

# data/ and out-*/ live next to this file, whatever the CWD
HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# config: these defaults, then the dataset's preset below, then --key=value flags (cli.py)


@dataclass
class Config:
    # data
    dataset: str = "shapes"       # data/<dataset>/ from prepare_data.py (made when missing)
    data_dir: str = ""            # the token folder; '' means data/<dataset> next to this file
    # I/O
    out_dir: str = ""             # ckpt.pt, config.json, grids; '' means out-<dataset> here
    init_from: str = "scratch"    # 'scratch' or 'resume' (out_dir/ckpt.pt, exactly as it stopped)
    overwrite: bool = False       # a run from scratch may replace ckpt.pt (at its first save)
    eval_interval: int = 2000     # iters between evals, checkpoints and sample grids
    eval_iters: int = 20          # val batches (global batches) per eval
    log_interval: int = 50        # iters between log lines (and non-finite loss checks)
    sample_steps: int = 50        # network calls for eval grids (paper: 100 curves, 250 best FID)
    grid_cols: int = 8            # samples per class row in the eval grids
    # model: DiT-S/2 (33M parameters) unless a preset says otherwise
    patch_size: int = 2           # p: a 16x16 token grid becomes 8x8 = 64 transformer tokens
    n_layer: int = 12             # transformer blocks
    n_head: int = 6               # attention heads
    n_embd: int = 384             # width
    time_embed: str = "scaled"    # 'scaled': 1000 to 1 rad per unit t; 'official': raw t, 1 to 1e-4
    class_dropout: float = 0.1    # chance of training on the null class, which guidance needs
    # optimizer: AdamW as in the paper's configs
    batch_size: int = 64          # images per micro-step; x grad_accum: the iter's global batch
    grad_accum: int = 1           # micro-steps per iter, over all processes (torchrun shares them)
    max_iters: int = 100000       # optimizer steps
    lr: float = 1e-4              # peak learning rate (the paper: 1e-4, constant, for DiT-B/L/XL)
    min_lr: float = 1e-5          # where the cosine ends (with decay_lr)
    warmup_iters: int = 1000      # linear warmup from ~0 to lr
    decay_lr: bool = False        # cosine decay to min_lr at max_iters; false: constant (the paper)
    weight_decay: float = 0.01    # AdamW's decoupled weight decay
    beta1: float = 0.9            # AdamW's first-moment decay
    beta2: float = 0.999          # AdamW's second-moment decay
    grad_clip: float = 1.0        # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.9999     # EMA of the weights, used for every eval and sample
    # sampling (the eval grids; sample.py has its own flags)
    temperature: float = 1.0      # tau: 1 is the trained posterior; ~0.9 gave the paper's best FID
    cfg_scale: float = 1.0        # classifier-free guidance s; 1 turns it off
    solver: str = "euler"         # euler (the paper's) or dpm++2m: second order, the same calls
    time_shift: float = 1.0       # the time grid: 1 uniform, < 1 denser near the data (t = 1)
    cfg_interval: str = "0,1"     # guidance only for t in lo,hi (0,1: at every step)
    # system
    device: str = ""              # '' picks cuda, then mps, then cpu
    compile: bool = False         # torch.compile: faster GPU steps after a minute of compiling
    seed: int = 0                 # initial weights and every random draw of training
    peak_flops: float = 0.0       # peak FLOP/s for the MFU print; 0: cli.PEAK_FLOPS has it


SOLVERS = ("euler", "dpm++2m")    # the sampler's ODE solvers (section "the sampler")

# What each flag may be: checked before anything is read or written.
RANGES = {
    "init_from": (lambda v: v in ("scratch", "resume"), "'scratch' or 'resume'"),
    "time_embed": (lambda v: v in ("scaled", "official"), "'scaled' or 'official'"),
    **{k: (lambda v: v > 0, "positive") for k in ("lr", "temperature", "time_shift")},
    "solver": (lambda v: v in SOLVERS, " or ".join(SOLVERS)),
    "cfg_interval": (lambda v: cli.interval(v) is not None, "lo,hi with 0 <= lo <= hi <= 1"),
    **{k: (lambda v: v >= 1, "at least 1")
       for k in ("eval_interval", "eval_iters", "log_interval", "sample_steps", "grid_cols",
                 "patch_size", "n_layer", "n_head", "n_embd", "batch_size", "grad_accum")},
    **{k: (lambda v: v >= 0, "at least 0") for k in ("max_iters", "warmup_iters", "min_lr",
                                                     "weight_decay", "grad_clip", "cfg_scale",
                                                     "peak_flops")},
    **{k: (lambda v: 0 <= v < 1, "in [0, 1)") for k in ("class_dropout", "ema_decay", "beta1",
                                                        "beta2")},
}


# The flags a resume takes from the checkpoint (its model) and those that need not match its run.
ARCHITECTURE = ("patch_size", "n_layer", "n_head", "n_embd", "time_embed")
PER_INVOCATION = ("init_from", "overwrite", "max_iters", "device", "compile", "peak_flops",
                  "data_dir", "out_dir")


# The paper's model sizes: with patch 2 on 32x32 grids of K=16384 codes they have the official
# models' 180.7M, 525.0M and 750.4M parameters (DiT.num_params(); --n_layer=12 --n_head=12 ...).
DIT_SIZES = {"B/2": dict(n_layer=12, n_head=12, n_embd=768),
             "L/2": dict(n_layer=24, n_head=16, n_embd=1024),
             "XL/2": dict(n_layer=28, n_head=16, n_embd=1152)}

# Per-dataset overrides of the defaults, like nanoGPT's config files.
PRESETS = {
    # 2 CPU cores: 16x16 shapes -> an 8x8 grid of K=64 codes, one token per code (patch 1). 1.3M
    # parameters draw every class recognisably by 800 iters (cleaner edges with more); mild
    # guidance; the grids sampled by the second-order solver in 16 calls (docs/sampling.md).
    "shapes": dict(patch_size=1, n_layer=4, n_head=4, n_embd=128, batch_size=32, max_iters=800,
                   lr=3e-3, warmup_iters=50, decay_lr=True, min_lr=1e-4, ema_decay=0.995,
                   eval_interval=400, eval_iters=5, log_interval=100, sample_steps=16,
                   cfg_scale=1.5, solver="dpm++2m"),
    # One modern GPU: DiT-B/2 (133M) on the 16x16 grid (64 tokens), 8.9 TFLOP per 256-image iter.
    # Grids: dpm++2m on the grid shifted to 0.3 in 50 calls beat Euler in 100 (docs/sampling.md).
    "cifar10": dict(n_layer=12, n_head=12, n_embd=768, batch_size=256, max_iters=100000, lr=1e-4,
                    warmup_iters=1000, eval_interval=5000, log_interval=100, sample_steps=50,
                    solver="dpm++2m", time_shift=0.3),
    # The paper's ImageNet 256 (data/imagenet256, README): 32x32 grids of K=16384 codes, DiT-XL/2
    # and the official optimizer (AdamW 1e-4 constant, decay 0.01, clip 1, EMA 0.9999, bf16).
    "imagenet256": dict(**DIT_SIZES["XL/2"], patch_size=2, batch_size=256, max_iters=4000000,
                        lr=1e-4, decay_lr=False, warmup_iters=0, eval_interval=50000,
                        log_interval=100, sample_steps=100),
}

# -----------------------------------------------------------------------------
# the model: a DiT over the latent grid. A 32x32 CIFAR-10 image -> 16x16 codes -> (patch 2) 8x8 = 64
# tokens. In: z (B, h, w, d) points in code space, t (B,), labels y (B,). Out: logits (B, h, w, K).


def modulate(x, shift, scale):
    """adaLN: scale and shift the normalised tokens x (B, T, C) with (B, C) vectors from t, y."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# Sinusoidal features of t in [0, 1], at frequencies from f_max down to f_min radians per unit of t.
# 'scaled' (1000 to 1) is DiT's t*1000: the fastest tells t = 0.001 from 0.002, the slowest is
# monotone over [0, 1]. 'official' (1 to 1e-4) is the paper's code: raw t, DiT's 10000^(-i/128).
TIME_FREQS = {"scaled": (1000.0, 1.0), "official": (1.0, 10000.0 ** (-127 / 128))}


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (B,) -> (B, C): sinusoidal features, then a 2-layer MLP (DiT)."""

    def __init__(self, n_embd, freq_dim=256, time_embed="scaled"):
        super().__init__()
        f_max, f_min = TIME_FREQS[time_embed]
        half = freq_dim // 2
        # (half,)
        freqs = f_max * (f_min / f_max) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))

    def forward(self, t):
        args = t.float()[:, None] * self.freqs[None]                                   # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))         # (B, C)


class LabelEmbedder(nn.Module):
    """Labels (B,) -> (B, C). Index num_classes is the null class, guidance's unconditional."""

    def __init__(self, num_classes, n_embd):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, n_embd)

    def forward(self, y):
        return self.embedding(y)


class Attention(nn.Module):
    """Multi-head self-attention over all T tokens of the image (no causal mask)."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        # (B, T, 3, nh, hs) -> 3 x (B, nh, T, hs)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)                             # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))                    # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward, 4x wide (DiT, the paper), tanh-GELU."""

    def __init__(self, n_embd):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Transformer block with adaLN-Zero: c sets each sublayer's shift, scale and gate."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(n_embd)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(n_embd, 6 * n_embd))

    def forward(self, x, c):
        # 6 x (B, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.ln_1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.ln_2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map from each token to its patch's outputs (p*p*K)."""

    def __init__(self, n_embd, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(n_embd, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(n_embd, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(n_embd, 2 * n_embd))

    def forward(self, x, c, head_input=False):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm(x), shift, scale)
        return (x, self.linear.weight, self.linear.bias) if head_input else self.linear(x)


# The one patch order of the repository: a patch's p x p positions in row-major order.
def patchify(x, p):
    """(B, h, w, c) -> (B, T, p*p, c): the p x p patches of the grid, T = (h/p) (w/p)."""
    B, h, w, c = x.shape
    return x.reshape(B, h // p, p, w // p, p, c).transpose(2, 3).reshape(B, -1, p * p, c)


def unpatchify(x, p, h, w):
    """(B, T, p*p, c) -> (B, h, w, c), the inverse of patchify."""
    B, c = x.shape[0], x.shape[-1]
    return x.reshape(B, h // p, w // p, p, p, c).transpose(2, 3).reshape(B, h, w, c)


def sincos_pos_embed(n_embd, side):
    """Fixed 2-D sin-cos positions (side*side, C): half the channels the row, half the column."""
    omega = 1.0 / 10000 ** (torch.arange(n_embd // 4) / (n_embd // 4))          # (C/4,)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = [f(pos.flatten()[:, None].float() * omega)
             for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)                                              # (side*side, C)


class DiT(nn.Module):
    """The posterior network q(c | z_t, t, y): a DiT over patches of the latent grid, reading in_dim
    = d channels (a point in code space) and writing out_dim = K logits per position."""

    def __init__(self, in_dim, out_dim, grid_size, patch_size=2, n_layer=12, n_head=6, n_embd=384,
                 num_classes=10, time_embed="scaled"):
        super().__init__()
        cli.check_transformer(n_embd, n_head, patch_size, grid_size)      # else a UserError
        self.in_dim, self.out_dim, self.num_classes = in_dim, out_dim, num_classes
        self.grid_size, self.patch_size, self.n_embd = grid_size, patch_size, n_embd
        self.n_tokens = (grid_size // patch_size) ** 2                                 # T
        self.patch_embed = nn.Linear(patch_size * patch_size * in_dim, n_embd)
        self.register_buffer("pos_embed", sincos_pos_embed(n_embd, grid_size // patch_size),
                             persistent=False)
        self.t_embedder = TimestepEmbedder(n_embd, time_embed=time_embed)
        self.y_embedder = LabelEmbedder(num_classes, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.final_layer = FinalLayer(n_embd, patch_size * patch_size * out_dim)
        self.initialize_weights()

    def initialize_weights(self):
        # every linear layer, the patch embedding included: Xavier-uniform, zero biases (ViT, DiT)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # label table and timestep MLP: small normal weights (DiT)
        nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: shift, scale and gate start at 0, so every block starts as the identity ...
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # ... and the output at exactly 0: a uniform posterior over the K codes, loss = log K
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    offers_head_input = True      # forward(..., head_input=True): see chunked_loss

    def forward(self, z, t, y, head_input=False):
        """z (B, h, w, d) noisy embeddings, t (B,) in [0, 1], y (B,) -> logits (B, h, w, K);
        head_input=True: the final linear's input (B, T, C), weight and bias."""
        B, h, w, d = z.shape
        x = self.patch_embed(patchify(z, self.patch_size).flatten(2))              # (B, T, C)
        x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)                                 # (B, C)
        for block in self.blocks:
            x = block(x, c)                                                         # (B, T, C)
        if head_input:
            return self.final_layer(x, c, head_input=True)
        x = self.final_layer(x, c)                                                  # (B, T, p*p*K)
        return unpatchify(x.view(B, self.n_tokens, -1, self.out_dim), self.patch_size, h, w)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self):
        """Training FLOPs per image, nanoGPT-style: 6 per weight per token it touches, plus
        attention's 12*L*C*T^2; the conditioning weights (t MLP, adaLN) run once per image."""
        per_image = sum(p.numel() for n, p in self.named_parameters()
                        if "adaLN" in n or "t_embedder" in n)
        # lookups are free
        per_token = self.num_params() - per_image - self.y_embedder.embedding.weight.numel()
        L, C, T = len(self.blocks), self.n_embd, self.n_tokens
        return 6 * (per_token * T + per_image) + 12 * L * C * T * T

# -----------------------------------------------------------------------------
# the variational flow matching loss
#
# Symbols: codebook E (K, d), frozen; tokens idx (B, h, w) in [0, K); labels y (B,).
#     t  ~ U(1e-3, 1)                      one time per image; t = 0 is noise, t = 1 is data
#     z1 = E[idx]                          (B, h, w, d) the clean embeddings
#     z0 ~ N(0, I)                         (B, h, w, d)
#     zt = t * z1 + (1 - t) * z0           the straight path from noise to data
#     loss = CE(logits, idx) + 1e-5 * mean(logsumexp(logits)^2),
#            logits = net(zt, t, y)  (B, h, w, K)
# Why cross-entropy is enough (Variational Flow Matching, Eijkelboom et al. 2024): the velocity of
# the path, (z1 - zt) / (1 - t), is affine in z1, so the marginal velocity needs only the posterior
# mean of z1, position by position. A categorical q(c | zt) per position trained with CE matches
# each position's posterior over codes, and pi @ E is then that mean. The z-loss (PaLM) pins the
# logits' free offset so they cannot drift.
#
# rand_from, vfm_loss, and the sampler's guided, time_grid, data_prediction and sample_ode (with
# vq.nearest_code) are written to be copied: they need only `import torch` and a network model(z, t,
# y) -> logits (B, h, w, K). With chunk=N they call the section "at K = 16384" below (copy it,
# patchify and unpatchify too): N logits at a time.


def rand_from(fn, shape, generator, device):
    """torch.rand or torch.randn from `generator` on its own device, then moved to `device` (pinned
    if a CPU feeds a GPU): the same seed gives the same numbers on a CPU and a GPU."""
    on = torch.device(generator.device if generator is not None else device)
    pin = on.type == "cpu" and torch.device(device).type == "cuda"
    return fn(shape, generator=generator, device=on, pin_memory=pin).to(device, non_blocking=True)


def vfm_loss(model, idx, E, y, t=None, noise=None, generator=None, per_image=False, t_eps=1e-3,
             z_loss=1e-5, chunk=None):
    """The Purrception loss for tokens idx (B, h, w) with labels y (B,) and codebook E (K, d);
    t (B,) and noise z0 (B, h, w, d) are drawn from `generator` unless given. per_image=True: the
    loss (B,) and token accuracy (B,) of each image. chunk: read the logits that many at a time."""
    B = idx.shape[0]
    if t is None:
        t = t_eps + (1 - t_eps) * rand_from(torch.rand, (B,), generator, idx.device)   # (B,)
    z1 = E[idx]                                                                     # (B, h, w, d)
    z0 = rand_from(torch.randn, z1.shape, generator, idx.device) if noise is None else noise
    tb = t.view(B, 1, 1, 1)
    zt = tb * z1 + (1 - tb) * z0                                                    # (B, h, w, d)
    if chunk:                                              # "at K = 16384" below
        mean, loss, hit = chunked_loss(model, zt, t, y, idx, len(E), z_loss, chunk)
    else:
        logits = model(zt, t, y).float()                                            # (B, h, w, K)
        lse = torch.logsumexp(logits, dim=-1)                                       # (B, h, w)
        loss = lse - logits.gather(-1, idx[..., None])[..., 0] + z_loss * lse ** 2  # CE + z-loss
        mean, hit = loss.mean(), logits.argmax(dim=-1) == idx
    if per_image:
        return loss.reshape(B, -1).mean(dim=1), hit.reshape(B, -1).float().mean(dim=1)
    return mean

# -----------------------------------------------------------------------------
# the sampler
#
# `steps` steps on a grid of times integrate dz/dt = v(z, t) from z ~ N(0, I) at t = 0 to t = 1:
#     pi = softmax(logits / tau)        posterior over the K codes per position (tau < 1 sharpens)
#     mu = pi @ E                       the posterior-mean embedding, (B, h, w, d)
#     v  = (mu - z) / (1 - t)           the marginal velocity, exact when pi is the true posterior
#     z  = z + dt * v                   Euler, the official sampler
# t = 1 is never evaluated: the last step has dt = 1 - t, so it lands exactly on mu. The final z is
# read out as its nearest code, ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2. The network may run under
# bf16 autocast; the geometry (pi, mu, the update, the readout) runs in fp32, since bf16 would read
# out other codes. Classifier-free guidance mixes logits before the temperature (the paper):
#     logits = uncond + s * (cond - uncond)    uncond: the null label's; one forward computes both
# Freezing mu over a step and solving the ODE exactly gives the Euler step, so Euler is DDIM, or
# DPM-Solver++(1), on the data prediction mu. solver='dpm++2m' (DPM-Solver++(2M), Lu et al. 2022)
# puts in mu's place its linear extrapolation in lambda = log(t / (1 - t)) from the step before, at
# no extra network call:
#     D = mu + (mu - mu_prev) / (2 r),     r = (lambda_t - lambda_prev) / (lambda_next - lambda_t)
# first order where a lambda is infinite (the steps from and after t = 0, the one landing on 1).
# The grid is uniform, or denser near the data for time_shift s < 1: t' = t / (s - (s - 1) t) (the
# SD3/SiT shift in this time convention). Guidance may run only for t in cfg_interval
# (Kynkaanniemi et al. 2024), skipping the unconditional pass elsewhere. Network calls (NFE): one
# per step, a guided call running the conditional and the unconditional rows as one batch.


def time_grid(steps, time_shift=1.0, device=None):
    """The steps + 1 times from 0 to 1 the sampler visits: uniform, or shifted towards t = 1."""
    ts = torch.linspace(0, 1, steps + 1, device=device)
    return ts if time_shift == 1 else ts / (time_shift - (time_shift - 1) * ts)


def data_prediction(mu, mu_prev, ts, i, solver="euler"):
    """What step i (ts[i] -> ts[i + 1]) moves towards: mu, or for dpm++2m its extrapolation."""
    if solver == "euler" or i == 0 or i == len(ts) - 2:
        return mu
    lam = lambda u: torch.log(u / (1 - u))
    r = (lam(ts[i]) - lam(ts[i - 1])) / (lam(ts[i + 1]) - lam(ts[i]))
    return mu + (mu - mu_prev) / (2 * r)


def guided(model, x, t, y, cfg_scale=1.0, null_label=None, head_input=False):
    """The network's output (fp32) at x (B, ...) for labels y (B,) at time t (a scalar tensor), with
    classifier-free guidance towards y and away from null_label: uncond + s * (cond - uncond); s = 1
    skips the null pass. head_input=True: the head's (input, W, b), guidance mixing the input."""
    if cfg_scale != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs null_label, the dropped-class label")
    if cfg_scale != 1.0:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_label)])
    out = model(x, t.expand(len(y)), y, **({"head_input": True} if head_input else {}))
    out, head = (out[0], out[1:]) if head_input else (out, ())
    if cfg_scale != 1.0:
        cond, uncond = out.float().chunk(2)
        out = uncond + cfg_scale * (cond - uncond)
    return (out, *head) if head_input else out.float()


@torch.no_grad()
def sample_ode(model, E, y, grid, steps, temperature=1.0, cfg_scale=1.0, null_label=None,
               generator=None, return_trajectory=False, noise=None, chunk=None, solver="euler",
               time_shift=1.0, cfg_interval=(0.0, 1.0)):
    """Labels y (B,) -> code indices (B, h, w), grid (h, w) or an int side, from noise (B, h, w, d)
    (drawn from `generator` when None) in `steps` network calls; chunk: as vfm_loss. With
    return_trajectory, also per step (cpu): t, z and mu (steps, B, h, w, d), the entropy of pi."""
    (h, w), E = (grid, grid) if isinstance(grid, int) else grid, E.float()
    shape = (len(y), h, w, E.shape[1])
    z = (rand_from(torch.randn, shape, generator, E.device) if noise is None
         else noise.to(E.device, torch.float32))                                    # (B, h, w, d)
    ts = time_grid(steps, time_shift, E.device)
    guide = [cfg_interval[0] <= u <= cfg_interval[1] for u in time_grid(steps, time_shift).tolist()]
    path, mu_prev = [], None                           # (t, z, mu, entropy) per step, when asked
    for i in range(steps):
        t, dt, s = ts[i], ts[i + 1] - ts[i], cfg_scale if guide[i] else 1.0
        if chunk:                                      # "at K = 16384" below
            mu, entropy = chunked_posterior_mean(model, z, t, y, E, temperature, s, null_label,
                                                 chunk, return_trajectory)
        else:
            logits = guided(model, z, t, y, s, null_label)                         # (B, h, w, K)
            with torch.autocast(E.device.type, enabled=False):                      # fp32 geometry
                pi = torch.softmax(logits / temperature, dim=-1)                    # (B, h, w, K)
                mu = pi @ E                                                         # (B, h, w, d)
            entropy = torch.special.entr(pi).sum(-1) if return_trajectory else None
        if return_trajectory:
            path.append([v.cpu() for v in (t, z, mu, entropy)])
        z = z + dt * (data_prediction(mu, mu_prev, ts, i, solver) - z) / (1 - t)
        mu_prev = mu
    idx = nearest_code(z, E, chunk)                                                 # (B, h, w)
    if return_trajectory:
        return idx, dict(zip(("t", "z", "mu", "entropy"), map(torch.stack, zip(*path))))
    return idx

# -----------------------------------------------------------------------------
# at K = 16384: the same loss and posterior mean, `chunk` logits at a time
#
# On 32x32 grids of K = 16384 codes an image has 16.8M logits, so neither the loss nor the sampler
# may hold them in fp32 for a whole batch. Both read them a chunk at a time. A network may offer its
# head's input (`offers_head_input`): model(z, t, y, head_input=True) -> x (B, T, C), W (P*K, C),
# b (P*K,), the logits of sub-position s of patch n being x_n W_s^T + b_s; then the logits never
# exist all at once. With weights 1 - s and s that sum to one, guidance mixes x for the same logits.
# The loss makes its gradient in the same pass (CEZLoss), so nothing is held for the backward.


def logit_chunks(x, W, b, P, chunk):
    """Rows x (N, C) of a head W, b with P sub-positions (W=None: x are the logits (N, K)) ->
    yields (s, rows, x[rows], W_s, fp32 logits (n, K) at sub-position s), `chunk` logits each."""
    K = x.shape[1] if W is None else W.shape[0] // P
    n = max(1, chunk // K)
    for s in range(P):
        Ws, bs = (None, None) if W is None else (W[s * K:(s + 1) * K], b[s * K:(s + 1) * K])
        for i in range(0, x.shape[0], n):
            xi = x[i:i + n]
            logits = xi if W is None else torch.nn.functional.linear(xi, Ws, bs)
            yield s, slice(i, i + n), xi, Ws, logits.float()


class CEZLoss(torch.autograd.Function):
    """(x, W, b) as logit_chunks, targets (N, P) -> the mean loss, loss (N, P) and argmax (N, P);
    with grads, the gradients are made in the same pass, so nothing else is held for backward:
        loss = lse - logit[target] + z lse^2,    d loss / d logits = softmax (1 + 2 z lse) - onehot
    """

    @staticmethod
    def forward(ctx, x, W, b, targets, z_loss=1e-5, grads=True, chunk=2**22):
        loss, pred = torch.empty(targets.shape, device=x.device), torch.empty_like(targets)
        ctx.n, zeros = targets.numel(), lambda v: torch.zeros(v.shape, device=x.device)
        gx, gW, gb = [zeros(v) if grads and v is not None else None for v in (x, W, b)]
        # out += a @ b: under autocast in its dtype (bf16), else in place in fp32
        mm_ = ((lambda out, a, b: out.add_(a @ b)) if torch.is_autocast_enabled(x.device.type)
               else (lambda out, a, b: out.addmm_(a, b)))
        for s, rows, xi, Ws, logits in logit_chunks(x, W, b, targets.shape[1], chunk):
            ti = targets[rows, s, None]                                                  # (n, 1)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)                          # (n, 1)
            loss[rows, s] = (lse - logits.gather(1, ti) + z_loss * lse ** 2)[:, 0]
            pred[rows, s] = logits.argmax(dim=-1)
            if grads:             # in place of the logits, unless they are x itself        (n, K)
                g = (logits.sub_(lse) if W is not None else logits - lse).exp_()
                g.mul_(1 + 2 * z_loss * lse).scatter_add_(1, ti, torch.full_like(lse, -1.0))
                if W is None:
                    gx[rows] = g
                    continue
                K = Ws.shape[0]
                mm_(gx[rows], g, Ws)                                                     # (n, C)
                mm_(gW[s * K:(s + 1) * K], g.T, xi.float())                              # (K, C)
                gb[s * K:(s + 1) * K] += g.sum(0)
        ctx.grads = [g if g is None else g.to(v.dtype) for g, v in zip((gx, gW, gb), (x, W, b))]
        ctx.mark_non_differentiable(loss, pred)
        return loss.mean(), loss, pred

    @staticmethod
    def backward(ctx, grad_mean, grad_loss, grad_pred):
        grads, ctx.grads = ctx.grads, None        # autograd keeps them as .grad: no copy
        return (*[g if g is None else g.mul_(grad_mean / ctx.n) for g in grads], *[None] * 4)


def chunked_loss(model, zt, t, y, idx, K, z_loss, chunk):
    """vfm_loss's loss at zt for tokens idx (B, h, w) -> the mean, and the loss and hits of every
    position (B, h*w, in the head's order)."""
    if getattr(getattr(model, "module", model), "offers_head_input", False):     # DDP: .module
        x, W, b = model(zt, t, y, head_input=True)                 # (B, T, C), (P*K, C), (P*K,)
        p = round((W.shape[0] // K) ** 0.5)
        targets = patchify(idx[..., None], p)[..., 0].flatten(0, 1)                 # (B*T, p*p)
    else:                                                     # (B*h*w, K) logits, (B*h*w, 1)
        x, W, b, targets = model(zt, t, y), None, None, idx.reshape(-1, 1)
    mean, loss, pred = CEZLoss.apply(x.flatten(0, -2), W, b, targets, z_loss,
                                     torch.is_grad_enabled(), chunk)
    return mean, loss.view(len(idx), -1), (pred == targets).view(len(idx), -1)


def chunked_posterior_mean(model, z, t, y, E, temperature, cfg_scale, null_label, chunk,
                           entropy=False):
    """sample_ode's mu = softmax(guided logits / tau) @ E at z (B, h, w, d) -> mu (B, h, w, d)
    and, when asked, the entropy of pi (B, h, w) (else None)."""
    (B, h, w, d), K = z.shape, len(E)
    head = getattr(getattr(model, "module", model), "offers_head_input", False)
    out = guided(model, z, t, y, cfg_scale, null_label, head)       # (B, T, C) or (B, h, w, K)
    x, W, b = out if head else (out, None, None)
    P = W.shape[0] // K if head else 1
    mu_H = E.new_zeros(B * h * w // P, P, d + 1)    # mu and the entropy of pi, per sub-position
    for s, rows, _, _, logits in logit_chunks(x.flatten(0, -2), W, b, P, chunk):
        with torch.autocast(E.device.type, enabled=False):                          # fp32 geometry
            pi = torch.softmax(logits / temperature, dim=-1)                        # (n, K)
            mu_H[rows, s, :d] = pi @ E                                              # (n, d)
            if entropy:
                mu_H[rows, s, d] = torch.special.entr(pi).sum(-1)
    mu_H = unpatchify(mu_H.view(B, -1, P, d + 1), round(P ** 0.5), h, w)       # (B, h, w, d + 1)
    return mu_H[..., :d], mu_H[..., d] if entropy else None

# -----------------------------------------------------------------------------
# data: uint16 token memmaps made by prepare_data.py, read nanoGPT-style


def get_batch(split, data_dir, batch_size, grid, d, generator, noise="normal", pin=False,
              t_eps=1e-3):
    """batch_size random whole images of split and their training step's random numbers, all from
    `generator`, in this order: tokens (B, h, w) and labels (B,), int64; label-drop draws u (B,);
    t (B,) ~ U(t_eps, 1); the loss's noise, 'normal' (B, h, w, d) or 'uniform' (B, h, w). On the
    CPU (pinned if pin). Image j's numbers depend on j, not on how the batch is cut."""
    h, w = grid
    # a fresh memmap per batch: one kept open grows the resident memory as it is read
    tokens = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16,
                       mode="r").reshape(-1, h * w)
    labels = np.memmap(os.path.join(data_dir, f"{split}_labels.bin"), dtype=np.uint16, mode="r")
    ix = torch.randint(len(labels), (batch_size,), generator=generator).numpy()   # whole images
    # int64 first: uint16 has no torch counterpart
    idx = torch.from_numpy(tokens[ix].astype(np.int64)).view(batch_size, h, w)
    y = torch.from_numpy(labels[ix].astype(np.int64))
    on = dict(generator=generator, pin_memory=pin)
    u, t = torch.rand(batch_size, **on), torch.rand(batch_size, **on).mul_(1 - t_eps).add_(t_eps)
    shape = (batch_size, h, w, d) if noise == "normal" else (batch_size, h, w)
    z = (torch.randn if noise == "normal" else torch.rand)(shape, **on)
    if pin:
        idx, y = idx.pin_memory(), y.pin_memory()
    return idx, y, u, t, z

# -----------------------------------------------------------------------------
# training utilities: what the loop trains (an Objective), lr, EMA, eval and sample grids


@dataclass(frozen=True)
class Objective:
    """What the training loop needs of an objective: its network, loss and sampler. baselines.py
    defines the paper's baselines (CFM, CFM-endpoint, DFM) in this shape, so one loop trains all."""
    name: str
    build_model: object   # (K, d, **architecture) -> nn.Module, called as model(x, t, y)
    loss: object      # (model, idx, E, y, t=None, noise=None, generator=None, per_image=False)
    sample: object    # (model, E, y, grid, steps, temperature, cfg_scale, null_label, gen[, noise],
                      #  solver=, time_shift=, cfg_interval=) -> idx
    noise: str = "normal"   # the loss's noise: 'normal' N(0, I) (B, h, w, d), where the sampler
                            # starts too; 'uniform' (B, h, w): DFM's masks, no noise to start from
    tempered: bool = True   # a posterior that --temperature sharpens (not a regressed velocity)
    shows_posterior: bool = False   # sample(..., return_trajectory=True) gives its posterior path
    ode: bool = True        # its sampler integrates the ODE, so --solver and --time_shift apply


# The loop reads the logits CHUNK at a time: K = 16384 fits, and a small K takes one chunk.
CHUNK = 2**22
PURRCEPTION = Objective("purrception", lambda K, d, **arch: DiT(in_dim=d, out_dim=K, **arch),
                        partial(vfm_loss, chunk=CHUNK), partial(sample_ode, chunk=CHUNK),
                        shows_posterior=True)


def get_lr(it, lr, min_lr, warmup_iters, decay_iters):
    """Linear warmup to lr, then cosine to min_lr at decay_iters; decay_iters=0: constant."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if decay_iters <= warmup_iters:
        return lr
    ratio = min(1.0, (it - warmup_iters) / (decay_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * weights (DiT), two fused calls over all tensors."""
    ema_params, params = list(ema_model.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


@torch.no_grad()
def estimate_loss(model, E, data_dir, grid, batch_size, eval_iters, device, ctx,
                  objective=PURRCEPTION, micro_batch=None, n_bins=5):
    """Val loss of `model` over eval_iters batches of batch_size images, micro_batch at a time,
    also in n_bins bins of t; token accuracy for t >= 0.9, where the posterior should be nearly
    certain. A fixed seed: the same images, t and noise at every eval and for any micro_batch."""
    g, micro_batch = torch.Generator().manual_seed(1234), micro_batch or batch_size
    losses, accs, ts = [], [], []
    for _ in range(eval_iters):
        batch = get_batch("val", data_dir, batch_size, grid, E.shape[1], g, objective.noise)
        for i in range(0, batch_size, micro_batch):
            idx, y, _, t, noise = (v[i:i + micro_batch].to(device) for v in batch)
            with ctx:
                loss, acc = objective.loss(model, idx, E, y, t=t, noise=noise, per_image=True)
            losses.append(loss), accs.append(acc), ts.append(t)
    loss, acc, t = torch.cat(losses).cpu(), torch.cat(accs).cpu(), torch.cat(ts).cpu()
    bins = (t * n_bins).long().clamp(max=n_bins - 1)
    return {"val_loss": loss.mean().item(),
            "val_loss_by_t": [loss[bins == b].mean().item() for b in range(n_bins)],
            "val_acc_t09": acc[t >= 0.9].nanmean().item()}


def sample_grid(model, objective, E, tokenizer, grid, n_rows, n_cols, cfg, path, ctx):
    """A PNG of samples, one class per row, from noise fixed by cfg.seed: each eval's the same."""
    y = torch.arange(n_rows, device=E.device).repeat_interleave(n_cols)             # (rows*cols,)
    with ctx:
        idx = objective.sample(model, E, y, grid, cfg.sample_steps, cfg.temperature, cfg.cfg_scale,
                               model.num_classes, torch.Generator().manual_seed(cfg.seed),
                               solver=cfg.solver, time_shift=cfg.time_shift,
                               cfg_interval=cli.interval(cfg.cfg_interval))
    images = vq.to_uint8(tokenizer.decode(idx))                                     # (N, H, W, 3)
    # 64+ pixel cells
    canvas = Image.fromarray(vq.tile(images, n_cols, scale=max(2, 64 // images.shape[1])))
    cli.atomic_save(canvas.save, path)

# -----------------------------------------------------------------------------
# training: one flat loop in nanoGPT's order


def train(cfg, objective=PURRCEPTION):
    """Train with cfg -> the last eval's metrics and 'losses': [(iter, train loss)]. Bad input is a
    UserError before anything is written; so is a non-finite loss, before anything is saved."""
    cli.check_ranges(cfg, RANGES)
    cli.check_transformer(cfg.n_embd, cfg.n_head)
    if int(os.environ.get("RANK", 0)) == 0:
        print("config: " + " ".join(f"--{k}={v}" for k, v in asdict(cfg).items()))
    rank, local_rank, world, device = cli.setup_distributed(cfg.device)   # torchrun sets RANK
    ddp = world > 1 or "RANK" in os.environ
    batch_size, grad_accum = cli.split_batch(cfg.batch_size, cfg.grad_accum, world)
    master = rank == 0                       # the master process evaluates, logs and checkpoints
    device_type = device.split(":")[0]
    ctx = cli.autocast(device)               # bf16 for the network on CUDA, fp32 elsewhere
    pin = device_type == "cuda"              # CPU draws in pinned memory: their copies do not wait

    out_dir = cfg.out_dir or os.path.join(HERE, f"out-{cfg.dataset}")
    # one writer per out_dir, the master process, from here to the end
    with cli.one_writer(out_dir) if master else nullcontext():
        # the token folder, prepared on the spot when missing
        data_dir, meta, tokenizer = token_folder.open_for_training(cfg.dataset, cfg.data_dir, ddp,
                                                                   device)
        grid = (meta["grid_h"], meta["grid_w"])
        cli.check_transformer(cfg.n_embd, cfg.n_head, cfg.patch_size, grid[0])
        E = tokenizer.codebook.to(device)                       # (K, d), frozen
        cfg = replace(cfg, data_dir=data_dir, out_dir=out_dir)  # recorded in the checkpoint
        ckpt_path = os.path.join(out_dir, "ckpt.pt")

        # model, EMA copy and optimizer: fresh, or exactly as the checkpoint left them
        model_args = dict(K=meta["codebook_size"], d=meta["code_dim"], grid_size=grid[0],
                          patch_size=cfg.patch_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, num_classes=meta["num_classes"],
                          time_embed=cfg.time_embed)
        ckpt, start_iter = None, 0
        if cfg.init_from == "resume":
            ckpt = cli.load_resume(ckpt_path, cfg.max_iters, objective.name, meta, data_dir)
            model_args, start_iter = ckpt["model_args"], ckpt["iter"]      # the saved architecture
            cfg = cli.resumed_config(cfg, ckpt, ARCHITECTURE, PER_INVOCATION, master)
        elif os.path.exists(ckpt_path) and not cfg.overwrite:
            raise UserError(f"{ckpt_path} exists; continue it with --init_from=resume, or start "
                            f"over with --overwrite=true, or pick another --out_dir")
        torch.manual_seed(cfg.seed)              # the same initial weights on every process
        model = objective.build_model(**model_args).to(device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        # one parameter group, biases included (the LayerNorms have no weights to exempt)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      weight_decay=cfg.weight_decay, fused=device_type == "cuda")
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device_type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        raw_model = model                    # what gets saved: never the compiled or DDP wrapper
        if cfg.compile:
            model = torch.compile(model)
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
        flops_per_image = raw_model.flops_per_image()
        peak = cfg.peak_flops or cli.device_peak_flops(device)
        images_per_iter = batch_size * grad_accum * world
        if master:
            print(f"model ({objective.name}): {raw_model.num_params() / 1e6:.2f}M parameters, "
                  f"{raw_model.n_tokens} tokens per image, K={meta['codebook_size']} codes of "
                  f"d={meta['code_dim']}, {flops_per_image / 1e9:.2f} GFLOP per image")
            print(f"training on {device} ({world} process{'es' * (world > 1)}): {images_per_iter} "
                  f"images per iter = {batch_size} x {grad_accum} micro-steps x {world}, from iter "
                  f"{start_iter} to {cfg.max_iters}")

        metrics, losses = {}, []
        t0, timed_iters = time.time(), 0
        for it in range(start_iter, cfg.max_iters + 1):
            lr = get_lr(it, cfg.lr, cfg.min_lr, cfg.warmup_iters,
                        cfg.max_iters if cfg.decay_lr else 0)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # evaluate the EMA weights, draw a grid of samples, write the checkpoint: never before
            # the first step. Every process decides on the same numbers, so all stop together.
            if it > start_iter and (it % cfg.eval_interval == 0 or it == cfg.max_iters):
                params = [p for m in (raw_model, ema) for p in m.parameters()]
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    raise cli.diverged("the weights are not finite", it, ckpt_path, cfg.lr)
                if master:
                    # global batches, whatever the split: evals compare across runs
                    metrics = estimate_loss(ema, E, data_dir, grid, images_per_iter,
                                            cfg.eval_iters, device, ctx, objective, batch_size)
                    shown = lambda x, form: format(x, form) if math.isfinite(x) else "n/a"
                    print(f"eval iter {it}: val loss {metrics['val_loss']:.4f}, by t "  # n/a: no t
                          + " ".join(shown(x, ".3f") for x in metrics["val_loss_by_t"])
                          + f", token acc (t >= 0.9) {shown(metrics['val_acc_t09'], '.1%')}")
                val_loss = torch.tensor(metrics.get("val_loss", 0.0), device=device)
                if ddp:
                    dist.broadcast(val_loss, 0)
                if not math.isfinite(val_loss.item()):
                    raise cli.diverged(f"the val loss is {val_loss.item()}", it, ckpt_path, cfg.lr)
                if master:
                    png = os.path.join(out_dir, f"samples_{it:06d}.png")
                    os.makedirs(out_dir, exist_ok=True)
                    sample_grid(ema, objective, E, tokenizer, grid, min(meta["num_classes"], 10),
                                cfg.grid_cols, cfg, png, ctx)
                    print(f"samples: {png}")
                    rng = {"torch": torch.get_rng_state()}
                    if device_type == "cuda":
                        rng["cuda"] = torch.cuda.get_rng_state(device)
                    ckpt = {"model": raw_model.state_dict(), "ema": ema.state_dict(),
                            "optimizer": optimizer.state_dict(), "iter": it,
                            "objective": objective.name, "model_args": model_args,
                            "tokenizer_sha1": meta.get("tokenizer_sha1"),
                            "config": asdict(cfg), "metrics": metrics, "rng": rng}
                    cli.atomic_save(lambda tmp: torch.save(ckpt, tmp), ckpt_path)
                    cli.write_json(asdict(cfg), os.path.join(out_dir, "config.json"))
                    cli.stop_note = (f"{ckpt_path} (iter {it}) is kept; continue with "
                                     f"`{cli.same_command(init_from='resume')}`")
                t0, timed_iters = time.time(), 0     # the log's ms/iter leaves the eval out
            if it == cfg.max_iters:
                break

            # one optimizer step over grad_accum micro-steps per process. Every process draws the
            # whole global batch from one generator seeded by (seed, iter) (Python hashes tuples of
            # ints the same everywhere) and each micro-step takes its own slots of it.
            g = torch.Generator().manual_seed(hash((cfg.seed, it)))
            batch = get_batch("train", data_dir, images_per_iter, grid, E.shape[1], g,
                              objective.noise, pin)
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                first = (rank * grad_accum + micro) * batch_size
                idx, y, u, t, noise = (v[first:first + batch_size].to(device, non_blocking=True)
                                       for v in batch)
                y = torch.where(u < cfg.class_dropout, raw_model.num_classes, y)  # null class (CFG)
                if ddp:                      # all-reduce the gradients on the last micro-step only
                    model.require_backward_grad_sync = micro == grad_accum - 1
                with ctx:
                    loss = objective.loss(model, idx, E, y, t=t, noise=noise) / grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # EMA with TensorFlow's num_updates warmup, (1 + it) / (10 + it): forgets the init fast
            update_ema(ema, raw_model, min(cfg.ema_decay, (1 + it) / (10 + it)))
            timed_iters += 1
            if it == start_iter:                 # rates leave out the start-up (compile, CUDA init)
                t0, timed_iters = time.time(), 0

            # a GPU-sized run started on a CPU says what it would cost, once, after 3 timed iters
            left = cfg.max_iters - it - 1
            if device_type == "cpu" and master and it == start_iter + 3 and timed_iters == 3:
                cli.note_cpu_cost((time.time() - t0) / timed_iters, left)

            if it % cfg.log_interval == 0:
                # the mean over all processes (gloo has no AVG), so a non-finite loss on any one is
                # non-finite on all and every process stops here with the same line
                if ddp:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                loss_value = loss_sum.item()         # waits for the device: only on log iterations
                if not math.isfinite(loss_value):
                    raise cli.diverged(f"the loss is {loss_value}", it, ckpt_path, cfg.lr)
                if master:
                    line = f"iter {it}: loss {loss_value:.4f}, lr {lr:.2e}"
                    if timed_iters:
                        dt = (time.time() - t0) / timed_iters
                        line += f", {dt * 1000:.1f} ms/iter, {images_per_iter / dt:.0f} images/s"
                        if peak:
                            mfu = flops_per_image * images_per_iter / world / dt / peak
                            line += f", mfu {mfu:.1%}"
                        line += f", ETA {cli.format_seconds(dt * left)}"
                    print(line)
                    losses.append((it, loss_value))
                t0, timed_iters = time.time(), 0
        return {**metrics, "losses": losses}


def main(argv):
    train(cli.parse_args(argv, Config(), PRESETS, __doc__))


if __name__ == "__main__":
    cli.run(main)
