"""
baselines.py: the objectives Purrception is measured against, as the paper's official code defines
them, on the same backbone, tokens, time grid and training loop (purrception.train).

    python baselines.py --dataset=cifar10 --objective=cfm           # flow matching: regress z1 - z0
    python baselines.py --dataset=cifar10 --objective=cfm_endpoint  # regress z1
    python baselines.py --dataset=cifar10 --objective=dfm           # discrete FM from all masks

Every flag of purrception.py works here too. The checkpoint records its objective and sample.py
follows it.

    objective     network input      output      loss                sampler: Euler on
    purrception   z_t (d channels)   K logits    CE + z-loss         (pi @ E - z)/(1 - t)
    cfm           z_t (d channels)   v (d)       MSE to z1 - z0      v
    cfm_endpoint  z_t (d channels)   z1_hat (d)  MSE to z1           (z1_hat - z)/(1 - t)
    dfm           token ids, mask    K+1 logits  CE + z-loss, over   jumps: every position drawn
                  id K, read through             all positions and   from delta_x + dt (p1 -
                  a (K+1, C) table               K+1 ids             delta_x)/(1 - t)

Outputs are per latent position. Time runs as in purrception.py: t = 0 is the source (noise, or all
masks), t = 1 is data.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import purrception as pc
from cli import UserError
from purrception import DiT, Objective, data_prediction, guided, rand_from, time_grid
from vq import nearest_code


def draw_t(B, generator, device, t_eps=1e-3):
    """t ~ U(t_eps, 1) per image."""
    return t_eps + (1 - t_eps) * rand_from(torch.rand, (B,), generator, device)

# -----------------------------------------------------------------------------
# CFM: continuous flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) in the
# codebook's space
#
# The same path as Purrception, zt = t * z1 + (1 - t) * z0 with z1 = E[idx] and z0 ~ N(0, I), but
# the network regresses a point in code space instead of a posterior over codes:
#     cfm:           loss = mean((v(zt, t, y) - (z1 - z0))^2)  the velocity; v = the output
#     cfm_endpoint:  loss = mean((x1(zt, t, y) - z1)^2)        the endpoint; v = (x1 - zt) / (1 - t)
# over positions and the d channels. The minimisers are E[z1 - z0 | zt] and E[z1 | zt]: the same
# marginal velocity Purrception writes as (pi @ E - zt) / (1 - t), estimated by regression. At init
# the output is 0, so the cfm loss is mean((z1 - z0)^2) = |e|^2 / d + 1 (codes of norm |e|, unit
# noise) and the endpoint loss |e|^2 / d.


def cfm_loss(model, idx, E, y, t=None, noise=None, generator=None, per_image=False,
             endpoint=False):
    """CFM loss for tokens idx (B, h, w) (endpoint=True: CFM-endpoint), t and Gaussian noise z0
    drawn from `generator` unless given; per_image=True gives per-image loss (B,) and the
    per-image accuracy of the one-step guess of z1, read out as the nearest code."""
    B = idx.shape[0]
    t = draw_t(B, generator, idx.device) if t is None else t                        # (B,)
    z1 = E[idx]                                                                     # (B, h, w, d)
    z0 = rand_from(torch.randn, z1.shape, generator, idx.device) if noise is None else noise
    tb = t.view(B, 1, 1, 1)
    zt = tb * z1 + (1 - tb) * z0
    out = model(zt, t, y).float()                                                   # (B, h, w, d)
    loss = (out - (z1 if endpoint else z1 - z0)).pow(2).view(B, -1).mean(dim=1)     # (B,)
    if per_image:
        z1_hat = out if endpoint else zt + (1 - tb) * out
        return loss, (nearest_code(z1_hat, E, pc.CHUNK) == idx).float().view(B, -1).mean(dim=1)
    return loss.mean()


def cfm_endpoint_loss(model, idx, E, y, t=None, noise=None, generator=None, per_image=False):
    return cfm_loss(model, idx, E, y, t, noise, generator, per_image, endpoint=True)


# Sampling: Euler from z ~ N(0, I) at t = 0 to t = 1 on the same grid as sample_ode, then the
# nearest code. Guidance mixes the outputs, out_uncond + s * (out_cond - out_uncond). There is no
# posterior, so no temperature.


@torch.no_grad()
def cfm_sample(model, E, y, grid, steps, temperature=1.0, cfg_scale=1.0, null_label=None,
               generator=None, endpoint=False, noise=None, solver="euler", time_shift=1.0,
               cfg_interval=(0.0, 1.0)):
    """Labels y (B,) -> code indices (B, h, w), by steps on the regressed velocity (or endpoint),
    from noise (B, h, w, d) (drawn from `generator` when None); solver, time_shift and
    cfg_interval as sample_ode's, on the data prediction z + (1 - t) v (or the endpoint)."""
    if temperature != 1.0:
        raise ValueError("CFM has no posterior to sharpen: sample it at temperature 1")
    (h, w), E = (grid, grid) if isinstance(grid, int) else grid, E.float()
    # (B, h, w, d) at t = 0
    z = (noise.to(E.device) if noise is not None
         else rand_from(torch.randn, (y.shape[0], h, w, E.shape[1]), generator, E.device))
    ts = time_grid(steps, time_shift, E.device)
    guide = [cfg_interval[0] <= u <= cfg_interval[1] for u in time_grid(steps, time_shift).tolist()]
    mu_prev = None
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        out = guided(model, z, t, y, cfg_scale if guide[i] else 1.0, null_label)   # (B, h, w, d)
        mu = out if endpoint else z + (1 - t) * out                   # the data prediction
        if solver == "euler" and not endpoint:
            z = z + dt * out                                          # the official update
        else:
            z = z + dt * (data_prediction(mu, mu_prev, ts, i, solver) - z) / (1 - t)
        mu_prev = mu
    return nearest_code(z, E, pc.CHUNK)


