"""Tests for purrception.py: CPU, tiny models, a fake token folder in tmp_path, no network. Whole
file < 1 minute."""

import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
import purrception
import vq
import sample
from cli import UserError, parse_args
from purrception import Config, DiT, PRESETS, sample_ode, get_batch, train, vfm_loss
from conftest import (D, GRID, K, NUM_CLASSES, ROOT, codebook, logits_only, tiny_config,
                      tiny_model)

# -----------------------------------------------------------------------------
# the sampler, against posteriors known in closed form


class GaussianPosterior(torch.nn.Module):
    """The exact q(k | z_t, y) of the path z_t = t e_k + (1 - t) z0 when the data is code k with
    prior p(k | y): z_t | k ~ N(t e_k, (1 - t)^2 I), so
        log q_k = log p(k | y) - ||z - t e_k||^2 / (2 (1 - t)^2) + const.
    Row num_classes of `probs` is the null class. Records the batch size of every call."""

    def __init__(self, E, probs, grid_size=2):
        super().__init__()
        self.E, self.log_p = E, probs.log()
        self.grid_size, self.num_classes = grid_size, probs.shape[0] - 1
        self.calls = []

    def forward(self, z, t, y):
        self.calls.append(len(y))
        t = t.view(-1, 1, 1, 1, 1)
        d2 = (z[..., None, :] - t * self.E).pow(2).sum(-1)                          # (B, h, w, K)
        return self.log_p[y][:, None, None, :] - d2 / (2 * (1 - t[..., 0]) ** 2)


class FixedLogits(GaussianPosterior):
    """Logits that ignore z and t: log p(k | y) (a one-hot oracle when p is one-hot)."""

    def forward(self, z, t, y):
        self.calls.append(len(y))
        return self.log_p[y][:, None, None, :].expand(*z.shape[:3], -1).clamp(min=-1e4)


# 4 unit codes in d = 2
SQUARE = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
# y = 0, 1, null
PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.4, 0.15, 0.2, 0.25]])


