"""
baselines.py: the two objectives Purrception is measured against, on the same backbone, tokens and time grid.

    python purrception.py --dataset=cifar10 --objective=cfm    # continuous flow matching in the codebook's space
    python purrception.py --dataset=cifar10 --objective=dfm    # discrete flow matching from an all-mask grid

Each objective is a loss with the signature of purrception.vfm_loss and a sampler with that of
purrception.euler_sample, so the training loop, evals, checkpoints and sample.py treat all three alike. The
Transformer is the same DiT; only its ends change (see get_objective in purrception.py):

    objective     network input           output per position   loss                    sampler
    purrception   z_t (d channels)        K logits              CE + z-loss             Euler on (pi @ E - z) / (1 - t)
    cfm           z_t (d channels)        a velocity (d)        MSE to z1 - z0          Euler on v
    dfm           token ids, mask id K    K logits              CE + z-loss, masked     Euler jumps from all masks

Time runs as in purrception.py: t = 0 is the source (noise, or all masks), t = 1 is data.
"""

import torch
import torch.nn.functional as F

import purrception as pc    # shared: T_EPS, Z_LOSS, _draw, guided, nearest_code (used at call time, not import)

# -----------------------------------------------------------------------------
# CFM: continuous flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) in the codebook's space
#
# The same path as Purrception, zt = t * z1 + (1 - t) * z0 with z1 = E[idx] and z0 ~ N(0, I), but the network
# regresses the path's velocity directly instead of a posterior over codes:
#     loss = mean((v(zt, t, y) - (z1 - z0))^2)        over positions and the d channels
# The minimiser is the marginal velocity E[z1 - z0 | zt], the quantity Purrception writes as (pi @ E - zt)/(1 - t).
# At init the output is 0, so the loss is mean((z1 - z0)^2) = |e|^2 / d + 1 (codes of norm |e|, unit noise).


def cfm_loss(model, idx, E, y, t=None, generator=None, reduction="mean"):
    """CFM loss for tokens idx (B, h, w); reduction='none' gives per-image loss (B,) and the per-image accuracy
    of the one-step guess z1_hat = zt + (1 - t) v read out as the nearest code."""
    B = idx.shape[0]
    if t is None:
        t = pc.T_EPS + (1 - pc.T_EPS) * pc._draw(torch.rand, (B,), generator, idx.device)    # (B,)
    z1 = E[idx]                                                                        # (B, h, w, d)
    z0 = pc._draw(torch.randn, z1.shape, generator, idx.device)                        # (B, h, w, d)
    tb = t.view(B, 1, 1, 1)
    zt = tb * z1 + (1 - tb) * z0
    v = model(zt, t, y).float()                                                        # (B, h, w, d)
    loss = (v - (z1 - z0)).pow(2).view(B, -1).mean(dim=1)                              # (B,)
    if reduction == "none":
        z1_hat = zt + (1 - tb) * v
        return loss, (pc.nearest_code(z1_hat, E) == idx).float().view(B, -1).mean(dim=1)
    return loss.mean()


# Sampling: Euler on the learned velocity from z ~ N(0, I) at t = 0 to t = 1, then the nearest code. Guidance
# mixes velocities, v = v_uncond + s * (v_cond - v_uncond). There is no posterior, so no temperature.


@torch.no_grad()
def cfm_sample(model, E, y, steps, temperature=1.0, cfg_scale=1.0, generator=None, return_trajectory=False):
    """Labels y (B,) -> code indices (B, h, w), by Euler steps on the regressed velocity."""
    if temperature != 1.0 or return_trajectory:
        raise pc.UserError("CFM has no posterior: sample it at temperature 1, without --trajectory or --uncertainty")
    B, (K, d), side = y.shape[0], E.shape, model.grid_size
    z = pc._draw(torch.randn, (B, side, side, d), generator, E.device)                 # (B, h, w, d) at t = 0
    ts = torch.linspace(0, 1, steps + 1, device=E.device)
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        z = z + dt * pc.guided(model, z, t, y, cfg_scale)                              # v: (B, h, w, d)
    return pc.nearest_code(z, E)

