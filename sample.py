"""
sample.py: see what a trained purrception model does; every picture goes into out_dir.

    python sample.py --out_dir=out-shapes                        # a row per class
    python sample.py --out_dir=out-cifar10 --class_label=cat     # an index, a name, or none
    python sample.py --out_dir=out-cifar10 --temperature=0.5,1.0 # a row each, same noise
    python sample.py --out_dir=out-cifar10 --uncertainty         # or --trajectory (PNG + GIF)

It loads out_dir/ckpt.pt (EMA weights), its objective's sampling function and its data folder's
tokenizer. Every sample has its own seed, (--seed, its index): the same noise on any device, and
the same images for any batch size (measured on CPUs; across devices the network's arithmetic may
differ). Time runs from t = 0 (noise) to 1 (data). Many samples, their npz and FID: sample_ddp.py.
"""

import math
import os
import unicodedata
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import baselines
import cli
import prepare_data
import purrception
import token_folder
import vq
from cli import UserError
from vq import tile


@dataclass
class SampleConfig:
    out_dir: str = os.path.join(purrception.HERE, "out-shapes")   # ckpt.pt in, samples out
    ckpt: str = ""                # checkpoint; '' means out_dir/ckpt.pt
    data_dir: str = ""            # tokenizer, class names; '' means the run's data folder
    class_label: str = "all"      # all (every class in turn) | an index | a name | none (or -1)
    seed: int = 0                 # same seed, same noise, same images
    steps: int = 0                # network calls; 0: the run's sample_steps (paper: 100; 250)
    cfg_scale: float = 0.0        # guidance s (1 = off, paper's best 1.3); 0: the run's
    solver: str = ""              # euler (the paper's) | dpm++2m (second order); '': the run's
    time_shift: float = 0.0       # time grid: 1 uniform, < 1 denser near the data; 0: the run's
    cfg_interval: str = ""        # guidance only for t in lo,hi; '': the run's (0,1: always)
    batch_size: int = 250         # images per sampler call (and per part of an npz)
    device: str = ""              # cuda | mps | cpu; '' picks the best available


@dataclass
class PictureConfig(SampleConfig):
    num_samples: int = 0          # 0: 8 a row in grids, 4 for --uncertainty
    temperature: str = ""         # tau, or a comma list for a row per value; '': the run's
    uncertainty: bool = False     # posterior entropy heatmaps beside the posterior mean
    trajectory: bool = False      # the decoded posterior mean over time: a PNG and a GIF
    frames: int = 6               # times shown by --uncertainty and --trajectory

# -----------------------------------------------------------------------------
# a checkpoint and its tokenizer, ready to sample from (here and in sample_ddp.py)


@dataclass
class Sampler:
    """What sampling needs of a trained run: its network, its objective and its tokenizer."""
    model: torch.nn.Module        # the EMA weights, in eval mode
    objective: purrception.Objective
    ckpt: dict
    E: torch.Tensor               # (K, d) codebook, on the model's device
    tokenizer: torch.nn.Module
    meta: dict
    data_dir: str
    grid: tuple                   # (h, w) tokens an image


def load_sampler(ckpt_path, data_dir="", device="cpu"):
    """A checkpoint and the data folder it trained on -> Sampler (refused where they differ)."""
    out = os.path.dirname(os.path.abspath(ckpt_path))     # out-<dataset> names its dataset
    dataset = os.path.basename(out)[4:] if os.path.basename(out).startswith("out-") else "NAME"
    flags = [f"--dataset={dataset}"] + [f"--out_dir={out}"] * (
        out != os.path.join(purrception.HERE, f"out-{dataset}"))
    ckpt = cli.load_checkpoint(ckpt_path, f"train one with "
                                          f"`{cli.command('purrception.py', *flags)}`")
    objective = baselines.get_objective(ckpt.get("objective", "purrception"))
    model = objective.build_model(**ckpt["model_args"])
    model.load_state_dict(ckpt["ema"])
    run_config = ckpt["config"]
    if not data_dir:               # the run's folder, or data/<dataset> here if made elsewhere
        data_dir = next((d for d in (run_config["data_dir"],
                                     prepare_data.data_path(run_config["dataset"]))
                         if os.path.exists(os.path.join(d, "meta.json"))), run_config["data_dir"])
    meta, tokenizer = token_folder.open_folder(data_dir, device, check=False)
    cli.same_tokenizer(ckpt, ckpt_path, meta, data_dir)
    E, a = tokenizer.codebook.to(device), ckpt["model_args"]
    # the generator's outputs index its own codebook: another tokenizer decodes them to noise
    if (tuple(E.shape), meta["num_classes"]) != ((a["K"], a["d"]), a["num_classes"]):
        raise UserError(f"{ckpt_path} was trained with K={a['K']} codes of d={a['d']} and "
                        f"{a['num_classes']} classes, but {data_dir} has K={E.shape[0]}, "
                        f"d={E.shape[1]}, {meta['num_classes']} classes; "
                        f"pass --data_dir=<the folder the run trained on>")
    return Sampler(model.to(device).eval(), objective, ckpt, E, tokenizer, meta, data_dir,
                   (meta["grid_h"], meta["grid_w"]))