def test_sampler_reproduces_code_frequencies_with_the_exact_posterior():
    model = GaussianPosterior(SQUARE, PROBS)
    for label in (0, 1):
        y = torch.full((1000,), label)
        idx = sample_ode(model, SQUARE, y, 2, steps=50,
                         generator=torch.Generator().manual_seed(label))
        # 4000 positions
        freq = torch.bincount(idx.flatten(), minlength=4).float() / idx.numel()
        assert torch.allclose(freq, PROBS[label], atol=0.03), (label, freq)


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_one_hot_oracle_lands_exactly_on_its_code(steps):
    probs = torch.tensor([[0.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    model = FixedLogits(SQUARE, probs)
    y = torch.tensor([0, 1, 0, 1])
    idx, traj = sample_ode(model, SQUARE, y, 2, steps, generator=torch.Generator().manual_seed(0),
                             return_trajectory=True)
    assert idx.tolist() == [[[2, 2], [2, 2]], [[1, 1], [1, 1]]] * 2
    assert traj["z"].shape == (steps, 4, 2, 2, 2) and traj["entropy"].shape == (steps, 4, 2, 2)
    # the last step lands on mu
    assert torch.allclose(traj["mu"][-1], SQUARE[idx])
    assert torch.allclose(traj["t"], torch.linspace(0, 1, steps + 1)[:-1])
    assert traj["entropy"].abs().max() < 1e-6


def test_low_temperature_picks_the_most_likely_code():
    model = FixedLogits(SQUARE, PROBS)
    idx = sample_ode(model, SQUARE, torch.zeros(64, dtype=torch.long), 2, 10, temperature=1e-3,
                       generator=torch.Generator().manual_seed(0))
    # argmax of PROBS[0]
    assert (idx == 3).all()


def test_cfg_scale_one_is_the_conditional_pass_and_guidance_is_one_batched_forward():
    y = torch.tensor([0, 1, 1, 0])
    plain = GaussianPosterior(SQUARE, PROBS)
    other_null = GaussianPosterior(SQUARE,
                                   torch.cat([PROBS[:2], torch.tensor([[0.97, 0.01, 0.01, 0.01]])]))
    a = sample_ode(plain, SQUARE, y, 2, 8, cfg_scale=1.0,
                   generator=torch.Generator().manual_seed(3))
    b = sample_ode(other_null, SQUARE, y, 2, 8, cfg_scale=1.0,
                   generator=torch.Generator().manual_seed(3))
    # no unconditional pass at s=1
    assert torch.equal(a, b) and plain.calls == [4] * 8
    # s = 3 with logits fixed at cond = log[.4 .35 .25 0], uncond = log[.6 .2 .2 0]: cond's argmax
    # is code 0, uncond + 3 (cond - uncond) has its argmax at code 1
    probs = torch.tensor([[0.4, 0.35, 0.25, 0.0], [1, 0, 0, 0], [0.6, 0.2, 0.2, 0.0]])
    model = FixedLogits(SQUARE, probs)
    idx = sample_ode(model, SQUARE, torch.zeros(4, dtype=torch.long), 2, 5, temperature=1e-3,
                     cfg_scale=3.0, null_label=2)
    assert (idx == 1).all() and model.calls == [8] * 5

class GaussianDataMean(torch.nn.Module):
    """The exact posterior mean when the data z1 ~ N(m, s^2) per position: z_t ~ N(t m, sigma_t^2)
    with sigma_t^2 = t^2 s^2 + (1 - t)^2, so E[z1 | z_t] = m + t s^2 (z_t - t m) / sigma_t^2, given
    as logits over the two codes -L and L of d = 1 (their mean is any point between). The ODE's
    solution from z0 is known: z_t = t m + sigma_t z0, so z1 = m + s z0."""
    m, s, L = 0.3, 1.0, 8.0

    def forward(self, z, t, y):
        t, z = t.double().view(-1, 1, 1, 1), z.double()
        mu = self.m + t * self.s ** 2 * (z - t * self.m) / (t ** 2 * self.s ** 2 + (1 - t) ** 2)
        p = (mu + self.L) / (2 * self.L)                                 # pi of code L
        return torch.cat([torch.zeros_like(p), p.log() - (-p).log1p()], -1).float()


@pytest.mark.parametrize("time_shift", [1.0, 0.5])
def test_each_solver_converges_at_its_order_to_the_known_solution(time_shift):
    oracle, E = GaussianDataMean(), torch.tensor([[-GaussianDataMean.L], [GaussianDataMean.L]])
    z0 = torch.randn(256, 2, 2, 1, generator=torch.Generator().manual_seed(0))
    exact, y = oracle.m + oracle.s * z0, torch.zeros(256, dtype=torch.long)
    error = {}
    for solver in purrception.SOLVERS:
        for steps in (32, 64, 128):
            _, path = sample_ode(oracle, E, y, 2, steps, noise=z0, return_trajectory=True,
                                   solver=solver, time_shift=time_shift)
            error[solver, steps] = (path["mu"][-1] - exact).abs().max().item()   # z lands on mu
    order = lambda solver, n: math.log2(error[solver, n] / error[solver, 2 * n])
    assert all(0.85 < order("euler", n) < 1.15 for n in (32, 64)), error
    assert all(order("dpm++2m", n) > 1.6 for n in (32, 64)), error
    assert all(error["dpm++2m", n] < error["euler", n] / 4 for n in (32, 64, 128)), error


def test_the_second_order_step_is_first_order_where_lambda_is_infinite():
    ts, mu, mu_prev = purrception.time_grid(6, 0.5), torch.ones(3), torch.zeros(3)
    assert ts[0] == 0 and ts[-1] == 1 and (ts.diff() > 0).all() and ts.diff()[-1] < 1 / 6
    # first order at the step from t = 0, the next (its mu_prev is at lambda = -inf), the last
    for i, first in ((0, True), (1, True), (2, False), (4, False), (5, True)):
        D = purrception.data_prediction(mu, mu_prev, ts, i, "dpm++2m")
        assert torch.equal(D, mu) == first
    assert torch.equal(purrception.data_prediction(mu, mu_prev, ts, 3, "euler"), mu)


@pytest.mark.parametrize("chunk", [None, 2**22])
def test_euler_on_the_uniform_grid_with_guidance_everywhere_is_the_official_loop(chunk):
    model, E = GaussianPosterior(SQUARE, PROBS), SQUARE
    y, noise = torch.tensor([0, 1, 1, 0]), torch.randn(4, 2, 2, 2)
    z, ts = noise.clone(), torch.linspace(0, 1, 9)
    for i in range(8):                        # the official sampler: Euler on a uniform grid
        logits = purrception.guided(model, z, ts[i], y, 1.7, 2)
        mu = torch.softmax(logits / 0.9, dim=-1) @ E
        z = z + (ts[i + 1] - ts[i]) * (mu - z) / (1 - ts[i])
    want = (z.pow(2).sum(-1, keepdim=True) - 2 * z @ E.T + E.pow(2).sum(-1)).argmin(-1)
    got = sample_ode(model, E, y, 2, 8, 0.9, 1.7, 2, noise=noise, chunk=chunk, solver="euler",
                       time_shift=1.0, cfg_interval=(0.0, 1.0))
    assert torch.equal(got, want)


def test_guidance_runs_only_inside_its_interval():
    model = FixedLogits(SQUARE, PROBS)
    sample_ode(model, SQUARE, torch.zeros(4, dtype=torch.long), 2, 8, cfg_scale=2.0,
                 null_label=2, cfg_interval=(0.5, 1.0))
    assert model.calls == [4] * 4 + [8] * 4                   # t = 0 ... 0.375 unguided, then both


# -----------------------------------------------------------------------------
# model and loss


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_forward_shape_and_uniform_posterior_at_init(patch_size):
    model = tiny_model(patch_size)
    z = torch.randn(3, GRID, GRID, D)
    logits = model(z, torch.rand(3), torch.tensor([0, 2, NUM_CLASSES]))
    # zero-init output layer
    assert logits.shape == (3, GRID, GRID, K) and (logits == 0).all()


def test_patches_map_back_to_their_own_positions():
    model = tiny_model()
    # leave the zero init behind
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    z = torch.randn(2, GRID, GRID, D)
    t, y = torch.rand(2), torch.tensor([0, 1])
    z2 = z.clone()
    # touch the top-left patch only
    z2[:, 0, 0] += 1.0
    changed = (model(z2, t, y) - model(z, t, y)).abs().amax(dim=(0, 3)) > 0          # (h, w)
    # attention mixes everything...
    assert changed.all()
    # ... without it, only the patch
    model.blocks = torch.nn.ModuleList()
    changed = (model(z2, t, y) - model(z, t, y)).abs().amax(dim=(0, 3)) > 0
    assert changed[:2, :2].all() and changed.sum() == 4


def test_loss_at_init_is_log_K_plus_the_z_loss():
    model, E = tiny_model(), codebook()
    idx = torch.randint(0, K, (8, GRID, GRID))
    loss = vfm_loss(model, idx, E, torch.randint(0, NUM_CLASSES + 1, (8,)))
    assert math.isfinite(loss.item())
    assert abs(loss.item() - (math.log(K) + 1e-5 * math.log(K) ** 2)) < 1e-5


def test_loss_drops_when_overfitting_one_batch():
    model, E = tiny_model(), codebook()
    idx, y = torch.randint(0, K, (8, GRID, GRID)), torch.randint(0, NUM_CLASSES, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        # same t and noise
        loss = vfm_loss(model, idx, E, y, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_per_image_loss_and_accuracy():
    model, E = tiny_model(), codebook()
    idx, y = torch.randint(0, K, (5, GRID, GRID)), torch.zeros(5, dtype=torch.long)
    t = torch.linspace(0.1, 1, 5)
    for chunk in (None, 2**22):
        loss, acc = vfm_loss(model, idx, E, y, t=t, per_image=True, chunk=chunk)
        assert loss.shape == acc.shape == (5,)
        assert torch.allclose(loss.mean(), vfm_loss(model, idx, E, y, t=t, chunk=chunk))
        # at init every posterior is uniform and its argmax is code 0
        assert torch.equal(acc, (idx == 0).float().view(5, -1).mean(dim=1))


def test_sampler_indices_in_range_and_seed_deterministic():
    model, E = tiny_model(), codebook()
    torch.nn.init.normal_(model.final_layer.linear.weight)
    y = torch.tensor([0, 1, 2, NUM_CLASSES])
    run = lambda seed, s=1.0: sample_ode(model, E, y, GRID, 4, cfg_scale=s, null_label=NUM_CLASSES,
                                           generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (4, GRID, GRID) and a.dtype == torch.long and 0 <= a.min() and a.max() < K
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(0, 2.0), run(0, 2.0))

# -----------------------------------------------------------------------------
# data


def test_get_batch_returns_whole_images_with_their_labels(data_dir):
    tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16).reshape(-1, GRID * GRID)
    labels = np.fromfile(data_dir / "train_labels.bin", dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    idx, y, u, t, z = get_batch("train", str(data_dir), 16, (GRID, GRID), D, g)
    assert idx.shape == (16, GRID, GRID) and idx.dtype == y.dtype == torch.int64
    ix = torch.randint(len(labels), (16,), generator=torch.Generator().manual_seed(0)).numpy()
    assert np.array_equal(idx.reshape(16, -1).numpy(), tokens[ix])
    assert np.array_equal(y.numpy(), labels[ix])
    assert u.shape == t.shape == (16,) and z.shape == (16, GRID, GRID, D) and t.min() >= 1e-3
    # the uniform noise of DFM's masks has one number per position, and the draws before it are
    # the same
    *rest, u_dfm = get_batch("train", str(data_dir), 16, (GRID, GRID), D,
                             torch.Generator().manual_seed(0), "uniform")
    assert u_dfm.shape == (16, GRID, GRID) and 0 <= u_dfm.min() and u_dfm.max() < 1
    assert all(torch.equal(a, b) for a, b in zip(rest, (idx, y, u, t)))

# -----------------------------------------------------------------------------
# config parsing


def test_parse_args_types_presets_and_precedence():
    cfg = parse_args(["--lr=1", "--compile=false", "--dataset=cifar10", "--max_iters=2e3",
                      "--n_layer=3"], Config(), PRESETS)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.compile is False and cfg.dataset == "cifar10"
    # flags beat the preset
    assert cfg.max_iters == 2000 and cfg.n_layer == 3
    assert cfg.n_embd == PRESETS["cifar10"]["n_embd"]
    assert cfg.batch_size == PRESETS["cifar10"]["batch_size"]
    assert parse_args(["--compile=true"], Config()).compile is True
    assert parse_args(["--compile"], Config()).compile


@pytest.mark.parametrize("argv, message", [(["--batchsize=8"], "did you mean --batch_size"),
                                           (["--batch_size=eight"], "expects int"),
                                           (["--compile=maybe"], "expects bool"),
                                           (["--lr"], "--lr=VALUE")])
def test_parse_args_rejects_bad_flags_in_one_line(argv, message):
    with pytest.raises(UserError) as e:
        parse_args(argv, Config(), PRESETS)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_import_does_not_parse_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "--junk=1", "-x"])
    importlib.reload(purrception)


def test_command_line_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "purrception.py"),
                        f"--data_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: no prepared tokens") and r.stderr.count("\n") == 1

# -----------------------------------------------------------------------------
# training: smoke, exact resume, DDP


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_smoke_writes_a_portable_checkpoint_and_grids(data_dir, tmp_path):
    metrics = train(tiny_config(data_dir, tmp_path, max_iters=3))
    assert math.isfinite(metrics["val_loss"])
    assert len(metrics["val_loss_by_t"]) == 5 and len(metrics["losses"]) == 3
    # weights_only=True works
    ckpt = load(tmp_path / "ckpt.pt")
    assert ckpt["iter"] == 3
    assert {"model", "ema", "optimizer", "model_args", "config", "rng", "objective"} <= set(ckpt)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert json.load(open(tmp_path / "config.json"))["max_iters"] == 3
    assert not (tmp_path / "samples_000000.png").exists()
    assert (tmp_path / "samples_000003.png").exists()
    model = sample.load_sampler(str(tmp_path / "ckpt.pt")).model
    assert all(torch.equal(p, ckpt["ema"][n]) for n, p in model.state_dict().items())
    assert not model.training


def test_resume_continues_exactly(data_dir, tmp_path):
    straight = train(tiny_config(data_dir, tmp_path / "a", max_iters=6))
    first = train(tiny_config(data_dir, tmp_path / "b", max_iters=3))
    second = train(tiny_config(data_dir, tmp_path / "b", max_iters=6, init_from="resume"))
    assert straight["losses"] == first["losses"] + second["losses"]
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


# One torchrun of two gloo processes runs two trainings (one process group, torch imported once):
# 1. 8 images an iter: one process runs them in one micro-step (the default split), two processes
#    4 each. Every process draws the same 8 images, labels, t and noise and takes its slots, so the
#    logged losses agree. The gradients do not agree bit for bit: one process sums 8 images'
#    gradients in one pass, DDP sums two sums of 4 and halves, so the last bits differ and the
#    weights drift apart by float rounding (the tolerance below).
# 2. rank 1's loss turns NaN from its 3rd step on, rank 0's never: both stop with the same line,
#    and no hang.
TWO_RUNS = """import os, sys
sys.path.insert(0, {root!r})
import dataclasses, cli, purrception as pc
calls = []
def loss(model, *args, **kw):
    calls.append(1)
    value = pc.vfm_loss(model, *args, **kw)
    return value * float("nan") if os.environ["RANK"] == "1" and len(calls) >= 3 else value
replay, poisoned = (cli.parse_args(flags.split(), pc.Config()) for flags in sys.argv[1:])
pc.train(replay)
cli.run(lambda argv: pc.train(poisoned, dataclasses.replace(pc.PURRCEPTION, loss=loss)), [])
"""


def test_two_processes_replay_one_and_stop_together_on_a_non_finite_loss(data_dir, tmp_path):
    kw = dict(batch_size=8, grad_accum=1, max_iters=4, eval_interval=4, eval_iters=1, grid_cols=1,
              log_interval=1)
    single = train(tiny_config(data_dir, tmp_path / "single", **kw))
    flags = lambda cfg: " ".join(f"--{k}={v}" for k, v in vars(cfg).items())
    poisoned = tiny_config(data_dir, tmp_path / "nan", max_iters=20, eval_interval=2,
                           log_interval=3, eval_iters=1, grid_cols=1)
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS.format(root=ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script),
                        flags(tiny_config(data_dir, tmp_path / "ddp", **kw)), flags(poisoned)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=120)
    # 1. the same losses (the mean over both processes) and the weights up to rounding
    assert "2 processes" in r.stdout, r.stderr[-2000:]
    assert "8 images per iter = 4 x 1 micro-steps x 2" in r.stdout, r.stderr[-2000:]
    logged = [line.split(",")[0] for line in r.stdout.splitlines() if line.startswith("iter ")]
    assert logged[:4] == [f"iter {i}: loss {loss:.4f}" for i, loss in single["losses"]]
    a, b = load(tmp_path / "single" / "ckpt.pt"), load(tmp_path / "ddp" / "ckpt.pt")
    # each tensor within 1e-4 of its largest entry (measured: 2.4e-5 here)
    for key in ("model", "ema"):
        assert all((a[key][n] - b[key][n]).abs().max() <= 1e-4 * a[key][n].abs().max()
                   for n in a[key]), key
    # 2. one line, the same on both, and the last good checkpoint untouched
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], r.stderr[-2000:]
    assert "the loss is nan at iter 3: training diverged, the last good checkpoint" in errors[0]
    assert load(tmp_path / "nan" / "ckpt.pt")["iter"] == 2


