"""
purrception.py: class-conditional image generation by variational flow matching over VQ tokens, in one file.

Purrception (Matişan et al., "Purrception: Variational Flow Matching for Vector-Quantized Image Generation",
ICLR 2026, https://arxiv.org/abs/2510.01478) generates the codebook indices of a VQ tokenizer (vq.py) with a
continuous flow in the codebook's embedding space. A transformer reads a noisy point z_t and predicts, at every
latent position, a categorical posterior over the K codes; the velocity that carries z_t to the data is the
posterior-mean code minus z_t, divided by the time left. Training is plain cross-entropy.

    python purrception.py --dataset=shapes                      # CPU quick start: data to sample grid in ~5 min
    python purrception.py --dataset=cifar10                     # one GPU (DiT-B/2); torchrun for several
    python purrception.py --dataset=cifar10 --init_from=resume  # continue exactly where it stopped
    python purrception.py --dataset=cifar10 --objective=cfm     # a baseline of the paper (baselines.py): cfm, dfm

Time convention (the paper's code, flow_matching; the reverse of minRF): t = 0 is noise, t = 1 is data,
    z_t = t * z1 + (1 - t) * z0,   z1 = E[tokens],  z0 ~ N(0, I).

Notable choices:
- A DiT with adaLN-Zero whose output is K logits per latent position; zero-initialised so the first posterior
  is uniform (loss = log K at init). t enters the sinusoidal embedding in [0, 1], not scaled by 1000.
- Softmax, cross-entropy and logsumexp over K run in fp32; the network runs in bf16 on CUDA, fp32 elsewhere.
- Every random draw of a training step (images, dropped labels, t, noise) comes from a generator seeded by
  (seed, iter, micro-step). Resuming, or spreading the same global batch over more GPUs, replays the same run.
- EMA weights are what every eval, sample grid and sample.py see.
- Sampling is Euler on a uniform grid; the final point is read out as the nearest code, then decoded by vq.py.

CIFAR-10 on a CPU: an 8M-parameter model at 2.3 GFLOP per training image, so 1200 iters of 32 images cost ~90
TFLOP (about 40 minutes on one core of a busy machine); it learns class-dependent colours and layouts, not
objects. On a busy machine OMP_NUM_THREADS=1 can be several times faster than torch's default thread count.
    python purrception.py --dataset=cifar10 --device=cpu --n_layer=6 --n_head=4 --n_embd=256 --batch_size=32 \
        --lr=5e-4 --decay_lr=false --warmup_iters=100 --max_iters=1200 --ema_decay=0.998 --eval_interval=600 \
        --sample_steps=25
"""

import copy
import difflib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import vq

HERE = os.path.dirname(os.path.abspath(__file__))   # data/ and out-*/ live next to this file, whatever the CWD

# -----------------------------------------------------------------------------
# config: defaults here, a preset per dataset below, then --key=value flags on top (the last word wins)


@dataclass
class Config:
    # data
    dataset: str = "shapes"       # data/<dataset>/ as written by prepare_data.py (prepared for you when missing)
    data_dir: str = ""            # the token folder; '' means data/<dataset> next to this file
    # I/O
    out_dir: str = ""             # ckpt.pt, config.json and sample grids; '' means out-<dataset> next to this file
    init_from: str = "scratch"    # 'scratch' or 'resume' (from out_dir/ckpt.pt, exactly where it stopped)
    eval_interval: int = 2000     # iters between evals, checkpoints and sample grids
    eval_iters: int = 20          # val batches per eval
    log_interval: int = 50        # iters between log lines
    sample_steps: int = 50        # Euler steps for the eval grids (the paper: 100 for curves, 250 for its best FID)
    grid_cols: int = 8            # samples per class row in the eval grids
    # model: DiT-S/2 (33M parameters) unless a preset says otherwise
    patch_size: int = 2           # p: a 16x16 token grid becomes 8x8 = 64 transformer tokens
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 384
    objective: str = "purrception"  # or a baseline (baselines.py): 'cfm' regresses the velocity, 'dfm' unmasks tokens
    class_dropout: float = 0.1    # probability of training on the null class: what classifier-free guidance needs
    # optimizer: AdamW as in the paper's configs
    batch_size: int = 64          # images per micro-step and process
    grad_accum: int = 1           # micro-steps per iter summed over all processes (divided by the number of GPUs)
    max_iters: int = 100000       # optimizer steps
    lr: float = 1e-4              # the paper's constant learning rate for DiT-B/L/XL
    min_lr: float = 1e-5          # where the cosine ends (with decay_lr)
    warmup_iters: int = 1000      # linear warmup from ~0 to lr
    decay_lr: bool = False        # cosine decay to min_lr at max_iters; false keeps lr constant (the paper)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0        # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.9999     # EMA of the weights, used for every eval and sample
    # sampling (the eval grids; sample.py has its own flags)
    temperature: float = 1.0      # tau: 1 samples the trained posterior, ~0.9 gave the paper's best FID
    cfg_scale: float = 1.0        # classifier-free guidance s; 1 turns it off
    # system
    device: str = ""              # '' picks cuda, then mps, then cpu
    compile: bool = False         # torch.compile: faster steps on a GPU after about a minute of compiling
    seed: int = 0
    peak_flops: float = 0.0       # the device's peak FLOP/s for the MFU print; 0 looks up H100/H200/A100 bf16


