"""Tests for baselines.py (CFM and DFM) and --objective: losses at init, the samplers against oracles, end to end."""

import math

import numpy as np
import pytest
import torch

import purrception
import sample
from baselines import cfm_loss, cfm_sample, dfm_loss, dfm_sample
from purrception import T_EPS, Transformer, UserError, get_objective, train
from test_purrception import D, GRID, K, NUM_CLASSES, codebook, data_dir, tiny_config  # noqa: F401 (a fixture)


def tiny_model(objective):
    torch.manual_seed(0)
    extra = get_objective(objective, K, D)[2]
    return Transformer(vocab_size=K, code_dim=D, grid_size=GRID, patch_size=2, n_layer=2, n_head=2, n_embd=32,
                       num_classes=NUM_CLASSES, **extra)


class Oracle(torch.nn.Module):
    """A stand-in network with the Transformer's sampling interface: forward(x, t, y) -> fn(x, t, y)."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.grid_size, self.num_classes = fn, GRID, NUM_CLASSES

    def forward(self, x, t, y):
        return self.fn(x, t, y)

# -----------------------------------------------------------------------------
# the losses at init


def test_objectives_change_only_the_ends_of_the_network():
    x, t, y = torch.randn(3, GRID, GRID, D), torch.rand(3), torch.tensor([0, 1, NUM_CLASSES])
    assert tiny_model("cfm")(x, t, y).shape == (3, GRID, GRID, D)                     # a velocity per position
    ids = torch.randint(0, K + 1, (3, GRID, GRID))                                    # K: the mask
    assert tiny_model("dfm")(ids, t, y).shape == (3, GRID, GRID, K)                   # K logits per position
    trunk = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks"))
    assert trunk(tiny_model("cfm")) == trunk(tiny_model("dfm")) == trunk(tiny_model("purrception"))
    with pytest.raises(UserError, match="purrception, cfm or dfm"):
        get_objective("rectified", K, D)


def test_cfm_loss_at_init_is_the_variance_of_z1_minus_z0():
    model, E = tiny_model("cfm"), codebook()
    idx, y = torch.randint(0, K, (256, GRID, GRID)), torch.randint(0, NUM_CLASSES + 1, (256,))
    loss = cfm_loss(model, idx, E, y, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)                                              # replay the loss's draws:
    torch.rand(256, generator=g)                                                      # t, then z0
    z0 = torch.randn(256, GRID, GRID, D, generator=g)
    assert abs(loss.item() - (E[idx] - z0).pow(2).mean().item()) < 1e-6
    assert abs(loss.item() - (1 + 1 / D)) < 0.06                                      # unit codes, unit noise


def test_dfm_loss_at_init_is_log_K_plus_the_z_loss():
    model, E = tiny_model("dfm"), codebook()
    idx = torch.randint(0, K, (8, GRID, GRID))
    t = torch.full((8,), 0.5)
    loss = dfm_loss(model, idx, E, torch.randint(0, NUM_CLASSES + 1, (8,)), t=t)
    assert abs(loss.item() - (math.log(K) + 1e-5 * math.log(K) ** 2)) < 1e-5
    # per image: loss and accuracy over the masked positions only; none masked at t = 1 gives loss 0, accuracy nan
    loss, acc = dfm_loss(model, idx[:2], E, torch.zeros(2, dtype=torch.long), t=torch.tensor([T_EPS, 1.0]),
                         reduction="none")
    assert abs(loss[0].item() - math.log(K)) < 1e-3 and loss[1].item() == 0 and math.isnan(acc[1].item())


@pytest.mark.parametrize("objective", ["cfm", "dfm"])
def test_baseline_loss_drops_when_overfitting_one_batch(objective):
    model, E = tiny_model(objective), codebook()
    loss_fn = get_objective(objective, K, D)[0]
    idx, y = torch.randint(0, K, (8, GRID, GRID)), torch.randint(0, NUM_CLASSES, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = loss_fn(model, idx, E, y, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]

# -----------------------------------------------------------------------------
# the samplers, against oracles


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_cfm_sampler_with_the_exact_velocity_lands_on_the_code(steps):
    E = codebook()
    target = torch.tensor([3, 7, 11])                                                 # one code per class
    # a point mass at e_c: the marginal velocity is (e_c - z) / (1 - t), exactly
    velocity = lambda z, t, y: (E[target[y.clamp(max=2)]][:, None, None] - z) / (1 - t).view(-1, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 1])
    idx = cfm_sample(Oracle(velocity), E, y, steps, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (4, GRID, GRID) and torch.equal(idx, target[y].view(4, 1, 1).expand(4, GRID, GRID))
    with pytest.raises(UserError, match="temperature"):
        cfm_sample(Oracle(velocity), E, y, steps, temperature=0.5)


def test_cfm_guidance_mixes_velocities_in_one_batched_forward():
    calls, E = [], codebook()

    def velocity(z, t, y):
        calls.append(len(y))
        return torch.where((y == NUM_CLASSES).view(-1, 1, 1, 1), 0.0, 1.0) * torch.ones_like(z)
    y = torch.zeros(2, dtype=torch.long)
    z_start = torch.randn(2, GRID, GRID, D, generator=torch.Generator().manual_seed(0))
    idx = cfm_sample(Oracle(velocity), E, y, 4, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert calls == [4] * 4                                                           # cond and uncond together
    assert torch.equal(idx, purrception.nearest_code(z_start + 3.0, E))              # v = 0 + 3 * (1 - 0)


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_dfm_sampler_unmasks_everything_into_the_predicted_code(steps):
    E = codebook()
    target = torch.tensor([2, 9, 14])
    logits = lambda x, t, y: 50 * torch.nn.functional.one_hot(target[y.clamp(max=2)], K).float()[:, None, None]
    y = torch.tensor([2, 0, 1])
    idx = dfm_sample(Oracle(lambda x, t, y: logits(x, t, y).expand(len(y), GRID, GRID, K)), E, y, steps,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, target[y].view(3, 1, 1).expand(3, GRID, GRID))           # no mask id K is left


def test_dfm_sampler_follows_the_mask_schedule_and_the_posterior():
    E, p = codebook(), torch.tensor([0.2, 0.3, 0.5] + [0.0] * (K - 3))
    masked_fraction = []

    def posterior(x, t, y):
        masked_fraction.append(((x == K).float().mean().item(), t[0].item()))
        return torch.log(p.clamp(min=1e-30)).expand(*x.shape, K)
    idx = dfm_sample(Oracle(posterior), E, torch.zeros(512, dtype=torch.long), 5,
                     generator=torch.Generator().manual_seed(0))
    for fraction, t in masked_fraction:                                               # at time t, 1 - t masked
        assert abs(fraction - (1 - t)) < 0.02, masked_fraction
    freq = torch.bincount(idx.flatten(), minlength=K).float() / idx.numel()
    assert (freq - p).abs().max() < 0.01, freq[:4]
    cold = dfm_sample(Oracle(posterior), E, torch.zeros(4, dtype=torch.long), 5, temperature=1e-3)
    assert (cold == 2).all()                                                          # tau -> 0: the argmax code

# -----------------------------------------------------------------------------
# end to end: train, checkpoint, resume, sample.py


@pytest.mark.parametrize("objective", ["cfm", "dfm"])
def test_baseline_trains_checkpoints_and_samples(data_dir, tmp_path, objective):  # noqa: F811 (the fixture)
    out = tmp_path / objective
    metrics = train(tiny_config(data_dir, out, objective=objective))
    assert math.isfinite(metrics["val_loss"]) and (out / "samples_000006.png").exists()
    model, ckpt, sample_fn = purrception.load_model(str(out / "ckpt.pt"))
    assert ckpt["config"]["objective"] == objective and sample_fn is get_objective(objective, K, D)[1]
    images = sample.main([f"--out_dir={out}", "--num_samples=4", "--save_npz=s.npz", "--steps=3"])["images"]
    assert images.shape == (4, 2 * GRID, 2 * GRID, 3) and images.dtype == np.uint8
    with pytest.raises(UserError, match=f"--objective={objective}"):                 # resume with another objective
        train(tiny_config(data_dir, out, objective="purrception", init_from="resume", max_iters=8))
    with pytest.raises(SystemExit, match="posterior"):
        sample.main([f"--out_dir={out}", "--trajectory"])