def parse_label(class_label, meta):
    """'all' -> None; an index or a class name -> that index; 'none' or -1 -> the null class."""
    # names as typed on any system: macOS writes folder names decomposed (NFD)
    nfc = lambda text: unicodedata.normalize("NFC", text)
    names, class_label = [nfc(n) for n in meta["class_names"]], nfc(class_label)
    C = meta["num_classes"]
    if class_label in ("all", "none", "-1"):
        return None if class_label == "all" else C
    if class_label.isdigit() and int(class_label) >= C:
        raise UserError(f"--class_label={class_label} is out of range: the classes are 0..{C - 1}")
    if not class_label.isdigit() and class_label not in names:
        raise UserError(f"unknown class {class_label!r}; the classes are {', '.join(names)} "
                        f"(or an index, all, none)")
    return int(class_label) if class_label.isdigit() else names.index(class_label)


def sampler_from_flags(opt, device, temperatures=(), verbose=True):
    """SampleConfig flags -> (Sampler, opt with the run's steps and cfg_scale where unset, the
    label (None: every class in turn), the temperatures (the run's where none are given))."""
    ckpt_path = opt.ckpt or os.path.join(opt.out_dir, "ckpt.pt")
    sampler = load_sampler(ckpt_path, opt.data_dir, device)
    run_config, objective = sampler.ckpt["config"], sampler.objective
    temperatures = list(temperatures) or [run_config.get("temperature", 1.0)]
    if not objective.tempered and temperatures != [1.0]:
        raise UserError(f"--temperature: {ckpt_path} is a {objective.name} run, which has no "
                        f"posterior to sharpen")
    label = parse_label(opt.class_label, sampler.meta)
    # unset flags follow the run's; guidance towards the null class is no guidance: skip its cost
    cfg_scale = opt.cfg_scale or run_config.get("cfg_scale", 1.0)
    opt = replace(opt, steps=opt.steps or run_config.get("sample_steps", 100),
                  cfg_scale=1.0 if label == sampler.meta["num_classes"] else cfg_scale,
                  solver=opt.solver or run_config.get("solver", "euler"),
                  time_shift=opt.time_shift or run_config.get("time_shift", 1.0),
                  cfg_interval=opt.cfg_interval or run_config.get("cfg_interval", "0,1"))
    cli.check_ranges(opt, {k: purrception.RANGES[k] for k in ("solver", "time_shift",
                                                              "cfg_interval")})
    if not objective.ode and (opt.solver, opt.time_shift) != ("euler", 1.0):
        raise UserError(f"{ckpt_path} is a {objective.name} run, which samples with its own jumps "
                        f"on a uniform grid: drop --solver and --time_shift")
    if verbose:
        print(f"{ckpt_path} ({objective.name}, iter {sampler.ckpt['iter']}, EMA weights) on "
              f"{device}: {describe(opt)}, temperature {','.join(map(str, temperatures))}, seed "
              f"{opt.seed}")
    return sampler, opt, label, temperatures

# -----------------------------------------------------------------------------
# samples: a seed per sample, in batches


def solve(opt):
    """The sampler's solver settings in opt -> the keywords of Objective.sample."""
    return dict(solver=opt.solver, time_shift=opt.time_shift,
                cfg_interval=cli.interval(opt.cfg_interval))


def describe(opt):
    """How the samples are made, for every line that reports them."""
    return (f"{opt.solver} on {opt.steps} steps (time_shift {opt.time_shift}): {opt.steps} network "
            f"calls, cfg_scale {opt.cfg_scale} in t {opt.cfg_interval} (a guided call runs the "
            f"conditional and unconditional rows as one batch)")


def sample_noise(sampler, start, n, seed):
    """The starting noise (n, h, w, d) of samples start .. start + n - 1, each from its own CPU
    generator seeded by (seed, index): the same on any device, batch size and process count."""
    shape = (*sampler.grid, sampler.E.shape[1])
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(hash((seed, i))))
                        for i in range(start, start + n)])