# Per-dataset overrides of the defaults, like nanoGPT's config files.
PRESETS = {
    # 2 CPU cores: 16x16 shapes -> an 8x8 grid of K=64 codes, one transformer token per code (patch 1). A
    # 1.3M-parameter transformer draws every class recognisably by 1000 iters, cleaner edges by 2000; mild guidance.
    "shapes": dict(patch_size=1, n_layer=4, n_head=4, n_embd=128, batch_size=32, max_iters=2000, lr=3e-3,
                   warmup_iters=50, decay_lr=True, min_lr=1e-4, ema_decay=0.995, eval_interval=1000, eval_iters=5,
                   log_interval=100, sample_steps=25, cfg_scale=1.5),
    # One modern GPU: DiT-B/2 (133M) on the 16x16 grid (64 tokens). Training costs 34.6 GFLOP per image, so a
    # 256-image iter is 8.9 TFLOP: ~30 ms/iter and ~50 min per 100k iters on one H100/H200 at an assumed 30% MFU
    # (an estimate from FLOPs, not a measurement; the log line prints the real ms/iter and MFU).
    "cifar10": dict(n_layer=12, n_head=12, n_embd=768, batch_size=256, max_iters=100000, lr=1e-4,
                    warmup_iters=1000, eval_interval=5000, log_interval=100, sample_steps=100),
}


def _convert(key, text, typ):
    """The flag's text -> the field's type: --lr=1 is a float, --compile=false a bool, --max_iters=1e5 an int."""
    try:
        if typ is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        if typ is int and "." not in text and float(text).is_integer():
            return int(float(text))
        return typ(text)
    except (KeyError, ValueError):
        sys.exit(f"error: --{key} expects {typ.__name__}, got {text!r}")


def parse_args(argv, cfg, presets=None):
    """['--dataset=cifar10', '--lr=3e-4'] -> a copy of the dataclass cfg with the dataset's preset (if presets
    are given), then the flags, applied. A mistake exits with one line saying what to type instead."""
    types = {f.name: type(getattr(cfg, f.name)) for f in fields(cfg)}    # the default's type is the flag's type
    flags = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print("options (defaults, before presets):\n" + "\n".join(f"  --{k}={v}" for k, v in asdict(cfg).items()))
            sys.exit(0)
        key, eq, text = arg.removeprefix("--").partition("=")
        if key not in types:
            hint = difflib.get_close_matches(key, types, n=1)
            sys.exit(f"error: unknown option {arg.partition('=')[0]!r}"
                     + (f" (did you mean --{hint[0]}?)" if hint else "") + "; --help lists them all")
        if not arg.startswith("--") or not (eq or types[key] is bool):
            sys.exit(f"error: write options as --{key}=VALUE (got {arg!r})")
        flags[key] = _convert(key, text if eq else "true", types[key])            # a bare --compile means true
    preset = (presets or {}).get(flags.get("dataset", getattr(cfg, "dataset", None)), {})
    return replace(cfg, **{**preset, **flags})


class UserError(ValueError):
    """Bad input (a flag, a missing file): the command line prints its message as one line and exits."""

# -----------------------------------------------------------------------------
# the model: a DiT over the latent grid. A 32x32 image -> 16x16 codebook indices -> (patch 2) 8x8 = 64 tokens.
# In: z (B, h, w, d) points in code space, t (B,), labels y (B,). Out: logits (B, h, w, K) over the codebook.


