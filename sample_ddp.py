"""
sample_ddp.py: many samples from a trained purrception model, on one GPU or many (torchrun), into
the ADM evaluator's npz, then their FID (DiT's sample_ddp.py).

    python sample_ddp.py --out_dir=out-cifar10 --num_samples=50000 --fid
    torchrun --standalone --nproc_per_node=8 sample_ddp.py --out_dir=out-cifar10 \
        --num_samples=50000 --save_npz=samples.npz --fid

--save_npz (in out_dir) gets arr_0: uint8 images (N, H, W, 3), arr_1: labels, once, atomically,
when every part of --batch_size samples waiting in FILE.parts/ is done: a killed run started again
samples only what is missing. A seed per sample (sample.sample_noise): the same bytes for any
batch size and number of processes. Score a file later with `python fid.py --samples=FILE`.
"""

import math
import os
import shutil
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

import cli
import fid
import sample
from cli import UserError


@dataclass
class ManySamplesConfig(sample.SampleConfig):
    num_samples: int = 50000      # class-balanced samples (every class in turn, or --class_label)
    temperature: float = 0.0      # tau; 0: the run's
    save_npz: str = "samples.npz"  # the samples, in ADM's npz (relative: in out_dir)
    fid: bool = False             # FID of the samples vs train images (or --fid_ref_*)
    fid_model: str = ""           # TorchScript Inception; '': torch-fidelity or fid-helper
    fid_ref: int = 0              # real images for the FID reference; 0: all of train
    fid_ref_stats: str = ""       # FID against this npz's mu/sigma (ADM's VIRTUAL_imagenet256...)
    fid_ref_dir: str = ""         # FID against this folder of images (the official code's choice)

# -----------------------------------------------------------------------------
# the npz: checked before sampling, written in parts by every process, assembled once


def check_npz_path(path, out_dir):
    """--save_npz names a .npz file in out_dir or another existing folder: checked first."""
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise UserError(f"--save_npz={path} is a folder; name a file in it, e.g. "
                        f"--save_npz={os.path.join(path, 'samples.npz')}")
    if not path.endswith(".npz"):
        raise UserError(f"--save_npz={path}: name a .npz file (the ADM evaluator's format)")
    if not os.path.isdir(folder) and os.path.abspath(folder) != os.path.abspath(out_dir):
        raise UserError(f"--save_npz={path}: the folder {folder} does not exist; create it first")


