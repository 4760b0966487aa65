"""
sample.py: see what a trained purrception model does; every picture goes into out_dir.

    python sample.py --out_dir=out-shapes                        # a row per class
    python sample.py --out_dir=out-cifar10 --class_label=cat     # an index, a name, or none
    python sample.py --out_dir=out-cifar10 --temperature=0.5,1.0 # a row each, same noise
    python sample.py --out_dir=out-cifar10 --uncertainty         # or --trajectory (PNG + GIF)
    python sample.py --out_dir=out-cifar10 --fid --num_samples=10000  # or --save_npz=s.npz
    torchrun --nproc_per_node=8 sample.py --out_dir=RUN --num_samples=50000 --save_npz=samples.npz

It loads out_dir/ckpt.pt (EMA weights), its objective's sampler and its data folder's tokenizer.
Every sample has its own seed, (--seed, its index): the same noise on any device, and the same
images for any batch size and any number of processes (measured on CPUs; across devices the
network's arithmetic may differ). Time runs from t = 0 (noise) to 1 (data).
--save_npz writes the ADM evaluator's format (arr_0: uint8 images (N, H, W, 3), arr_1: labels)
once, atomically, when every part of --batch_size samples is done; the parts wait in FILE.parts/,
so a killed run started again with the same flags samples only what is missing.
"""

import math
import os
import shutil
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import baselines
import cli
import fid
import prepare_data
import purrception
import vq
from cli import UserError
from vq import tile


DECODE_BATCH = 50                 # images per tokenizer decode


@dataclass
class SampleConfig:
    out_dir: str = os.path.join(purrception.HERE, "out-shapes")   # ckpt.pt in, pictures out
    ckpt: str = ""                # checkpoint; '' means out_dir/ckpt.pt
    data_dir: str = ""            # tokenizer, class names; '' means the run's data folder
    class_label: str = "all"      # all (a row per class) | an index | a name | none (or -1)
    num_samples: int = 0          # 0: 8 a row in grids, 4 for --uncertainty, 10000 for npz/FID
    seed: int = 0                 # same seed, same noise, same images
    steps: int = 0                # Euler steps; 0: the run's sample_steps (paper: 100; 250)
    temperature: str = ""         # tau, or a comma list for a row per value; '': the run's
    cfg_scale: float = 0.0        # guidance s (1 = off, paper's best 1.3); 0: the run's
    uncertainty: bool = False     # posterior entropy heatmaps beside the posterior mean
    trajectory: bool = False      # the decoded posterior mean over time: a PNG and a GIF
    frames: int = 6               # times shown by --uncertainty and --trajectory
    save_npz: str = ""            # num_samples images + labels to this .npz (relative: in out_dir)
    fid: bool = False             # FID of num_samples samples vs train images (or --fid_ref_*)
    fid_model: str = ""           # TorchScript Inception; '': torch-fidelity or fid-helper
    fid_ref: int = 0              # real images for the FID reference; 0: all of train
    fid_ref_stats: str = ""       # FID against this npz's mu/sigma (ADM's VIRTUAL_imagenet256...)
    fid_ref_dir: str = ""         # FID against this folder of images (the official code's choice)
    batch_size: int = 250         # images per sampler call and per part of --save_npz
    device: str = ""              # cuda | mps | cpu; '' picks the best available


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
    """A checkpoint and the data folder it trained on -> Run; a UserError where they do not fit."""
    out = os.path.dirname(os.path.abspath(ckpt_path))     # out-<dataset> names its dataset
    dataset = os.path.basename(out)[4:] if os.path.basename(out).startswith("out-") else "NAME"
    flags = [f"--dataset={dataset}"] + [f"--out_dir={out}"] * (
        out != os.path.join(purrception.HERE, f"out-{dataset}"))
    ckpt = cli.load_checkpoint(ckpt_path, f"train one with "
                                                  f"`{cli.command('purrception.py', *flags)}`")
    objective = baselines.get_objective(ckpt.get("objective", "purrception"))
    model = objective.build_model(**ckpt["model_args"])
    model.load_state_dict(ckpt["ema"])
    run = ckpt["config"]
    if not data_dir:               # the run's folder, or data/<dataset> here if made elsewhere
        data_dir = next((d for d in (run["data_dir"], prepare_data.data_path(run["dataset"]))
                         if os.path.exists(os.path.join(d, "meta.json"))), run["data_dir"])
    meta, tokenizer = prepare_data.open_folder(data_dir, device, check=False)
    E, a = tokenizer.codebook.to(device), ckpt["model_args"]
    # the generator's outputs index its own codebook: another tokenizer decodes them to noise
    if (tuple(E.shape), meta["num_classes"]) != ((a["K"], a["d"]), a["num_classes"]):
        raise UserError(f"{ckpt_path} was trained with K={a['K']} codes of d={a['d']} and "
                        f"{a['num_classes']} classes, but {data_dir} has K={E.shape[0]}, "
                        f"d={E.shape[1]}, {meta['num_classes']} classes; "
                        f"pass --data_dir=<the folder the run trained on>")
    return Run(model.to(device).eval(), objective, ckpt, E, tokenizer, meta, data_dir)