def test_the_global_batch_is_split_over_the_processes():
    split = cli.split_batch
    # the preset's batch, shared
    assert split(32, 1, 1) == (32, 1) and split(256, 1, 8) == (32, 1)
    # whole micro-steps each
    assert split(4, 2, 2) == (4, 1) and split(16, 4, 2) == (16, 2)
    # finer ones where they must
    assert split(2, 3, 2) == (1, 3) and split(8, 3, 2) == (6, 2)
    with pytest.raises(UserError, match=r"global batch of 256 images .* does not split over "
                                        r"3 processes; keep it on --nproc_per_node=2"):
        split(256, 1, 3)


def test_get_lr_warms_up_then_holds_or_follows_the_cosine_to_min_lr():
    lr = lambda it, decay: purrception.get_lr(it, 1.0, 0.1, 10, decay)
    # linear, never 0
    assert lr(0, 0) == pytest.approx(1 / 11) and lr(9, 0) == pytest.approx(10 / 11)
    # constant (the paper)
    assert lr(10, 0) == lr(500, 0) == 1.0
    # cosine: start, middle
    assert lr(10, 110) == 1.0 and lr(60, 110) == pytest.approx(0.55)
    # end, and after
    assert lr(110, 110) == pytest.approx(0.1) and lr(10**6, 110) == pytest.approx(0.1)