# -----------------------------------------------------------------------------
# DFM: discrete flow matching with a mask source (Gat et al. 2024; Campbell et al. 2024)
#
# Tokens live on {0..K-1} plus a mask id K. The path keeps each clean token with probability t and masks it
# otherwise, independently per position, so xt is all masks at t = 0 and the data at t = 1:
#     xt = where(u < t, idx, K),    u ~ U(0, 1) per position
# The network reads xt (through its own embedding table) and predicts p1(c | xt), K logits per position; the loss
# is cross-entropy + z-loss on the masked positions, the only ones with anything to predict. Loss at init: log K.


def dfm_loss(model, idx, E, y, t=None, generator=None, reduction="mean"):
    """DFM loss for tokens idx (B, h, w). E is unused (the tokens are the data); it keeps the signature shared.
    reduction='none' gives per-image loss (B,) and per-image accuracy on the masked positions (nan if none)."""
    B, K = idx.shape[0], E.shape[0]
    if t is None:
        t = pc.T_EPS + (1 - pc.T_EPS) * pc._draw(torch.rand, (B,), generator, idx.device)    # (B,)
    masked = pc._draw(torch.rand, idx.shape, generator, idx.device) >= t.view(B, 1, 1)       # (B, h, w)
    xt = torch.where(masked, K, idx)                                                   # (B, h, w) in [0, K]
    logits = model(xt, t, y).float()                                                   # (B, h, w, K)
    ce = F.cross_entropy(logits.reshape(-1, K), idx.reshape(-1), reduction="none").view(B, -1)
    z_loss = pc.Z_LOSS * torch.logsumexp(logits, dim=-1).pow(2).view(B, -1)
    m = masked.view(B, -1).float()
    n = m.sum(dim=1)
    loss = ((ce + z_loss) * m).sum(dim=1) / n.clamp(min=1)                             # (B,): mean over masked
    if reduction == "none":
        correct = (logits.argmax(dim=-1) == idx).float().view(B, -1)
        return loss, (correct * m).sum(dim=1) / n                                      # nan where nothing masked
    return loss.mean()


# Sampling: the Euler jump rule. From t to t + h, a masked position unmasks with probability h / (1 - t) and
# takes a code drawn from p1 = softmax(logits / tau); unmasked positions keep their code. (This is the general
# rule p = onehot(x) + h * (p1 - onehot(x)) / (1 - t) with the exact posterior at unmasked positions, which is
# their own code.) The last step has h = 1 - t, so every position is unmasked at t = 1. Guidance mixes logits.


@torch.no_grad()
def dfm_sample(model, E, y, steps, temperature=1.0, cfg_scale=1.0, generator=None, return_trajectory=False):
    """Labels y (B,) -> code indices (B, h, w), by Euler jumps from an all-mask grid."""
    if return_trajectory:
        raise pc.UserError("DFM has no continuous trajectory to draw")
    B, K, side, device = y.shape[0], E.shape[0], model.grid_size, E.device
    x = torch.full((B, side, side), K, dtype=torch.long, device=device)                # all masks at t = 0
    ts = torch.linspace(0, 1, steps + 1, device=device)
    for i in range(steps):
        t, h = ts[i], ts[i + 1] - ts[i]
        logits = pc.guided(model, x, t, y, cfg_scale)                                  # (B, h, w, K)
        # a draw from softmax(logits / tau) by the Gumbel-max trick, and which masked positions jump now
        gumbel = -torch.log(-torch.log(pc._draw(torch.rand, logits.shape, generator, device).clamp(min=1e-20)))
        draw = (logits / temperature + gumbel).argmax(dim=-1)                          # (B, h, w)
        jump = (x == K) & (pc._draw(torch.rand, x.shape, generator, device) < h / (1 - t))
        x = torch.where(jump, draw, x)
    return x