def parse_label(class_label, meta):
    """'all' -> None; an index or a class name -> that index; 'none' or -1 -> the null class."""
    names, C = list(meta["class_names"]), meta["num_classes"]
    if class_label in ("all", "none", "-1"):
        return None if class_label == "all" else C
    if class_label.isdigit():
        if int(class_label) >= C:
            raise UserError(f"--class_label={class_label} is out of range: the classes are "
                            f"0..{C - 1}")
        return int(class_label)
    if class_label not in names:
        raise UserError(f"unknown class {class_label!r}; the classes are {', '.join(names)} "
                        f"(or an index, all, none)")
    return names.index(class_label)


def sample_noise(run, start, n, seed):
    """The starting noise (n, h, w, d) of samples start .. start + n - 1, each from its own CPU
    generator seeded by (seed, index): the same on any device, batch size and process count."""
    shape = (*run.grid, run.E.shape[1])
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(hash((seed, i))))
                        for i in range(start, start + n)])


@torch.no_grad()
def generate(run, labels, steps, temperature=1.0, cfg_scale=1.0, seed=0, batch_size=250,
             progress=False, start=0):
    """Labels (N,) of samples start .. start + N - 1 -> uint8 images (N, H, W, 3) from the run's
    sampler. Each sample's noise has its own seed (sample_noise); DFM, which starts from masks,
    draws its jumps from a generator seeded by (seed, the batch's first index)."""
    out, starts = [], range(0, len(labels), batch_size)
    for i in cli.progress(starts, desc="sampling", unit="batch") if progress else starts:
        y = torch.as_tensor(labels[i:i + batch_size], device=run.E.device).long()
        g = torch.Generator().manual_seed(hash((seed, start + i)))
        noise = ({} if run.objective.name == "dfm" else
                 {"noise": sample_noise(run, start + i, len(y), seed)})
        with cli.autocast(run.E.device):
            idx = run.objective.sample(run.model, run.E, y, run.grid, steps, temperature,
                                       cfg_scale, run.meta["num_classes"], g, **noise)
        # the decoder a few images at a time: at 256x256 its activations outweigh the sampler's
        out += [vq.to_uint8(run.tokenizer.decode(part)) for part in idx.split(DECODE_BATCH)]
    return np.concatenate(out)


def balanced_labels(n, num_classes, label):
    """n labels: all `label`, or every class in turn (class-balanced)."""
    return np.full(n, label) if label is not None else np.arange(n) % num_classes


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