def modulate(x, shift, scale):
    """adaLN: scale and shift the normalised tokens x (B, T, C) per image with (B, C) vectors from t and y."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (B,) -> (B, C): sinusoidal features, then a 2-layer MLP (DiT)."""

    def __init__(self, n_embd, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))

    def forward(self, t):
        # t stays in [0, 1] (DiT multiplies by 1000 instead), so the frequencies run geometrically from 1000 down
        # to 1 radian per unit of t: the fastest tells t = 0.001 from 0.002, the slowest is monotone over [0, 1].
        half = self.freq_dim // 2
        freqs = 1000.0 ** (1 - torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))   # (half,)
        args = t.float()[:, None] * freqs[None]                                                      # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))                       # (B, C)


class LabelEmbedder(nn.Module):
    """Labels (B,) -> (B, C). Index num_classes is the null class: classifier-free guidance's unconditional."""

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
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)                 # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                           # 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)                                    # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))                           # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward, 4x wide (DiT, the paper), tanh-GELU."""

    def __init__(self, n_embd):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning c sets each sublayer's shift, scale and gate."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(n_embd)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(n_embd, 6 * n_embd))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)   # 6 x (B, C)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.ln_1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.ln_2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map from each token to its patch's logits (p*p*K)."""

    def __init__(self, n_embd, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(n_embd, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(n_embd, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(n_embd, 2 * n_embd))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def sincos_pos_embed(n_embd, side):
    """Fixed 2-D sin-cos positions (side*side, C): half the channels encode the row, half the column (MAE, DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(n_embd // 4) / (n_embd // 4))                 # (C/4,)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = [f(pos.flatten()[:, None].float() * omega) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)                                                     # (side*side, C)


class Transformer(nn.Module):
    """The posterior network q(c | z_t, t, y): a DiT over patches of the latent grid, K logits per position.
    The baselines (baselines.py) reuse it: out_dim=d makes it a velocity field (CFM); in_vocab=K+1 makes it read
    token ids through a learned (K+1, d) table instead of embeddings (DFM, whose id K is the mask)."""

    def __init__(self, vocab_size, code_dim, grid_size, patch_size=2, n_layer=12, n_head=6, n_embd=384,
                 num_classes=10, out_dim=None, in_vocab=0):
        super().__init__()
        if grid_size % patch_size:
            raise UserError(f"patch_size={patch_size} does not divide the {grid_size}x{grid_size} token grid; "
                            f"pick a divisor such as --patch_size=2 or 1")
        if n_embd % n_head or n_embd % 4:
            raise UserError(f"n_embd={n_embd} must be a multiple of n_head={n_head} and of 4 (the 2-D positions)")
        self.vocab_size, self.code_dim, self.grid_size, self.patch_size = vocab_size, code_dim, grid_size, patch_size
        self.num_classes, self.n_embd = num_classes, n_embd
        self.n_tokens = (grid_size // patch_size) ** 2                                 # T
        self.out_dim = out_dim or vocab_size                                           # K logits (or d)
        self.tok_embed = nn.Embedding(in_vocab, code_dim) if in_vocab else None
        self.patch_embed = nn.Linear(patch_size * patch_size * code_dim, n_embd)
        self.register_buffer("pos_embed", sincos_pos_embed(n_embd, grid_size // patch_size), persistent=False)
        self.t_embedder = TimestepEmbedder(n_embd)
        self.y_embedder = LabelEmbedder(num_classes, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.final_layer = FinalLayer(n_embd, patch_size * patch_size * self.out_dim)
        self.initialize_weights()

    def initialize_weights(self):
        # every linear layer (the patch embedding included): Xavier-uniform weights and zero biases (ViT, DiT)
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
        # ... and the output starts at exactly 0: logits 0, a uniform posterior over the K codes, loss = log K
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, z, t, y):
        """z (B, h, w, d) noisy embeddings, t (B,) in [0, 1], y (B,) labels -> logits (B, h, w, K)."""
        if self.tok_embed is not None:
            z = self.tok_embed(z)                                                      # ids (B, h, w) -> (B, h, w, d)
        B, H, W, D = z.shape
        p, K = self.patch_size, self.out_dim
        x = z.reshape(B, H // p, p, W // p, p, D).permute(0, 1, 3, 2, 4, 5)            # (B, H/p, W/p, p, p, d)
        x = x.reshape(B, self.n_tokens, p * p * D)                                     # (B, T, p*p*d)
        x = self.patch_embed(x) + self.pos_embed                                       # (B, T, C)
        c = self.t_embedder(t) + self.y_embedder(y)                                    # (B, C)
        for block in self.blocks:
            x = block(x, c)                                                            # (B, T, C)
        x = self.final_layer(x, c)                                                     # (B, T, p*p*K)
        x = x.reshape(B, H // p, W // p, p, p, K).permute(0, 1, 3, 2, 4, 5)            # (B, H/p, p, W/p, p, K)
        return x.reshape(B, H, W, K)                                                   # (B, h, w, K)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self):
        """Training FLOPs (forward + backward) per image, nanoGPT-style: 6 per weight per token it touches, plus
        attention's 12*L*C*T^2. The conditioning weights (t MLP, adaLN) run once per image, not per token."""
        per_image = sum(p.numel() for n, p in self.named_parameters() if "adaLN" in n or "t_embedder" in n)
        lookups = [self.y_embedder.embedding] + ([self.tok_embed] if self.tok_embed is not None else [])
        per_token = self.num_params() - per_image - sum(m.weight.numel() for m in lookups)    # lookups are free
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
#     loss = CE(logits, idx) + 1e-5 * mean(logsumexp(logits)^2),   logits = net(zt, t, y)  (B, h, w, K)
# Why cross-entropy is enough (Variational Flow Matching, Eijkelboom et al. 2024): the velocity of the path,
# (z1 - zt) / (1 - t), is affine in z1, so the marginal velocity needs only the posterior mean of z1, position by
# position. A categorical q(c | zt) per position trained with CE matches each position's posterior over codes,
# and pi @ E is then that mean. The z-loss (PaLM) pins the logits' free offset so they cannot drift.

T_EPS = 1e-3     # smallest t trained on (the paper's code): at t = 0 the input carries no information
Z_LOSS = 1e-5    # weight of the z-loss (the paper's code)


def _draw(fn, shape, generator, device):
    """torch.rand or torch.randn from `generator` on its own device, then moved: a CPU generator can drive a GPU."""
    return fn(shape, generator=generator, device=generator.device if generator is not None else device).to(device)


def vfm_loss(model, idx, E, y, t=None, generator=None, reduction="mean"):
    """The Purrception loss for tokens idx (B, h, w) with labels y (B,). t (B,) is drawn unless given.
    reduction='none' returns per-image loss (B,) and per-image token accuracy (B,), for evals binned by t."""
    B = idx.shape[0]
    if t is None:
        t = T_EPS + (1 - T_EPS) * _draw(torch.rand, (B,), generator, idx.device)       # (B,)
    z1 = E[idx]                                                                        # (B, h, w, d)
    z0 = _draw(torch.randn, z1.shape, generator, idx.device)                           # (B, h, w, d)
    tb = t.view(B, 1, 1, 1)
    zt = tb * z1 + (1 - tb) * z0                                                       # (B, h, w, d)
    logits = model(zt, t, y).float()                                                   # (B, h, w, K) in fp32
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx.reshape(-1), reduction="none")   # (B*h*w,)
    z_loss = Z_LOSS * torch.logsumexp(logits, dim=-1).pow(2)                           # (B, h, w)
    loss = (ce.view(B, -1) + z_loss.view(B, -1)).mean(dim=1)                           # (B,)
    if reduction == "none":
        return loss, (logits.argmax(dim=-1) == idx).float().view(B, -1).mean(dim=1)
    return loss.mean()

# -----------------------------------------------------------------------------
# the Euler sampler
#
# Integrate dz/dt = v(z, t) from z ~ N(0, I) at t = 0 to t = 1 with `steps` Euler steps on a uniform grid:
#     pi = softmax(logits / tau)        the posterior over the K codes at each position; tau < 1 sharpens it
#     mu = pi @ E                       the posterior-mean embedding, (B, h, w, d)
#     v  = (mu - z) / (1 - t)           the marginal velocity, exact when pi is the true posterior
#     z  = z + dt * v
# t = 1 is never evaluated: the last step has dt = 1 - t, so it lands exactly on mu. The final z is read out as
# its nearest code. Classifier-free guidance mixes logits before the temperature (the paper):
#     logits = uncond + s * (cond - uncond)      uncond: the null class; one batched forward computes both.


def guided(model, x, t, y, cfg_scale):
    """The network's output (fp32) at x (B, ...) for labels y (B,) at time t (a scalar tensor), with classifier-free
    guidance: uncond + s * (cond - uncond), both halves from one batched forward; s = 1 skips the null pass."""
    B = y.shape[0]
    if cfg_scale == 1.0:
        return model(x, t.expand(B), y).float()
    null = torch.full_like(y, model.num_classes)
    cond, uncond = model(torch.cat([x, x]), t.expand(2 * B), torch.cat([y, null])).float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def nearest_code(z, E):
    """The readout: z (..., d) -> the index of its nearest row of E, by ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2."""
    return (z.pow(2).sum(-1, keepdim=True) - 2 * z @ E.T + E.pow(2).sum(-1)).argmin(dim=-1)


@torch.no_grad()
def euler_sample(model, E, y, steps, temperature=1.0, cfg_scale=1.0, generator=None, return_trajectory=False):
    """Labels y (B,) -> code indices (B, h, w) long. With return_trajectory, also a dict of cpu tensors, one row
    per step: t (steps,), z and mu (steps, B, h, w, d), entropy (steps, B, h, w) of the pi used at that step."""
    B, (K, d), side = y.shape[0], E.shape, model.grid_size
    z = _draw(torch.randn, (B, side, side, d), generator, E.device)                    # (B, h, w, d) at t = 0
    ts = torch.linspace(0, 1, steps + 1, device=E.device)
    trajectory = {"t": [], "z": [], "mu": [], "entropy": []}
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        logits = guided(model, z, t, y, cfg_scale)                                     # (B, h, w, K)
        pi = F.softmax(logits / temperature, dim=-1)                                   # (B, h, w, K)
        mu = pi @ E                                                                    # (B, h, w, d)
        if return_trajectory:
            for key, val in (("t", t), ("z", z), ("mu", mu), ("entropy", torch.special.entr(pi).sum(-1))):
                trajectory[key].append(val.cpu())
        z = z + dt * (mu - z) / (1 - t)
    idx = nearest_code(z, E)                                                           # (B, h, w)
    if return_trajectory:
        return idx, {key: torch.stack(val) for key, val in trajectory.items()}
    return idx


def get_objective(name, vocab_size, code_dim):
    """--objective -> (loss function, sampler, extra Transformer args). 'purrception' is this file's; 'cfm' and
    'dfm' are the baselines of the paper's comparison, in baselines.py, on the same backbone."""
    if name == "purrception":
        return vfm_loss, euler_sample, {}
    import baselines
    if name == "cfm":
        return baselines.cfm_loss, baselines.cfm_sample, {"out_dim": code_dim}
    if name == "dfm":
        return baselines.dfm_loss, baselines.dfm_sample, {"in_vocab": vocab_size + 1}
    raise UserError(f"--objective={name!r}: use purrception, cfm or dfm")

# -----------------------------------------------------------------------------
# data: uint16 token memmaps made by prepare_data.py, read nanoGPT-style


def data_path(dataset):
    return os.path.join(HERE, "data", dataset)


def is_prepared(data_dir):
    """True when data_dir holds tokens and a finished meta.json (prepare_data.py writes the grid size last)."""
    files = [os.path.join(data_dir, f) for f in ("meta.json", "train.bin", "val.bin")]
    if not all(map(os.path.exists, files)):
        return False
    with open(files[0]) as f:
        return "grid_h" in json.load(f)


def load_meta(data_dir):
    """meta.json of a token folder: K, d, grid, classes, counts, the tokenizer file."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"no meta.json in {data_dir}; run `python prepare_data.py --dataset=NAME` to make it")
    with open(path) as f:
        meta = json.load(f)
    if "grid_h" not in meta:
        raise UserError(f"{data_dir} is only half prepared; run `python prepare_data.py --dataset={meta['dataset']}`")
    return meta


def get_batch(split, data_dir, batch_size, grid, device, generator=None):
    """batch_size random whole images of split ('train' or 'val') -> tokens (B, h, w) and labels (B,), int64."""
    h, w = grid
    # We recreate np.memmap every batch to avoid a memory leak, as per
    # https://stackoverflow.com/questions/45132940/numpy-memmap-memory-usage-want-to-iterate-once/61472122#61472122
    tokens = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r").reshape(-1, h * w)
    labels = np.memmap(os.path.join(data_dir, f"{split}_labels.bin"), dtype=np.uint16, mode="r")
    ix = torch.randint(len(labels), (batch_size,), generator=generator).numpy()       # whole images, not offsets
    idx = torch.from_numpy(tokens[ix].astype(np.int64)).view(batch_size, h, w)        # int64 first: uint16 has no
    y = torch.from_numpy(labels[ix].astype(np.int64))                                  # torch counterpart
    if "cuda" in str(device):
        return idx.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return idx.to(device), y.to(device)

# -----------------------------------------------------------------------------
# training utilities


def get_lr(it, lr, min_lr, warmup_iters, decay_iters):
    """Linear warmup to lr, then cosine decay to min_lr at decay_iters; decay_iters=0 keeps lr constant."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if decay_iters <= warmup_iters:
        return lr
    ratio = min(1.0, (it - warmup_iters) / (decay_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * weights, parameter by parameter (DiT)."""
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)


@torch.no_grad()
def estimate_loss(model, E, data_dir, grid, batch_size, eval_iters, device, ctx, n_bins=5, loss_fn=vfm_loss):
    """Val loss of `model` over eval_iters batches; the loss in n_bins equal bins of t (how hard each stretch of
    the path is); and token accuracy for t >= 0.9, where the posterior should be nearly certain (loss_fn: the
    objective's loss, which also says what its accuracy counts).
    The batches, t and noise are the same at every eval (a fixed seed), so evals compare like with like."""
    g = torch.Generator().manual_seed(1234)
    losses, accs, ts = [], [], []
    for _ in range(eval_iters):
        idx, y = get_batch("val", data_dir, batch_size, grid, device, g)
        t = T_EPS + (1 - T_EPS) * _draw(torch.rand, (batch_size,), g, device)
        with ctx:
            loss, acc = loss_fn(model, idx, E, y, t=t, generator=g, reduction="none")
        losses.append(loss), accs.append(acc), ts.append(t)
    loss, acc, t = torch.cat(losses).cpu(), torch.cat(accs).cpu(), torch.cat(ts).cpu()
    bins = (t * n_bins).long().clamp(max=n_bins - 1)
    return {"val_loss": loss.mean().item(),
            "val_loss_by_t": [loss[bins == b].mean().item() for b in range(n_bins)],
            "val_acc_t09": acc[t >= 0.9].nanmean().item()}


def tile(images, ncol, pad=2, scale=1):
    """uint8 images (N, H, W, 3) -> one uint8 image with ncol of them a row, on a white background; scale > 1
    enlarges each pixel into a scale x scale block (32x32 images are small on a screen)."""
    images = np.asarray(images).repeat(scale, axis=1).repeat(scale, axis=2)
    N, H, W, C = images.shape
    canvas = np.full((pad + math.ceil(N / ncol) * (H + pad), pad + ncol * (W + pad), C), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[pad + r * (H + pad):(r + 1) * (H + pad), pad + c * (W + pad):(c + 1) * (W + pad)] = image
    return canvas


def sample_grid(model, E, tokenizer, n_rows, n_cols, steps, temperature, cfg_scale, path, ctx, seed=0,
                sample_fn=euler_sample):
    """Write a PNG of samples from `model`, one class per row. The noise is fixed by seed, so the grids of
    successive evals show the same samples improving."""
    y = torch.arange(n_rows, device=E.device).repeat_interleave(n_cols)                # (rows*cols,)
    with ctx:
        idx = sample_fn(model, E, y, steps, temperature, cfg_scale, torch.Generator().manual_seed(seed))
    images = vq.to_uint8(tokenizer.decode(idx))                                        # (N, H, W, 3)
    Image.fromarray(tile(images, n_cols, scale=max(2, 64 // images.shape[1]))).save(path)   # 64+ pixel cells


def save_checkpoint(ckpt, path):
    """Atomic: write a temp file, then rename, so an interrupted save never leaves a broken ckpt.pt."""
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_model(ckpt_path, device="cpu"):
    """A checkpoint -> (Transformer with its EMA weights, in eval mode, on device; the checkpoint dict; the
    sampler of the objective it was trained with)."""
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}; train one with `python purrception.py --dataset=NAME`")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = Transformer(**ckpt["model_args"])
    model.load_state_dict(ckpt["ema"])
    sample_fn = get_objective(ckpt["config"].get("objective", "purrception"), model.vocab_size, model.code_dim)[1]
    return model.to(device).eval(), ckpt, sample_fn


# dense bf16 tensor-core peaks from the datasheets (SXM parts), for the MFU print
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops(device):
    if "cuda" not in str(device):
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), 0.0)

# -----------------------------------------------------------------------------
# training: one flat loop in nanoGPT's order


def train(cfg):
    """Train with cfg; returns the last eval's metrics, with 'losses': [(iter, train loss)] of each log line."""
    # DDP only under torchrun (it sets RANK); a single GPU or CPU needs no launcher
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        from torch.distributed import destroy_process_group, init_process_group
        from torch.nn.parallel import DistributedDataParallel as DDP
        backend = "nccl" if torch.cuda.is_available() and cfg.device in ("", "cuda") else "gloo"
        init_process_group(backend=backend)
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
        if backend == "nccl":
            torch.cuda.set_device(device)
        if cfg.grad_accum % world:
            raise UserError(f"grad_accum={cfg.grad_accum} must be a multiple of the {world} processes: it counts "
                            f"micro-steps over all of them (try --grad_accum={world})")
        grad_accum = cfg.grad_accum // world
    else:
        rank, world, grad_accum = 0, 1, cfg.grad_accum
        device = cfg.device or ("cuda" if torch.cuda.is_available() else
                                "mps" if torch.backends.mps.is_available() else "cpu")
    master = rank == 0                       # the master process evaluates, logs and checkpoints
    device_type = "cuda" if "cuda" in device else "mps" if "mps" in device else "cpu"
    torch.manual_seed(cfg.seed)              # the same initial weights on every process
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # bf16 autocast on CUDA (no fp16: no GradScaler needed); fp32 on cpu and mps
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()

    # data and tokenizer; prepared on the spot when missing (by a single process only)
    data_dir = cfg.data_dir or data_path(cfg.dataset)
    if not is_prepared(data_dir):
        import prepare_data
        if cfg.data_dir or ddp or cfg.dataset not in prepare_data.DATASETS or cfg.dataset == "imagefolder":
            raise UserError(f"no prepared tokens in {data_dir}; run `python prepare_data.py --dataset={cfg.dataset}`"
                            + (" once before torchrun" if ddp else ""))
        print(f"no prepared data in {data_dir}: preparing it now (prepare_data.prepare('{cfg.dataset}'))")
        try:
            prepare_data.prepare(cfg.dataset)
        except prepare_data.DataError as e:
            raise UserError(str(e)) from None
    meta = load_meta(data_dir)
    grid = (meta["grid_h"], meta["grid_w"])
    if grid[0] != grid[1]:
        raise UserError(f"the token grid {grid} is not square; prepare square images (prepare_data crops them)")
    tokenizer = vq.load_vq(os.path.join(data_dir, meta["tokenizer"]), device)
    loss_fn, sample_fn, objective_args = get_objective(cfg.objective, meta["codebook_size"], meta["code_dim"])
    E = tokenizer.codebook.to(device)                                                  # (K, d), frozen
    out_dir = cfg.out_dir or os.path.join(HERE, f"out-{cfg.dataset}")
    cfg = replace(cfg, data_dir=data_dir, out_dir=out_dir)                             # recorded in the checkpoint
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    # model, EMA copy and optimizer: fresh, or exactly as the checkpoint left them
    model_args = dict(vocab_size=meta["codebook_size"], code_dim=meta["code_dim"], grid_size=grid[0],
                      patch_size=cfg.patch_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                      num_classes=meta["num_classes"], **objective_args)
    ckpt = None
    if cfg.init_from == "resume":
        if not os.path.exists(ckpt_path):
            raise UserError(f"--init_from=resume, but there is no {ckpt_path}; drop the flag to start from scratch")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model_args = ckpt["model_args"]                                                # the saved architecture
        if ckpt["config"].get("objective", "purrception") != cfg.objective:
            raise UserError(f"{ckpt_path} was trained with --objective={ckpt['config']['objective']}; "
                            f"resume it with that flag, or pick another --out_dir")
    elif cfg.init_from != "scratch":
        raise UserError(f"--init_from={cfg.init_from!r}: use 'scratch' or 'resume'")
    model = Transformer(**model_args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # one parameter group: with lr 1e-4, decaying norms and biases too changes nothing measurable
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=device_type == "cuda")
    start_iter = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter = ckpt["iter"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device_type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    raw_model = model                        # what gets saved: never the compiled or DDP wrapper
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    flops_per_image = raw_model.flops_per_image()
    peak = cfg.peak_flops or device_peak_flops(device)
    images_per_iter = cfg.batch_size * grad_accum * world
    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {raw_model.n_tokens} tokens per image, "
              f"K={meta['codebook_size']} codes of d={meta['code_dim']}, {flops_per_image / 1e9:.2f} GFLOP per image")
        print(f"training on {device} ({world} process{'es' * (world > 1)}): {images_per_iter} images per iter "
              f"= {cfg.batch_size} x {grad_accum} micro-steps x {world}, from iter {start_iter} to {cfg.max_iters}")

    metrics, losses = {}, []
    t0, timed_iters = time.time(), 0
    for it in range(start_iter, cfg.max_iters + 1):
        lr = get_lr(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters if cfg.decay_lr else 0)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # evaluate the EMA weights, draw a grid of samples, write the checkpoint
        if master and (it % cfg.eval_interval == 0 or it == cfg.max_iters):
            metrics = estimate_loss(ema, E, data_dir, grid, cfg.batch_size, cfg.eval_iters, device, ctx,
                                    loss_fn=loss_fn)
            print(f"eval iter {it}: val loss {metrics['val_loss']:.4f}, by t "
                  + " ".join(f"{x:.3f}" for x in metrics["val_loss_by_t"])
                  + f", token acc (t >= 0.9) {metrics['val_acc_t09']:.1%}")
            if it > 0:                           # at iter 0 every sample would be the codebook mean
                png = os.path.join(out_dir, f"samples_{it:06d}.png")
                sample_grid(ema, E, tokenizer, min(meta["num_classes"], 10), cfg.grid_cols, cfg.sample_steps,
                            cfg.temperature, cfg.cfg_scale, png, ctx, seed=cfg.seed, sample_fn=sample_fn)
                print(f"samples: {png}")
            rng = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)}
                                                      if device_type == "cuda" else {})}
            save_checkpoint({"model": raw_model.state_dict(), "ema": ema.state_dict(),
                             "optimizer": optimizer.state_dict(), "iter": it, "model_args": model_args,
                             "config": asdict(cfg), "metrics": metrics, "rng": rng}, ckpt_path)
            t0, timed_iters = time.time(), 0     # the log's ms/iter leaves the eval out
        if it == cfg.max_iters:
            break

        # one optimizer step over grad_accum micro-batches per process. Each micro-step draws its images, dropped
        # labels, t and noise from a generator seeded by (seed, iter, global micro-step index): the same numbers
        # whatever the number of processes, and after a resume. (Python hashes tuples of ints the same everywhere.)
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            g = torch.Generator().manual_seed(hash((cfg.seed, it, rank * grad_accum + micro)))
            idx, y = get_batch("train", data_dir, cfg.batch_size, grid, device, g)
            drop = _draw(torch.rand, y.shape, g, device) < cfg.class_dropout
            y = torch.where(drop, raw_model.num_classes, y)                            # null class, for CFG
            if ddp:                              # all-reduce the gradients on the last micro-step only
                model.require_backward_grad_sync = micro == grad_accum - 1
            with ctx:
                loss = loss_fn(model, idx, E, y, generator=g) / grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # EMA with a warmup ((1 + it) / (10 + it), as in TensorFlow's num_updates): early EMAs forget the init fast
        update_ema(ema, raw_model, min(cfg.ema_decay, (1 + it) / (10 + it)))
        timed_iters += 1

        if master and it % cfg.log_interval == 0:
            loss_value = loss_sum.item()         # waits for the device: only on log iterations
            dt = (time.time() - t0) / timed_iters
            t0, timed_iters = time.time(), 0
            mfu = f", mfu {flops_per_image * images_per_iter / world / dt / peak:.1%}" if peak else ""
            print(f"iter {it}: loss {loss_value:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                  f"{images_per_iter / dt:.0f} images/s{mfu}")
            losses.append((it, loss_value))
    if ddp:
        destroy_process_group()
    return {**metrics, "losses": losses}


if __name__ == "__main__":
    cfg = parse_args(sys.argv[1:], Config(), PRESETS)
    if int(os.environ.get("RANK", 0)) == 0:
        print("config: " + " ".join(f"--{k}={v}" for k, v in asdict(cfg).items()))
    try:
        train(cfg)
    except (UserError, FileNotFoundError) as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
