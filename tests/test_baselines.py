"""Tests for baselines.py (CFM, CFM-endpoint, DFM as the official code defines them): losses at
init in closed form, the samplers against oracles, and every objective end to end (train,
checkpoint, resume, sample.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import baselines
import cli
import sample
import sample_ddp
from baselines import (OBJECTIVES, cfm_endpoint_loss, cfm_endpoint_sample, cfm_loss, cfm_sample,
                       dfm_loss, dfm_sample, dfm_step, get_objective, nearest_code)
from cli import UserError
from purrception import train
from conftest import D, GRID, K, NUM_CLASSES, codebook, tiny_config


def tiny_model(objective):
    torch.manual_seed(0)
    return OBJECTIVES[objective].build_model(K, D, grid_size=GRID, patch_size=2, n_layer=2,
                                             n_head=2, n_embd=32, num_classes=NUM_CLASSES)


class Oracle(torch.nn.Module):
    """A stand-in network: forward(x, t, y) -> fn(x, t, y)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, y):
        return self.fn(x, t, y)

# -----------------------------------------------------------------------------
# the networks and the losses at init


def test_objectives_change_only_the_ends_of_the_network():
    x, t, y = torch.randn(3, GRID, GRID, D), torch.rand(3), torch.tensor([0, 1, NUM_CLASSES])
    # a velocity per position
    assert tiny_model("cfm")(x, t, y).shape == (3, GRID, GRID, D)
    # an endpoint per position
    assert tiny_model("cfm_endpoint")(x, t, y).shape == (3, GRID, GRID, D)
    ids = torch.randint(0, K + 1, (3, GRID, GRID))                                    # K: the mask
    # K+1 logits (the official)
    assert tiny_model("dfm")(ids, t, y).shape == (3, GRID, GRID, K + 1)
    trunk = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks"))
    assert len({trunk(tiny_model(o)) for o in OBJECTIVES}) == 1
    # (K+1, C) at N(0, 0.02)
    table = tiny_model("dfm").tok_embed.weight
    assert table.shape == (K + 1, 32) and 0.01 < table.std().item() < 0.03
    with pytest.raises(UserError, match="purrception, cfm, cfm_endpoint, dfm"):
        get_objective("rectified")


def test_cfm_losses_at_init_are_the_variances_of_their_targets():
    E, idx, y = (codebook(), torch.randint(0, K, (256, GRID, GRID)),
                 torch.randint(0, NUM_CLASSES + 1, (256,)))
    # replay the loss's draws: t, then z0
    g = torch.Generator().manual_seed(0)
    torch.rand(256, generator=g)
    z0 = torch.randn(256, GRID, GRID, D, generator=g)
    loss = cfm_loss(tiny_model("cfm"), idx, E, y, generator=torch.Generator().manual_seed(0))
    assert abs(loss.item() - (E[idx] - z0).pow(2).mean().item()) < 1e-6
    # unit codes, unit noise
    assert abs(loss.item() - (1 + 1 / D)) < 0.06
    endpoint = cfm_endpoint_loss(tiny_model("cfm_endpoint"), idx, E, y,
                                 generator=torch.Generator().manual_seed(0))
    # |e|^2 / d for unit codes
    assert abs(endpoint.item() - 1 / D) < 1e-6


def test_dfm_loss_at_init_is_log_K_plus_one_plus_the_z_loss_over_all_positions():
    model, E = tiny_model("dfm"), codebook()
    idx, y = torch.randint(0, K, (8, GRID, GRID)), torch.randint(0, NUM_CLASSES + 1, (8,))
    # uniform over K+1 ids
    closed = math.log(K + 1) + 1e-5 * math.log(K + 1) ** 2
    # masked or not: every position
    for t in (0.001, 0.5, 1.0):
        assert abs(dfm_loss(model, idx, E, y, t=torch.full((8,), t)).item() - closed) < 1e-5
    loss, acc = dfm_loss(model, idx[:2], E, y[:2], t=torch.tensor([1e-3, 1.0]), per_image=True)
    # none masked at t = 1
    assert torch.allclose(loss, torch.full((2,), closed)) and math.isnan(acc[1].item())


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_loss_takes_t_and_the_noise_its_objective_names(objective):
    """The training loop draws t and each objective's noise itself (Objective.noise): given them, a
    loss is the one its generator would draw; other noise gives another loss."""
    obj, E = OBJECTIVES[objective], codebook()
    model = tiny_model(objective).requires_grad_(False)
    # past init, where the output ignores the input
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    idx, y = torch.randint(0, K, (6, GRID, GRID)), torch.randint(0, NUM_CLASSES + 1, (6,))
    g = torch.Generator().manual_seed(3)
    t = 1e-3 + (1 - 1e-3) * torch.rand(6, generator=g)
    shape, draw = (((6, GRID, GRID, D), torch.randn) if obj.noise == "normal"
                   else ((6, GRID, GRID), torch.rand))
    noise = draw(shape, generator=g)
    given = obj.loss(model, idx, E, y, t=t, noise=noise)
    assert given.item() == obj.loss(model, idx, E, y,
                                    generator=torch.Generator().manual_seed(3)).item()
    assert given.item() != obj.loss(model, idx, E, y, t=t, noise=draw(shape)).item()