def draw_grid(run, opt, label, temps):
    """A row per class; or a row per temperature, the same noise in each (the paper's Figure 5)."""
    C, n, sweep = run.meta["num_classes"], opt.num_samples, len(temps) > 1
    if label is None and not sweep:
        ncol = max(1, n // C) if n else 8
        labels = np.repeat(np.arange(C), ncol)
        print("rows: " + ", ".join(run.meta["class_names"]))
    else:
        labels = balanced_labels(n or 8, C, label)
        ncol = len(labels) if sweep else min(8, len(labels))
    if sweep:
        print("rows: temperature " + ", ".join(map(str, temps)))
    images = [generate(run, labels, opt.steps, t, opt.cfg_scale, opt.seed, opt.batch_size)
              for t in temps]
    name = "samples_temperature.png" if sweep else "samples.png"
    return save_png(tile(np.concatenate(images), ncol), os.path.join(opt.out_dir, name))


@torch.no_grad()
def posterior_path(run, opt, label, temperature, n):
    """n samples with the sampler's trajectory -> (trajectory dict, final images (n, H, W, 3), a
    function: step -> the decoded posterior mean mu_t = pi_t @ E (n, H, W, 3), the model's current
    guess, where the velocity (mu_t - z) / (1 - t) points)."""
    y = torch.as_tensor(balanced_labels(n, run.meta["num_classes"], label), device=run.E.device)
    with cli.autocast(run.E.device):
        idx, traj = purrception.euler_sample(
            run.model, run.E, y.long(), run.grid, opt.steps, temperature, opt.cfg_scale,
            run.meta["num_classes"], noise=sample_noise(run, 0, n, opt.seed),
            return_trajectory=True)
    mean = lambda s: vq.to_uint8(run.tokenizer.decode_z(traj["mu"][s].float()))
    return traj, vq.to_uint8(run.tokenizer.decode(idx)), mean


def frame_steps(opt):
    """The steps shown: opt.frames of them, evenly from the first to the last."""
    return np.unique(np.linspace(0, opt.steps - 1, opt.frames).round().astype(int))


def save_rows(columns, texts, path):
    """Columns of (n, S, S, 3) images, captioned -> a PNG with a row per sample."""
    final = columns[-1]
    images = np.stack(columns, axis=1).reshape(-1, *final.shape[1:])
    return save_png(tile(images, len(columns)), path, texts, final.shape[1])


def draw_trajectory(run, opt, label, temperature):
    """A row per sample: the decoded posterior mean at a few times t, then the final image; and a
    GIF of every step, lingering on the result. -> (PNG path, trajectory dict)."""
    n = opt.num_samples or 8
    traj, final, mean = posterior_path(run, opt, label, temperature, n)
    steps = frame_steps(opt)
    texts = [f"{float(traj['t'][s]):.2f}" if i else f"t={float(traj['t'][s]):.2f}"
             for i, s in enumerate(steps)] + ["final"]
    path = save_rows([mean(s) for s in steps] + [final], texts,
                     os.path.join(opt.out_dir, "trajectory.png"))
    frames = [Image.fromarray(tile(x, min(n, 8)))
              for x in [mean(s) for s in range(len(traj["mu"]))] + [final] * 15]
    gif = os.path.join(opt.out_dir, "trajectory.gif")
    cli.atomic_save(lambda tmp: frames[0].save(tmp, save_all=True, append_images=frames[1:],
                                               duration=50, loop=0), gif)
    print(f"wrote {gif}")
    return path, traj


def draw_uncertainty(run, opt, label, temperature):
    """A row per sample: at a few times t, the decoded posterior mean and beside it a heatmap of
    the posterior entropy H(pi_t) per position; then the final image. -> (PNG path, trajectory)."""
    traj, final, mean = posterior_path(run, opt, label, temperature, opt.num_samples or 4)
    S, log_K, columns, texts = final.shape[1], np.log(run.E.shape[0]), [], []
    for s in frame_steps(opt):
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

# -----------------------------------------------------------------------------
# many samples: the ADM evaluator's npz, made in parts by every process (torchrun), and FID


def write_npz(path, **arrays):
    """np.savez's layout to path, atomically (cli.atomic_save: a full disk or a file-size limit is
    one line, the old file intact), with fixed zip dates: the same arrays give the same bytes."""
    def write(tmp):
        with zipfile.ZipFile(tmp, "w") as zf:
            for name, array in arrays.items():
                with zf.open(zipfile.ZipInfo(f"{name}.npy"), "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
    cli.atomic_save(write, path, size=sum(np.asarray(a).nbytes for a in arrays.values()))


def check_npz_path(path):
    """--save_npz names a .npz file in an existing folder: refused before any sampling."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise UserError(f"--save_npz={path} is a folder; name a file in it, e.g. "
                        f"--save_npz={os.path.join(path, 'samples.npz')}")
    if not path.endswith(".npz"):
        raise UserError(f"--save_npz={path}: name a .npz file (the ADM evaluator's format)")
    if not os.path.isdir(folder):
        raise UserError(f"--save_npz={path}: the folder {folder} does not exist; create it first")


def sample_in_parts(run, opt, labels, temperature, path, rank=0, world=1):
    """Sample `labels` in parts of opt.batch_size; part j is made by process j % world and saved in
    path.parts/ as it finishes (a part already there is kept). Process 0 then waits for every part,
    writes path once and removes the parts. -> (images, labels, how many of them were in parts
    already there when it started) on process 0, None elsewhere."""
    parts_dir, n_parts = path + ".parts", math.ceil(len(labels) / opt.batch_size)
    spec = {"ckpt": os.path.abspath(opt.ckpt or os.path.join(opt.out_dir, "ckpt.pt")),
            "iter": run.ckpt["iter"], "seed": opt.seed, "steps": opt.steps,
            "temperature": temperature, "cfg_scale": opt.cfg_scale, "num_samples": len(labels),
            "class_label": opt.class_label, "batch_size": opt.batch_size}
    spec_path = os.path.join(parts_dir, "spec.json")
    if os.path.exists(spec_path) and cli.read_json(spec_path) != spec:
        old = cli.read_json(spec_path)
        diff = ", ".join(f"{k}={old.get(k)}" for k in spec if old.get(k) != spec[k])
        raise UserError(f"{parts_dir} holds parts of another run ({diff}); rerun with its flags "
                        f"or delete the folder")
    if rank == 0:                                         # the others wait for the spec
        os.makedirs(parts_dir, exist_ok=True)
        cli.write_json(spec, spec_path)
    while not os.path.exists(spec_path):
        time.sleep(0.2)
    part = lambda j: os.path.join(parts_dir, f"part_{j:06d}.npz")
    kept = sum(min(len(labels), (j + 1) * opt.batch_size) - j * opt.batch_size
               for j in range(n_parts) if os.path.exists(part(j)))
    mine = [j for j in range(rank, n_parts, world) if not os.path.exists(part(j))]
    if len(mine) < len(range(rank, n_parts, world)):
        print(f"[process {rank}] {len(range(rank, n_parts, world)) - len(mine)} parts already "
              f"in {parts_dir}, {len(mine)} to go")
    for j in cli.progress(mine, desc=f"[process {rank}] sampling", unit="part"):
        lo, hi = j * opt.batch_size, min(len(labels), (j + 1) * opt.batch_size)
        images = generate(run, labels[lo:hi], opt.steps, temperature, opt.cfg_scale, opt.seed,
                          opt.batch_size, start=lo)
        write_npz(part(j), arr_0=images, arr_1=labels[lo:hi])
    if rank != 0:
        return None
    while not all(os.path.exists(part(j)) for j in range(n_parts)):   # the other processes'
        time.sleep(1)
    images = None
    for j in range(n_parts):                  # filled in place: one copy of the images in memory
        with np.load(part(j)) as f:
            images = (np.empty((len(labels), *f["arr_0"].shape[1:]), np.uint8) if images is None
                      else images)
            images[j * opt.batch_size:(j + 1) * opt.batch_size] = f["arr_0"]
    write_npz(path, arr_0=images, arr_1=labels)
    shutil.rmtree(parts_dir)
    return images, labels, kept


def many_samples(run, opt, label, temperature, rank=0, world=1):
    """num_samples class-balanced images for npz and FID -> {"images", "labels"[, "fid"]} (None on
    processes other than the first)."""
    n, C, t0, kept = opt.num_samples or 10000, run.meta["num_classes"], time.time(), 0
    labels = balanced_labels(n, C, label).astype(np.int64)
    if opt.save_npz:
        path = os.path.join(opt.out_dir, opt.save_npz)
        done = sample_in_parts(run, opt, labels, temperature, path, rank, world)
        if done is None:
            return None
        images, kept = done[0], done[2]
        print(f"wrote {path}: arr_0 {images.shape} uint8 images, arr_1 labels (index {C} is the "
              f"null class)")
    else:
        images = generate(run, labels, opt.steps, temperature, opt.cfg_scale, opt.seed,
                          opt.batch_size, progress=True)
    dt = time.time() - t0
    print(f"{n - kept} samples in {dt:.1f}s ({(n - kept) / dt:.1f} images/s, {world} process"
          f"{'es' * (world > 1)})" + f", {kept} more from the parts of an earlier run" * (kept > 0))
    result = {"images": images, "labels": labels}
    if opt.fid:                  # Inception runs at 299x299: 50 images a batch keep it near 2 GB
        result["fid"], protocol = fid.compute_fid(images, run.data_dir, opt.fid_model or None,
                                                  opt.fid_ref or None, 50, run.E.device,
                                                  ref_stats=opt.fid_ref_stats,
                                                  ref_dir=opt.fid_ref_dir)
        print(f"FID {result['fid']:.2f} ({protocol}); {opt.steps} steps, temperature "
              f"{temperature}, cfg_scale {opt.cfg_scale} (the tokenizer caps it: see its "
              f"reconstruction FID in the README)")
    return result


def main(argv):
    """-> a PNG path, (path, trajectory) for --uncertainty/--trajectory, or a dict for npz/FID (None
    on the processes of a torchrun other than the first). What writes into out_dir holds it (one
    writer, as a training does): the first process under torchrun (the others only add parts to
    FILE.parts/), and not a bare --fid."""
    opt = cli.parse_args(argv, SampleConfig(), doc=__doc__)
    ckpt_path = opt.ckpt or os.path.join(opt.out_dir, "ckpt.pt")
    writes = int(os.environ.get("RANK", 0)) == 0 and (opt.save_npz or not opt.fid)
    instead = f"sample into another folder meanwhile: --ckpt={ckpt_path} --out_dir=OTHER"
    with cli.one_writer(opt.out_dir, instead) if writes else nullcontext():
        return draw(opt)


def draw(opt):
    """The work of main, once out_dir is held."""
    at_least = lambda lo, names: {k: (lambda v: v >= lo, f"at least {lo}") for k in names}
    cli.check_ranges(opt, at_least(0, ("steps", "num_samples", "fid_ref"))
                     | at_least(1, ("frames", "batch_size")))
    try:
        temps = [float(t) for t in opt.temperature.split(",")] if opt.temperature else []
    except ValueError:
        raise UserError(f"--temperature takes numbers separated by commas, "
                        f"got {opt.temperature!r}") from None
    if temps and not all(math.isfinite(t) and t > 0 for t in temps):
        raise UserError(f"temperatures must be positive finite numbers, got {opt.temperature}")
    if (opt.save_npz or opt.fid) and (opt.trajectory or opt.uncertainty):
        raise UserError("--trajectory and --uncertainty draw a few samples, --save_npz and --fid "
                        "many: run them as two commands")
    if opt.save_npz:
        check_npz_path(os.path.join(opt.out_dir, opt.save_npz))
    rank, _, world, device = cli.setup_distributed(opt.device)
    if world > 1 and not opt.save_npz:
        raise UserError("under torchrun pass --save_npz=FILE: the processes meet in FILE.parts/")
    if world > 1 and opt.fid:
        raise UserError("under torchrun, write --save_npz and score it afterwards with "
                        "`python fid.py --samples=FILE` (FID runs in one process)")
    ckpt_path = opt.ckpt or os.path.join(opt.out_dir, "ckpt.pt")
    run = load_run(ckpt_path, opt.data_dir, device)
    config, objective = run.ckpt["config"], run.objective.name
    if objective != "purrception" and (opt.uncertainty or opt.trajectory):
        raise UserError(f"--uncertainty and --trajectory draw Purrception's posterior; {ckpt_path} "
                        f"is a {objective} run")
    temps = temps or [config.get("temperature", 1.0)]          # unset flags follow the run's
    if objective.startswith("cfm") and temps != [1.0]:
        raise UserError(f"--temperature: {ckpt_path} is a {objective} run, which has no posterior "
                        f"to sharpen")
    label = parse_label(opt.class_label, run.meta)
    # guidance towards the null class is no guidance: skip its cost
    cfg_scale = opt.cfg_scale or config.get("cfg_scale", 1.0)
    opt = replace(opt, steps=opt.steps or config.get("sample_steps", 100),
                  cfg_scale=1.0 if label == run.meta["num_classes"] else cfg_scale)
    if rank == 0:
        print(f"{ckpt_path} ({objective}, iter {run.ckpt['iter']}, EMA weights) on {device}: "
              f"{opt.steps} steps, temperature {','.join(map(str, temps))}, cfg_scale "
              f"{opt.cfg_scale}, seed {opt.seed}")
    os.makedirs(opt.out_dir, exist_ok=True)
    if opt.fid:                                  # its extractor and reference, before sampling
        fid.check_reference(run.data_dir, opt.fid_model or None, opt.fid_ref_stats,
                            opt.fid_ref_dir)
    if opt.save_npz or opt.fid:
        return many_samples(run, opt, label, temps[0], rank, world)
    drawn = [fn(run, opt, label, temps[0])          # both: the uncertainty is returned
             for fn, on in ((draw_trajectory, opt.trajectory), (draw_uncertainty,
                                                               opt.uncertainty)) if on]
    return drawn[-1] if drawn else draw_grid(run, opt, label, temps)


if __name__ == "__main__":
    cli.run(main)