@torch.no_grad()
def generate(sampler, labels, steps, temperature=1.0, cfg_scale=1.0, seed=0, batch_size=250,
             progress=False, start=0, **solver):
    """Labels (N,) of samples start .. start + N - 1 -> uint8 images (N, H, W, 3). Each sample's
    noise has its own seed (sample_noise); DFM, which starts from masks, draws its jumps from a
    generator seeded by (seed, the batch's first index). solver: see solve()."""
    out, starts = [], range(0, len(labels), batch_size)
    for i in cli.progress(starts, desc="sampling", unit="batch") if progress else starts:
        y = torch.as_tensor(labels[i:i + batch_size], device=sampler.E.device).long()
        g = torch.Generator().manual_seed(hash((seed, start + i)))
        noise = ({"noise": sample_noise(sampler, start + i, len(y), seed)}
                 if sampler.objective.noise == "normal" else {})      # DFM starts from masks
        with cli.autocast(sampler.E.device):
            idx = sampler.objective.sample(sampler.model, sampler.E, y, sampler.grid, steps,
                                           temperature, cfg_scale, sampler.meta["num_classes"], g,
                                           **noise, **solver)
        # the decoder 50 images at a time: at 256x256 its activations outweigh the sampler's
        out += [vq.to_uint8(sampler.tokenizer.decode(part)) for part in idx.split(50)]
    return np.concatenate(out)


def balanced_labels(n, num_classes, label):
    """n labels: all `label`, or every class in turn (class-balanced)."""
    return np.full(n, label) if label is not None else np.arange(n) % num_classes

# -----------------------------------------------------------------------------
# pictures: grids, temperature sweeps, uncertainty maps, trajectories


def colormap(x):
    """[0, 1] (any shape) -> uint8 RGB (..., 3), magma-like: black (certain) to pale yellow."""
    anchors = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]])
    at, x = np.linspace(0, 1, len(anchors)), np.clip(x, 0, 1)
    return np.stack([np.interp(x, at, a) for a in anchors.T], -1).round().astype(np.uint8)


def save_png(array, path, texts=(), cell=0, pad=2):
    """Write a uint8 image, with texts[i] in a white strip above column i (cell: its width)."""
    if texts:
        strip = Image.new("RGB", (array.shape[1], 12), "white")
        draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
        for i, text in enumerate(texts):
            draw.text((pad + i * (cell + pad), 1), text, fill=(0, 0, 0), font=font)
        array = np.concatenate([np.asarray(strip), array])
    cli.atomic_save(Image.fromarray(array).save, path)
    print(f"wrote {path}")
    return path