def cfm_endpoint_sample(model, E, y, grid, steps, temperature=1.0, cfg_scale=1.0, null_label=None,
                        generator=None, noise=None, **solver):
    return cfm_sample(model, E, y, grid, steps, temperature, cfg_scale, null_label, generator,
                      endpoint=True, noise=noise, **solver)

# -----------------------------------------------------------------------------
# DFM: discrete flow matching with a mask source (Gat et al. 2024; Campbell et al. 2024), as the
# official code has it
#
# Tokens live on {0..K-1} plus a mask id K. The path keeps each clean token with probability t and
# masks it otherwise, independently per position, so xt is all masks at t = 0 and the data at t = 1:
#     xt = where(u < t, idx, K),    u ~ U(0, 1) per position
# The network reads xt through a learned (K+1, C) table (N(0, 0.02)) and predicts p1(. | xt) as K+1
# logits per position. The loss is cross-entropy + z-loss at every position, masked or not, averaged
# over B*h*w; at init the logits are 0, so it is log(K+1) + 1e-5 log(K+1)^2.


class MaskedTokenDiT(DiT):
    """DFM's network: token ids (B, h, w) in [0, K] -> a (K+1, C) table -> the DiT -> (B, h, w, K+1)
    logits."""

    def __init__(self, K, **arch):
        super().__init__(arch["n_embd"], K + 1, **arch)
        self.tok_embed = nn.Embedding(K + 1, arch["n_embd"])
        nn.init.normal_(self.tok_embed.weight, std=0.02)

    def forward(self, x, t, y):
        return super().forward(self.tok_embed(x), t, y)

    def flops_per_image(self):
        # a lookup is free
        return super().flops_per_image() - 6 * self.tok_embed.weight.numel() * self.n_tokens


def dfm_loss(model, idx, E, y, t=None, noise=None, generator=None, per_image=False, z_loss=1e-5):
    """DFM loss for tokens idx (B, h, w); E gives K (the tokens are the data). t and the uniform
    draws u (B, h, w) that decide the masks come from `generator` unless given. per_image=True
    gives per-image loss (B,) and per-image accuracy on the masked positions (nan where none is
    masked)."""
    B, K = idx.shape[0], E.shape[0]
    t = draw_t(B, generator, idx.device) if t is None else t              # (B,)
    u = rand_from(torch.rand, idx.shape, generator, idx.device) if noise is None else noise
    masked = u >= t.view(B, 1, 1)                       # (B, h, w): the masks at time t
    xt = torch.where(masked, K, idx)                                      # (B, h, w) in [0, K]
    logits = model(xt, t, y).float()                                      # (B, h, w, K+1)
    ce = F.cross_entropy(logits.reshape(-1, K + 1), idx.reshape(-1), reduction="none").view(B, -1)
    loss = (ce + z_loss * torch.logsumexp(logits, dim=-1).pow(2).view(B, -1)).mean(dim=1)    # (B,)
    if per_image:
        m = masked.view(B, -1).float()
        correct = (logits.argmax(dim=-1) == idx).float().view(B, -1)
        return loss, (correct * m).sum(dim=1) / m.sum(dim=1)              # nan where nothing masked
    return loss.mean()