def hand_count(C, L, T, p, d, K, freq_dim=256):
    """Training FLOPs per image of a DiT counted layer by layer: 6 per weight per token for the
    patch embedding, each block's qkv, proj, fc and fc2 and the final linear; 6 per weight once per
    image for the t MLP and the adaLN maps; 12 L C T^2 for attention's two T x T products."""
    per_token = (p * p * d * C + C) + L * ((3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C)
                                           + (4 * C * C + C)) + (C * p * p * K + p * p * K)
    per_image = (freq_dim * C + C + C * C + C) + L * (6 * C * C + 6 * C) + (2 * C * C + 2 * C)
    return 6 * (T * per_token + per_image) + 12 * L * C * T * T


@pytest.mark.parametrize("n_embd, n_layer, n_head, K, grid, gflop", [
    (768, 12, 12, 1024, 16, 34.59),          # DiT-B/2, the cifar10 preset
    (768, 12, 12, 16384, 32, 215.55),        # DiT-B/2, ImageNet 256 on a 32x32 grid of K=16384
    (1024, 24, 16, 16384, 32, 587.68),       # DiT-L/2
    (1152, 28, 16, 16384, 32, 828.21)])      # DiT-XL/2
def test_flops_per_image_matches_a_count_by_hand(n_embd, n_layer, n_head, K, grid, gflop):
    # shapes only, no memory
    with torch.device("meta"):
        model = DiT(in_dim=8, out_dim=K, grid_size=grid, patch_size=2, n_layer=n_layer,
                    n_head=n_head, n_embd=n_embd, num_classes=1000)
    flops = model.flops_per_image()
    assert flops == hand_count(n_embd, n_layer, (grid // 2) ** 2, 2, 8, K)
    assert round(flops / 1e9, 2) == gflop


def test_peak_flops_know_the_pcie_and_nvl_parts(monkeypatch):
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H800", 989e12),
                       ("NVIDIA A800-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                       ("NVIDIA GeForce RTX 4090", 0.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
        assert cli.device_peak_flops("cuda:0") == peak, name
    assert cli.device_peak_flops("cpu") == 0.0

# -----------------------------------------------------------------------------
# GPU readiness, checked on the CPU: fp32 geometry under bf16 autocast, fused EMA, torch.compile


def test_sampler_under_bf16_autocast_reads_out_the_fp32_codes():
    # CIFAR-10's codebook shape
    K_, d = 1024, 8
    E = F.normalize(torch.randn(K_, d, generator=torch.Generator().manual_seed(0)), dim=1)
    # a fixed network output
    fixed = torch.randn(16, 4, 4, K_, generator=torch.Generator().manual_seed(1)) * 3

    class Fixed(torch.nn.Module):
        def forward(self, z, t, y):
            return fixed[: len(y)]
    y = torch.zeros(16, dtype=torch.long)
    for solver in purrception.SOLVERS:
        g = lambda: torch.Generator().manual_seed(2)
        plain = sample_ode(Fixed(), E, y, 4, 10, generator=g(), solver=solver)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = sample_ode(Fixed(), E, y, 4, 10, generator=g(), solver=solver)
        assert torch.equal(plain, under), solver
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the readout alone
        z = torch.randn(4096, d)
        mixed = (z.pow(2).sum(-1, keepdim=True) - 2 * z @ E.T + E.pow(2).sum(-1)).argmin(-1)
    exact = (z.pow(2).sum(-1, keepdim=True) - 2 * z @ E.T + E.pow(2).sum(-1)).argmin(-1)
    # what bf16 would have done: the test can tell the difference
    assert not torch.equal(mixed, exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_tokenizer_training_step_never_waits_for_the_gpu():
    model = vq.VQVAE(vq.VQConfig(image_size=16, ch=8, n_res=1, codebook_size=16,
                                 code_dim=4)).cuda().train()
    x = torch.rand(8, 3, 16, 16, device="cuda") * 2 - 1
    # the first step reads the init flag and runs k-means
    model(x)
    torch.cuda.set_sync_debug_mode("error")               # any host wait from here on raises
    try:
        for _ in range(3):
            recon, _, commit = model(x)
            (F.mse_loss(recon, x) + commit).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fused_ema_equals_the_per_tensor_update():
    a = tiny_model()
    for p in a.parameters():
        torch.nn.init.normal_(p)
    ema = tiny_model()
    reference = {n: p.detach().clone() for n, p in ema.named_parameters()}
    for n, p in a.named_parameters():
        reference[n].mul_(0.99).add_(p.detach(), alpha=1 - 0.99)
    before = {n: p.detach().clone() for n, p in ema.named_parameters()}
    purrception.update_ema(ema, a, 0.99)
    assert all(torch.equal(p, reference[n]) for n, p in ema.named_parameters())
    # every tensor moved
    assert not any(torch.equal(p, before[n]) for n, p in ema.named_parameters())


def test_compile_trains_like_eager_and_saves_plain_keys(data_dir, tmp_path):
    eager = train(tiny_config(data_dir, tmp_path / "eager", max_iters=3, eval_interval=3))
    compiled = train(tiny_config(data_dir, tmp_path / "compiled", max_iters=3, eval_interval=3,
                                 compile=True))
    for (i, a), (j, b) in zip(eager["losses"], compiled["losses"]):
        assert i == j and abs(a - b) < 1e-3 * abs(a), (a, b)
    ckpt = load(tmp_path / "compiled" / "ckpt.pt")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["model"].keys() == load(tmp_path / "eager" / "ckpt.pt")["model"].keys()


def test_a_gpu_sized_run_on_a_cpu_says_what_it_would_cost(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, max_iters=10**9, eval_interval=10**9, log_interval=10**6)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "purrception.py"),
                             *[f"--{k}={v}" for k, v in vars(cfg).items()]],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
    finally:
        proc.kill()
        proc.wait()
    note = next(line for line in lines if line.startswith("note:"))
    assert "one iter takes" in note and "would take" in note
    assert "'CIFAR-10 on a CPU' recipe" in note
    first = next(line for line in lines if line.startswith("iter 0:"))
    # start-up is not a rate
    assert "loss" in first and "ms/iter" not in first and "ETA" not in first

# -----------------------------------------------------------------------------
# the paper's model sizes


@pytest.mark.parametrize("size, millions", [("B/2", 180.7), ("L/2", 525.0), ("XL/2", 750.4)])
def test_paper_sizes_have_the_official_parameter_counts(size, millions):
    from purrception import DIT_SIZES, PRESETS
    with torch.device("meta"):                    # shapes only: no memory, no initialisation cost
        model = DiT(in_dim=8, out_dim=16384, grid_size=32, patch_size=2, num_classes=1000,
                    **DIT_SIZES[size])
    assert round(model.num_params() / 1e6, 1) == millions
    preset = PRESETS["imagenet256"]
    assert {k: preset[k] for k in DIT_SIZES["XL/2"]} == DIT_SIZES["XL/2"]
    assert (preset["lr"], preset["decay_lr"], preset["patch_size"]) == (1e-4, False, 2)

# -----------------------------------------------------------------------------
# the chunked loss and sampler against the plain ones: same loss, gradients and codes


def trained_like_model(patch_size, K_):
    model = tiny_model(patch_size, K_)
    # away from the zero init
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("patch_size, head", [(2, True), (1, True), (2, False)])
def test_chunked_loss_equals_the_plain_loss_with_its_gradients(patch_size, head):
    K_ = 40
    model, E = trained_like_model(patch_size, K_), codebook(K_)
    idx, y = torch.randint(0, K_, (3, GRID, GRID)), torch.tensor([0, 2, NUM_CLASSES])
    # the same t and noise each time
    g = lambda: torch.Generator().manual_seed(1)
    ref = vfm_loss(model, idx, E, y, generator=g(), chunk=None)      # all logits at once, fp32
    want = torch.autograd.grad(ref, list(model.parameters()))
    net = model if head else logits_only(model)
    # chunks of 3 rows: the chunks split images and sub-positions
    loss = vfm_loss(net, idx, E, y, generator=g(), chunk=3 * K_)
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-9, name
    per, acc = vfm_loss(net, idx, E, y, per_image=True, generator=g(), chunk=3 * K_)
    per_ref, acc_ref = vfm_loss(model, idx, E, y, per_image=True, generator=g(), chunk=None)
    assert torch.allclose(per.mean(), loss) and torch.allclose(per, per_ref, rtol=1e-5)
    assert torch.equal(acc, acc_ref) and per.shape == acc.shape == (3,)


@pytest.mark.parametrize("patch_size, cfg_scale", [(2, 1.0), (2, 1.7), (1, 1.7)])
def test_chunked_sampler_gives_the_plain_samplers_codes(patch_size, cfg_scale):
    K_ = 64
    model, E = trained_like_model(patch_size, K_), codebook(K_)
    y = torch.tensor([0, 1, 2, NUM_CLASSES] * 4)
    g = lambda: torch.Generator().manual_seed(5)
    # all of pi at once, guidance on the logits
    want, path = sample_ode(model, E, y, GRID, 6, 0.9, cfg_scale, NUM_CLASSES, g(), chunk=None,
                              return_trajectory=True)
    for net, chunk in ((model, 5 * K_), (logits_only(model), 5 * K_), (model, 2**22)):
        got, got_path = sample_ode(net, E, y, GRID, 6, 0.9, cfg_scale, NUM_CLASSES, g(),
                                     chunk=chunk, return_trajectory=True)
        assert torch.equal(got, want)
        for key in path:
            assert torch.allclose(got_path[key], path[key], atol=1e-5), key
    assert len(torch.unique(want)) > 8                                  # not a degenerate sample