def draw_grid(sampler, opt, label, temps):
    """A row per class; or a row per temperature, the same noise in each (the paper's Figure 5)."""
    C, n, sweep = sampler.meta["num_classes"], opt.num_samples, len(temps) > 1
    if label is None and not sweep:
        ncol = max(1, n // C) if n else 8
        labels = np.repeat(np.arange(C), ncol)
        print("rows: " + ", ".join(sampler.meta["class_names"]))
    else:
        labels = balanced_labels(n or 8, C, label)
        ncol = len(labels) if sweep else min(8, len(labels))
    if sweep:
        print("rows: temperature " + ", ".join(map(str, temps)))
    images = [generate(sampler, labels, opt.steps, t, opt.cfg_scale, opt.seed, opt.batch_size,
                       **solve(opt))
              for t in temps]
    name = "samples_temperature.png" if sweep else "samples.png"
    return save_png(tile(np.concatenate(images), ncol), os.path.join(opt.out_dir, name))


@torch.no_grad()
def posterior_path(sampler, opt, label, temperature, n):
    """n samples with their trajectory -> (trajectory dict, final images (n, H, W, 3), the steps
    shown (opt.frames of them, evenly from the first to the last), a function: step -> the decoded
    posterior mean mu_t = pi_t @ E (n, H, W, 3), the model's current guess, where the velocity
    (mu_t - z) / (1 - t) points)."""
    C, device = sampler.meta["num_classes"], sampler.E.device
    y = torch.as_tensor(balanced_labels(n, C, label), device=device).long()
    with cli.autocast(device):
        idx, traj = sampler.objective.sample(
            sampler.model, sampler.E, y, sampler.grid, opt.steps, temperature, opt.cfg_scale, C,
            noise=sample_noise(sampler, 0, n, opt.seed), return_trajectory=True, **solve(opt))
    shown = np.unique(np.linspace(0, opt.steps - 1, opt.frames).round().astype(int))
    mean = lambda s: vq.to_uint8(sampler.tokenizer.decode_z(traj["mu"][s].float()))
    return traj, vq.to_uint8(sampler.tokenizer.decode(idx)), shown, mean


def save_rows(columns, texts, path):
    """Columns of (n, S, S, 3) images, captioned -> a PNG with a row per sample."""
    final = columns[-1]
    images = np.stack(columns, axis=1).reshape(-1, *final.shape[1:])
    return save_png(tile(images, len(columns)), path, texts, final.shape[1])


def draw_trajectory(sampler, opt, label, temperature):
    """A row per sample: the decoded posterior mean at a few times t, then the final image; and a
    GIF of every step, lingering on the result. -> (PNG path, trajectory dict)."""
    n = opt.num_samples or 8
    traj, final, shown, mean = posterior_path(sampler, opt, label, temperature, n)
    texts = [f"{float(traj['t'][s]):.2f}" if i else f"t={float(traj['t'][s]):.2f}"
             for i, s in enumerate(shown)] + ["final"]
    path = save_rows([mean(s) for s in shown] + [final], texts,
                     os.path.join(opt.out_dir, "trajectory.png"))
    frames = [Image.fromarray(tile(x, min(n, 8)))
              for x in [mean(s) for s in range(len(traj["mu"]))] + [final] * 15]
    gif = os.path.join(opt.out_dir, "trajectory.gif")
    cli.atomic_save(lambda tmp: frames[0].save(tmp, save_all=True, append_images=frames[1:],
                                               duration=50, loop=0), gif)
    print(f"wrote {gif}")
    return path, traj


def draw_uncertainty(sampler, opt, label, temperature):
    """A row per sample: at a few times t, the decoded posterior mean and beside it a heatmap of
    the posterior entropy H(pi_t) per position; then the final image. -> (PNG path, trajectory)."""
    traj, final, shown, mean = posterior_path(sampler, opt, label, temperature,
                                              opt.num_samples or 4)
    S, log_K, columns, texts = final.shape[1], np.log(sampler.E.shape[0]), [], []
    for s in shown:
        t = float(traj["t"][s])                                      # from 0 to 1 - dt
        H = traj["entropy"][s].float().numpy()                       # (n, h, w) nats in [0, log K]
        f = S // H.shape[-1]                                         # a token covers f x f pixels
        columns += [mean(s), colormap(H.repeat(f, axis=1).repeat(f, axis=2) / log_K)]
        texts += [f"{t:.2f}" if texts else f"t={t:.2f}", ""]
        h = H.mean()
        print(f"t={t:.2f}: posterior entropy {h:.2f} nats on average, {h / log_K:.0%} of log K "
              f"(exp(H): about {np.exp(h):.0f} plausible codes a position)")
    path = save_rows(columns + [final], texts + ["final"],
                     os.path.join(opt.out_dir, "uncertainty.png"))
    return path, traj


def main(argv):
    """-> the PNG path, or (path, trajectory dict) for --uncertainty and --trajectory. It holds
    out_dir while it writes there (one writer, as a training does)."""
    opt = cli.parse_args(argv, PictureConfig(), doc=__doc__)
    at_least = lambda lo, names: {k: (lambda v: v >= lo, f"at least {lo}") for k in names}
    cli.check_ranges(opt, at_least(0, ("steps", "num_samples")) | at_least(1, ("frames",
                                                                               "batch_size")))
    try:
        temps = [float(t) for t in opt.temperature.split(",")] if opt.temperature else []
    except ValueError:
        raise UserError(f"--temperature takes numbers separated by commas, "
                        f"got {opt.temperature!r}") from None
    if temps and not all(math.isfinite(t) and t > 0 for t in temps):
        raise UserError(f"temperatures must be positive finite numbers, got {opt.temperature}")
    device = cli.pick_device(opt.device)
    ckpt_path = opt.ckpt or os.path.join(opt.out_dir, "ckpt.pt")
    instead = f"sample into another folder meanwhile: --ckpt={ckpt_path} --out_dir=OTHER"
    with cli.one_writer(opt.out_dir, instead):
        sampler, opt, label, temps = sampler_from_flags(opt, device, temps)
        if not sampler.objective.shows_posterior and (opt.uncertainty or opt.trajectory):
            raise UserError(f"--uncertainty and --trajectory draw Purrception's posterior; "
                            f"{ckpt_path} is a {sampler.objective.name} run")
        os.makedirs(opt.out_dir, exist_ok=True)
        drawn = [fn(sampler, opt, label, temps[0])          # both: the uncertainty is returned
                 for fn, on in ((draw_trajectory, opt.trajectory),
                                (draw_uncertainty, opt.uncertainty)) if on]
        return drawn[-1] if drawn else draw_grid(sampler, opt, label, temps)


if __name__ == "__main__":
    cli.run(main)