# Sampling (the official sampler): from all masks at t = 1e-4, `steps` steps of size
# dt = 1 / (steps + 1). At each step EVERY position is redrawn from
#     p_t = delta_x + dt * (p1 - delta_x) / (1 - t),   p1 = softmax(logits / tau) over the K+1 ids
# so an unmasked token may change or be masked again. At the last step the mask column of p_t is
# zeroed (and p_t renormalised), so every position ends on a code. The official "N steps" is N - 1
# network calls: steps = N - 1.


def dfm_transition(x, p1, t, dt, last=False):
    """p_t (B, h, w, K+1) of one DFM step from tokens x (B, h, w) with the model's p1 (B, h, w, K+1)
    at time t."""
    delta = F.one_hot(x, p1.shape[-1]).float()
    p = delta + dt * (p1 - delta) / (1 - t)
    if last:                                     # the final draw may not be a mask
        p[..., -1] = 0
        p = p / p.sum(-1, keepdim=True)
    return p


@torch.no_grad()
def dfm_step(model, x, t, dt, y, temperature=1.0, cfg_scale=1.0, null_label=None, generator=None,
             last=False):
    """One step of the sampler: tokens x (B, h, w) at time t -> tokens at t + dt, every position
    drawn from p_t."""
    # (B, h, w, K+1)
    logits = guided(model, x, torch.tensor(t, device=x.device), y, cfg_scale, null_label)
    p = dfm_transition(x, F.softmax(logits / temperature, dim=-1), t, dt, last)
    # one categorical draw per position, by the inverse CDF
    u = rand_from(torch.rand, (*x.shape, 1), generator, x.device)
    return (p.cumsum(-1) < u).sum(-1).clamp(max=p.shape[-1] - 1 - last)                # (B, h, w)


@torch.no_grad()
def dfm_sample(model, E, y, grid, steps, temperature=1.0, cfg_scale=1.0, null_label=None,
               generator=None, t_min=1e-4, solver="euler", time_shift=1.0, cfg_interval=(0.0, 1.0)):
    """Labels y (B,) -> code indices (B, h, w), by the official Euler jump sampler from an all-mask
    grid (its own solver and grid; guidance only for t in cfg_interval)."""
    if solver != "euler" or time_shift != 1.0:
        raise ValueError("DFM samples with its own jumps on a uniform grid: solver='euler', "
                         "time_shift=1")
    (h, w), K = (grid, grid) if isinstance(grid, int) else grid, E.shape[0]
    # all masks at t = t_min
    x = torch.full((y.shape[0], h, w), K, dtype=torch.long, device=E.device)
    dt = 1.0 / (steps + 1)
    for i in range(steps):
        t = t_min + i * dt
        s = cfg_scale if cfg_interval[0] <= t <= cfg_interval[1] else 1.0
        x = dfm_step(model, x, t, dt, y, temperature, s, null_label, generator, i == steps - 1)
    return x


# The objectives, by the name --objective and checkpoints use.
OBJECTIVES = {
    "purrception": pc.PURRCEPTION,
    "cfm": Objective("cfm", lambda K, d, **arch: DiT(in_dim=d, out_dim=d, **arch), cfm_loss,
                     cfm_sample, tempered=False),
    "cfm_endpoint": Objective("cfm_endpoint", lambda K, d, **arch: DiT(in_dim=d, out_dim=d, **arch),
                              cfm_endpoint_loss, cfm_endpoint_sample, tempered=False),
    "dfm": Objective("dfm", lambda K, d, **arch: MaskedTokenDiT(K, **arch), dfm_loss, dfm_sample,
                     noise="uniform", ode=False),
}


def get_objective(name):
    if name not in OBJECTIVES:
        raise UserError(f"--objective={name!r}: use one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


@dataclass
class BaselineConfig(pc.Config):
    objective: str = "cfm"        # cfm | cfm_endpoint | dfm (or purrception, as purrception.py)


def main(argv):
    cfg = cli.parse_args(argv, BaselineConfig(), pc.PRESETS, __doc__)
    objective = get_objective(cfg.objective)
    if not objective.tempered and cfg.temperature != 1.0:
        raise UserError(f"--temperature={cfg.temperature}: {cfg.objective} has no posterior to "
                        "sharpen; drop the flag")
    if not objective.ode and (cfg.solver, cfg.time_shift) != ("euler", 1.0):
        raise UserError(f"{cfg.objective} samples with its own jumps on a uniform grid: drop "
                        f"--solver and --time_shift")
    pc.train(cfg, objective)


if __name__ == "__main__":
    cli.run(main)
