"""Tests for compare.py: arms in stages on a fake token folder, FID with a stub extractor, the
iterations ratio."""

import csv
import math
import shutil

import numpy as np
import pytest
import torch

import baselines
import cli
import compare
import purrception
from conftest import StubExtractor

TINY = ("--device=cpu --n_layer=1 --n_head=2 --n_embd=32 --batch_size=4 --warmup_iters=2 "
        "--lr=1e-3 --ema_decay=0.9 --eval_iters=2 --sample_steps=2 --grid_cols=2")


# torch.jit: still the API of TorchScript files
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_staged_arms_measure_every_stage_and_match_a_straight_run(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    images = np.random.default_rng(0).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
    images.tofile(data / "train_images.u8")
    stub = str(tmp_path / "stub.pt")
    torch.jit.script(StubExtractor().eval()).save(stub)
    out = tmp_path / "cmp"
    argv = [f"--out_dir={out}", "--dataset=fake", f"--train_flags={TINY} --data_dir={data}",
            "--iters=3,6", "--seeds=0,1", "--objectives=purrception,dfm", "--fid_samples=6",
            "--fid_ref=16", "--steps=2", "--bootstrap=3", f"--fid_model={stub}"]
    compare.main(argv)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["arm"], int(r["seed"]), int(r["iter"])) for r in rows] == [
        (o, s, i) for s in (0, 1) for o in ("purrception", "dfm") for i in (3, 6)]
    # (the standard error's value: test_the_fid_standard_error_is_the_bootstrap_spread...)
    assert all(math.isfinite(float(r["fid"])) and math.isfinite(float(r["fid_se"])) for r in rows)
    printed = capsys.readouterr().out
    # the report
    assert "| purrception | 6 |" in printed and "iterations ratio vs dfm" in printed
    # stages resume bit-exactly: the staged arm ends with the weights of one straight
    # 6-iteration run
    straight = tmp_path / "straight"
    flags = TINY.split() + [f"--data_dir={data}", "--dataset=fake", "--objective=dfm",
                            f"--out_dir={straight}", "--max_iters=6", "--eval_interval=6",
                            "--seed=1"]
    purrception.train(cli.parse_args(flags, baselines.BaselineConfig()),
                      baselines.get_objective("dfm"))
    a, b = (torch.load(p / "ckpt.pt", weights_only=True)["model"]
            for p in (out / "dfm-s1", straight))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a second run finds every stage measured and adds nothing; a tagged arm is an arm of its own
    compare.main(argv)
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 8
    compare.main(argv[:5] + ["--objectives=purrception", "--seeds=0", "--tag=official",
                             "--extra_flags=--time_embed=official"] + argv[6:])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["arm"] for r in rows[8:]] == ["purrception-official"] * 2
    assert torch.load(out / "purrception-official-s0" / "ckpt.pt", weights_only=True)["model_args"][
        "time_embed"] == "official"
    with pytest.raises(cli.UserError, match="purrception, cfm, cfm_endpoint, dfm"):
        compare.main(argv[:-1] + ["--objectives=purrception,mdlm"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_nfe_sweep_scores_every_solver_grid_and_guidance_once(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    np.random.default_rng(0).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8).tofile(
        data / "train_images.u8")
    stub = str(tmp_path / "stub.pt")
    torch.jit.script(StubExtractor().eval()).save(stub)
    out = tmp_path / "cmp"
    argv = [f"--out_dir={out}", "--dataset=fake", f"--train_flags={TINY} --data_dir={data}",
            "--iters=3", "--seeds=0", "--objectives=purrception,dfm", "--fid_samples=6",
            "--fid_ref=16", "--steps=2", "--bootstrap=3", f"--fid_model={stub}", "--nfe=1,2,4",
            "--time_shifts=1,0.5", "--cfg_scales=1,1.5"]
    compare.main(argv)
    rows = list(csv.DictReader(open(out / "nfe.csv")))
    grid = {(r["arm"], r["cfg_scale"], r["solver"], r["time_shift"], r["nfe"]) for r in rows}
    # purrception: 2 guidance x 2 solvers x 2 grids x 3 NFE; dfm keeps its own sampler and grid
    assert len(rows) == len(grid) == 24 + 6
    assert ("dfm", "1.5", "euler", "1", "4") in grid and not any(
        g[0] == "dfm" and (g[2], g[3]) != ("euler", "1") for g in grid)
    assert all(math.isfinite(float(r["fid"])) for r in rows)
    printed = capsys.readouterr().out
    assert "| purrception | 1.5 | dpm++2m | 0.5 |" in printed       # the table, a row a series
    compare.main(argv)                                     # every point there: nothing is redone
    assert len(list(csv.DictReader(open(out / "nfe.csv")))) == 30


def test_the_fid_standard_error_is_the_bootstrap_spread_and_shrinks_with_more_samples():
    rng = np.random.default_rng(0)
    ref = compare.fid.feature_stats(rng.normal(size=(2000, 3)))
    few, many = rng.normal(size=(40, 3)) + 0.5, rng.normal(size=(640, 3)) + 0.5
    (fid_few, se_few), (fid_many, se_many) = (compare.fid_with_error(f, ref, 200, 0)
                                              for f in (few, many))
    # 16x the samples: about a quarter the s.e.
    assert 0 < se_many < se_few / 2
    # a mean shift of 0.5 in 3 dims: FID 0.75
    assert abs(fid_many - 0.75) < 3 * se_many + 0.05


def test_iterations_to_reach_a_fid_interpolate_in_log_iterations():
    curve = {100: 200.0, 200: 150.0, 400: 100.0}
    assert compare.iters_to_reach(curve, 150.0) == pytest.approx(200)
    # halfway in log(iter)
    assert compare.iters_to_reach(curve, 175.0) == pytest.approx(100 * math.sqrt(2))
    assert compare.iters_to_reach(curve, 250.0) == 0
    assert math.isnan(compare.iters_to_reach(curve, 50.0))
    # theirs reaches 150 at its last stage (400); ours reaches 150 at 200: a ratio of 2,
    # exactly without noise
    ours = {i: (f, 1e-9, [f]) for i, f in curve.items()}
    theirs = {100: (300.0, 1e-9, [300.0]), 400: (150.0, 1e-9, [150.0])}
    ratio, lo, hi = compare.speedup(ours, theirs)
    assert ratio == pytest.approx(2)
    assert lo == pytest.approx(2, rel=1e-3) and hi == pytest.approx(2, rel=1e-3)
    # their endpoint is uncertain
    noisy = {100: (300.0, 1e-9, [300.0]), 400: (150.0, 10.0, [140.0, 160.0])}
    ratio, lo, hi = compare.speedup(ours, noisy)
    assert lo < ratio < hi


def test_curves_average_seeds_and_add_their_spread_to_the_sample_noise():
    rows = [dict(arm="a", iter="10", fid=str(f), fid_se="0.5") for f in (10.0, 12.0)]
    mean, se, each = compare.curves(rows)["a"][10]
    assert mean == 11 and se == pytest.approx(math.sqrt((2 + 0.25) / 2)) and each == [10.0, 12.0]
    # one seed: the bootstrap s.e.
    assert compare.curves(rows[:1])["a"][10][1] == 0.5