def write_npz(path, **arrays):
    """np.savez's layout to path, atomically (cli.atomic_save: a full disk or a file-size limit is
    one line, the old file intact), with fixed zip dates: the same arrays give the same bytes."""
    def write(tmp):
        with zipfile.ZipFile(tmp, "w") as zf:
            for name, array in arrays.items():
                with zf.open(zipfile.ZipInfo(f"{name}.npy"), "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
    cli.atomic_save(write, path, size=sum(np.asarray(a).nbytes for a in arrays.values()))


def sample_in_parts(sampler, opt, labels, temperature, path, rank=0, world=1):
    """Sample `labels` in parts of opt.batch_size; part j is made by process j % world and saved in
    path.parts/ as it finishes (a part already there is kept). Process 0 then waits for every part,
    writes path once and removes the parts. -> (images, how many of them were in parts already
    there when it started) on process 0, None elsewhere."""
    parts_dir, n_parts = path + ".parts", math.ceil(len(labels) / opt.batch_size)
    spec = {"ckpt": os.path.abspath(opt.ckpt or os.path.join(opt.out_dir, "ckpt.pt")),
            "iter": sampler.ckpt["iter"], "seed": opt.seed, "steps": opt.steps,
            "temperature": temperature, "cfg_scale": opt.cfg_scale, "solver": opt.solver,
            "time_shift": opt.time_shift, "cfg_interval": opt.cfg_interval,
            "num_samples": len(labels),
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
    for j in cli.progress(mine, desc=f"[process {rank}] sampling", unit="part"):
        lo, hi = j * opt.batch_size, min(len(labels), (j + 1) * opt.batch_size)
        batch = sample.generate(sampler, labels[lo:hi], opt.steps, temperature, opt.cfg_scale,
                                opt.seed, opt.batch_size, start=lo, **sample.solve(opt))
        write_npz(part(j), arr_0=batch, arr_1=labels[lo:hi])
    if rank != 0:
        return None
    while not all(os.path.exists(part(j)) for j in range(n_parts)):   # the other processes'
        time.sleep(1)
    for j in range(n_parts):                  # filled in place: one copy of the images in memory
        with np.load(part(j)) as f:
            if j == 0:
                images = np.empty((len(labels), *f["arr_0"].shape[1:]), np.uint8)
            images[j * opt.batch_size:(j + 1) * opt.batch_size] = f["arr_0"]
    write_npz(path, arr_0=images, arr_1=labels)
    shutil.rmtree(parts_dir)
    print(f"wrote {path}: arr_0 {images.shape} uint8 images, arr_1 labels (index "
          f"{sampler.meta['num_classes']} is the null class)")
    return images, kept

# -----------------------------------------------------------------------------
# the command: sample, assemble, score


def main(argv):
    """-> {"images", "labels"[, "fid"]} on the first process, None on the others. The first holds
    out_dir (one writer, as a training does); the others only add parts to FILE.parts/."""
    opt = cli.parse_args(argv, ManySamplesConfig(), doc=__doc__)
    at_least = lambda lo, names: {k: (lambda v: v >= lo, f"at least {lo}") for k in names}
    cli.check_ranges(opt, at_least(0, ("steps", "fid_ref", "temperature"))
                     | at_least(1, ("num_samples", "batch_size")))
    path = os.path.join(opt.out_dir, opt.save_npz)
    check_npz_path(path, opt.out_dir)
    rank, _, world, device = cli.setup_distributed(opt.device)
    ckpt_path = opt.ckpt or os.path.join(opt.out_dir, "ckpt.pt")
    instead = f"sample into another folder meanwhile: --ckpt={ckpt_path} --out_dir=OTHER"
    with cli.one_writer(opt.out_dir, instead) if rank == 0 else nullcontext():
        sampler, opt, label, (temperature,) = sample.sampler_from_flags(
            opt, device, [opt.temperature] * (opt.temperature > 0), verbose=rank == 0)
        if opt.fid:                              # its extractor and reference, before sampling
            fid.check_reference(sampler.data_dir, opt.fid_model or None, opt.fid_ref_stats,
                                opt.fid_ref_dir)
        S = sampler.meta["image_size"]
        if rank == 0:                          # the parts and the npz, both whole at the end
            cli.check_space(os.path.dirname(path), 2 * opt.num_samples * S * S * 3,
                            opt.num_samples * S * S * 3, "the samples")
        t0, C = time.time(), sampler.meta["num_classes"]
        labels = sample.balanced_labels(opt.num_samples, C, label).astype(np.int64)
        done = sample_in_parts(sampler, opt, labels, temperature, path, rank, world)
        if done is None:
            return None
        (images, kept), dt = done, time.time() - t0
        print(f"{opt.num_samples - kept} samples in {dt:.1f}s ({(opt.num_samples - kept) / dt:.1f} "
              f"images/s, {world} process{'es' * (world > 1)})"
              + f", {kept} more from the parts of an earlier run" * (kept > 0))
        result = {"images": images, "labels": labels}
        if opt.fid:              # Inception runs at 299x299: 50 images a batch keep it near 2 GB
            scores = fid.compute_fid(images, sampler.data_dir, opt.fid_model or None,
                                     opt.fid_ref or None, 50, device, ref_stats=opt.fid_ref_stats,
                                     ref_dir=opt.fid_ref_dir)
            result.update({k: scores[k] for k in ("fid", "sfid", "is", "precision", "recall")})
            print(scores["report"])
            print(f"the samples: {sample.describe(opt)}, temperature {temperature} (the "
                  f"tokenizer's reconstruction FID is the floor of the FID)")
        return result


if __name__ == "__main__":
    cli.run(main)