@pytest.mark.parametrize("objective", ["cfm", "cfm_endpoint", "dfm"])
def test_baseline_loss_drops_when_overfitting_one_batch(objective):
    model, E = tiny_model(objective), codebook()
    idx, y = torch.randint(0, K, (8, GRID, GRID)), torch.randint(0, NUM_CLASSES, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = OBJECTIVES[objective].loss(model, idx, E, y,
                                          generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]

# -----------------------------------------------------------------------------
# the samplers, against oracles


# one code per class
TARGET = torch.tensor([3, 7, 11])


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_cfm_samplers_with_exact_oracles_land_on_the_code(steps):
    E, y = codebook(), torch.tensor([0, 1, 2, 1])
    # a point mass at e_c: its exact velocity and its exact endpoint
    e = lambda y: E[TARGET[y.clamp(max=2)]][:, None, None]
    velocity = lambda z, t, y: (e(y) - z) / (1 - t).view(-1, 1, 1, 1)
    endpoint = lambda z, t, y: e(y).expand_as(z)
    want = TARGET[y].view(4, 1, 1).expand(4, GRID, GRID)
    for sampler, oracle in ((cfm_sample, velocity), (cfm_endpoint_sample, endpoint)):
        idx = sampler(Oracle(oracle), E, y, GRID, steps, generator=torch.Generator().manual_seed(0))
        assert idx.shape == (4, GRID, GRID) and torch.equal(idx, want), sampler.__name__
    with pytest.raises(ValueError, match="temperature"):
        cfm_sample(Oracle(velocity), E, y, GRID, steps, temperature=0.5)


def test_cfm_guidance_mixes_velocities_in_one_batched_forward():
    calls, E = [], codebook()

    def velocity(z, t, y):
        calls.append(len(y))
        return torch.where((y == NUM_CLASSES).view(-1, 1, 1, 1), 0.0, 1.0) * torch.ones_like(z)
    y = torch.zeros(2, dtype=torch.long)
    z_start = torch.randn(2, GRID, GRID, D, generator=torch.Generator().manual_seed(0))
    idx = cfm_sample(Oracle(velocity), E, y, GRID, 4, cfg_scale=3.0, null_label=NUM_CLASSES,
                     generator=torch.Generator().manual_seed(0))
    # cond and uncond together
    assert calls == [4] * 4
    # v = 0 + 3 * (1 - 0)
    assert torch.equal(idx, nearest_code(z_start + 3.0, E))


def test_one_dfm_step_draws_from_the_official_transition():
    """p_t = delta_x + h (p1 - delta_x) / (1 - t) over all K+1 ids at every position, masked or not;
    at the last step the mask column is zeroed (and the rest renormalised)."""
    # 4 codes + the mask id 4
    Km = 4
    p1 = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    oracle = Oracle(lambda x, t, y: p1.log().expand(*x.shape, Km + 1))
    # (20000, 3, 1)
    x = torch.tensor([0, 2, Km]).repeat(20000).view(-1, 3, 1)
    t, h = 0.3, 0.2
    for last in (False, True):
        new = dfm_step(oracle, x, t, h, torch.zeros(len(x), dtype=torch.long),
                       generator=torch.Generator().manual_seed(0), last=last)
        for col, start in enumerate((0, 2, Km)):
            official = F.one_hot(torch.tensor(start), Km + 1).float()
            official = official + h * (p1 - official) / (1 - t)
            if last:
                official[Km] = 0
                official /= official.sum()
            freq = torch.bincount(new[:, col, 0], minlength=Km + 1).float() / len(x)
            assert (freq - official).abs().max() < 0.012, (last, start, freq, official)


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_dfm_sampler_ends_on_the_predicted_code_without_masks(steps):
    target = torch.tensor([2, 9, 14])
    logits = lambda x, t, y: 50 * F.one_hot(target[y.clamp(max=2)], K + 1).float()[
        :, None, None].expand(len(y), GRID, GRID, K + 1)
    y = torch.tensor([2, 0, 1])
    idx = dfm_sample(Oracle(logits), codebook(), y, GRID, steps,
                     generator=torch.Generator().manual_seed(0))
    # no mask id K is left
    assert torch.equal(idx, target[y].view(3, 1, 1).expand(3, GRID, GRID))


def test_dfm_sampler_follows_the_mask_schedule_and_the_posterior():
    # K+1 ids, none on the mask
    p = torch.tensor([0.2, 0.3, 0.5] + [0.0] * (K - 2))
    seen = []

    def posterior(x, t, y):
        seen.append(((x == K).float().mean().item(), t[0].item()))
        return torch.log(p.clamp(min=1e-30)).expand(*x.shape, K + 1)
    idx = dfm_sample(Oracle(posterior), codebook(), torch.zeros(512, dtype=torch.long), GRID, 5,
                     generator=torch.Generator().manual_seed(0))
    # official grid: h = 1/6
    assert [round(t, 4) for _, t in seen] == [round(1e-4 + i / 6, 4) for i in range(5)]
    # at time t, 1 - t masked
    for fraction, t in seen:
        assert abs(fraction - (1 - t)) < 0.02, seen
    freq = torch.bincount(idx.flatten(), minlength=K + 1).float() / idx.numel()
    assert (freq - p).abs().max() < 0.015, freq[:4]

# -----------------------------------------------------------------------------
# end to end: train, checkpoint, resume, sample.py


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_checkpoints_resumes_and_samples(data_dir, tmp_path, objective):
    cfg = lambda out, **kw: baselines.BaselineConfig(**vars(tiny_config(data_dir, out, **kw)),
                                                     objective=objective)
    straight = train(cfg(tmp_path / "a", max_iters=6), get_objective(objective))
    train(cfg(tmp_path / "b", max_iters=3), get_objective(objective))
    resumed = train(cfg(tmp_path / "b", max_iters=6, init_from="resume"), get_objective(objective))
    assert straight["losses"][3:] == resumed["losses"] and math.isfinite(resumed["val_loss"])
    out = tmp_path / "b"
    sampler = sample.load_sampler(str(out / "ckpt.pt"))
    assert sampler.ckpt["objective"] == objective and sampler.objective is OBJECTIVES[objective]
    images = sample_ddp.main([f"--out_dir={out}", "--num_samples=4", "--save_npz=s.npz",
                              "--steps=3"])["images"]
    assert images.shape == (4, 2 * GRID, 2 * GRID, 3) and images.dtype == np.uint8
    other = "dfm" if objective != "dfm" else "cfm"
    # resume with another objective
    with pytest.raises(UserError, match="objective"):
        train(cfg(tmp_path / "b", max_iters=8, init_from="resume"), get_objective(other))
    if objective != "purrception":
        with pytest.raises(UserError, match="posterior"):
            sample.main([f"--out_dir={out}", "--trajectory"])


def test_the_command_line_names_the_objectives_and_refuses_a_temperature_without_posterior(
        tmp_path):
    with pytest.raises(UserError, match="cfm_endpoint"):
        baselines.main(["--objective=mdlm"])
    with pytest.raises(UserError, match="no posterior"):
        baselines.main(["--objective=cfm", "--temperature=0.9"])
    assert cli.parse_args(["--objective=dfm"], baselines.BaselineConfig()).objective == "dfm"


def test_the_cfm_readout_in_chunks_picks_the_nearest_code_of_the_whole_codebook():
    z, E = torch.randn(3, 5, 7, 4), torch.randn(50, 4)
    want = torch.cdist(z.reshape(-1, 4), E).argmin(dim=-1).view(3, 5, 7)
    for chunk in (1, 50, 120, 10**6):           # one row at a time, splits mid-batch, all at once
        assert torch.equal(baselines.nearest_code(z, E, chunk=chunk), want)
