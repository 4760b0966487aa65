"""
bench.py: what one training step and the sampler cost on this device, for any preset, without
starting a run.

    python bench.py --dataset=shapes    # this CPU: under two minutes, compile included
    python bench.py --dataset=cifar10   # DiT-B/2 at batch 256, bf16 on a GPU
    python bench.py --dataset=cifar10 --compile=false --sample_steps=250 --cfg_scale=1.3

It builds the preset's model (every purrception.py flag works here) on random tokens shaped like the
dataset's (K, d and grid from data/<dataset>/meta.json when it is prepared), then times the real
training step (forward, backward, clipping, AdamW, EMA) eagerly and under torch.compile in the same
process, and the Euler sampler. Printed: ms/iter, images/s, MFU (needs the device's peak FLOP/s:
cli.PEAK_FLOPS knows the H100/H200/H800/A100/A800/L40S parts, else --peak_flops), the peak
memory of each mode on its own (the CUDA allocator's peak; on a CPU the process's peak resident
memory), the compile time and the eager/compiled ratio, and sampler images/s. Like training, no
TF32: what runs outside bf16 autocast is fp32.
"""

import copy
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

import cli
import prepare_data
import purrception as pc

# K, d and grid side of each dataset's tokens, for when data/<dataset> is not prepared here
TOKEN_SHAPES = {"shapes": (64, 8, 8), "cifar10": (1024, 8, 16)}


@dataclass
class BenchConfig(pc.Config):
    bench_iters: int = 10         # timed training steps (after warmup) per mode
    bench_warmup: int = 3         # untimed steps first (the first compiled step holds the compile)
    compare_compile: bool = True  # also time torch.compile and print eager / compiled
    sample_batch: int = 0         # images per sampler call; 0 means the training batch size


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    """Start a new peak: the CUDA allocator's, or on Linux the process's peak resident set (VmHWM,
    reset by writing 5 to /proc/self/clear_refs)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass                                     # not Linux: peak_memory says it is cumulative


def peak_memory(device):
    """The peak since reset_peak_memory(device), as a printable figure."""
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocator peak)"
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return f"{kib / 2**20:.2f} GiB (process peak RSS)"
    except (OSError, StopIteration):
        return (f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
                "(process peak RSS so far, this mode and those before it)")


def time_steps(model, ema, opt, E, K, grid, cfg, device, ctx, n):
    """Seconds per training step over n steps, on random tokens."""
    g = torch.Generator().manual_seed(0)
    sync(device)
    t0 = time.time()
    for _ in range(n):
        idx = torch.randint(0, K, (cfg.batch_size, grid, grid), generator=g).to(device)
        y = torch.randint(0, model.num_classes + 1, (cfg.batch_size,), generator=g).to(device)
        with ctx:
            loss = pc.vfm_loss(model, idx, E, y, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pc.update_ema(ema, getattr(model, "_orig_mod", model), cfg.ema_decay)
    sync(device)
    return (time.time() - t0) / max(n, 1)


def main(argv):
    cfg = cli.parse_args(argv, BenchConfig(), pc.PRESETS, __doc__)
    cli.check_ranges(cfg, {**pc.RANGES, "bench_iters": (lambda v: v >= 1, "at least 1"),
                           "bench_warmup": (lambda v: v >= 1, "at least 1"),
                           "sample_batch": (lambda v: v >= 0, "at least 0")})
    device = cli.pick_device(cfg.device)
    meta_path = os.path.join(cfg.data_dir or prepare_data.data_path(cfg.dataset), "meta.json")
    if os.path.exists(meta_path):
        meta = cli.read_json(meta_path)
        K, d, side = meta["codebook_size"], meta["code_dim"], meta["grid_h"]
    elif cfg.dataset in TOKEN_SHAPES:
        K, d, side = TOKEN_SHAPES[cfg.dataset]
    else:
        raise cli.UserError(f"no {meta_path}: prepare the dataset, or bench a preset "
                            f"({', '.join(TOKEN_SHAPES)})")
    cli.check_transformer(cfg.n_embd, cfg.n_head, cfg.patch_size, side)
    device_type = device.split(":")[0]
    ctx = (torch.autocast(device_type, dtype=torch.bfloat16) if device_type == "cuda"
           else nullcontext())
    torch.manual_seed(cfg.seed)
    model = pc.DiT(d, K, side, cfg.patch_size, cfg.n_layer, cfg.n_head, cfg.n_embd, 10,
                   cfg.time_embed).to(device)
    E = torch.nn.functional.normalize(torch.randn(K, d), dim=1).to(device)
    peak = cfg.peak_flops or pc.device_peak_flops(device)
    flops = model.flops_per_image() * cfg.batch_size
    print(f"bench on {device} ({torch.get_num_threads()} threads): {cfg.dataset} preset, "
          f"{model.num_params() / 1e6:.2f}M parameters, batch {cfg.batch_size}, K={K} d={d} grid "
          f"{side}x{side}, {'bf16 autocast' if device_type == 'cuda' else 'fp32'}, "
          f"{flops / 1e12:.3f} TFLOP per step")

    results = {}
    modes = ["eager"] + (["compiled"] * cfg.compare_compile)
    for mode in modes:
        net = copy.deepcopy(model)
        ema = copy.deepcopy(net).requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, fused=device_type == "cuda")
        run = torch.compile(net) if mode == "compiled" else net
        reset_peak_memory(device)
        t0 = time.time()
        time_steps(run, ema, opt, E, K, side, cfg, device, ctx, cfg.bench_warmup)
        warm = time.time() - t0
        dt = time_steps(run, ema, opt, E, K, side, cfg, device, ctx, cfg.bench_iters)
        results[mode] = dt
        mfu = f", MFU {flops / dt / peak:.1%}" if peak else ", MFU n/a (pass --peak_flops)"
        extra = (f", first {cfg.bench_warmup} steps (compile included) {warm:.1f} s"
                 if mode == "compiled" else "")
        print(f"train {mode}: {dt * 1000:.1f} ms/iter, {cfg.batch_size / dt:.1f} images/s{mfu}"
              f"{extra}; peak memory {peak_memory(device)}")
    if "compiled" in results:
        print(f"compile speed-up: eager / compiled = {results['eager'] / results['compiled']:.2f}x")

    n = cfg.sample_batch or cfg.batch_size
    y = torch.arange(n, device=device) % 10
    model.eval()
    for rep in range(2):                         # the first call warms up kernels and caches
        sync(device)
        t0 = time.time()
        with ctx:
            pc.euler_sample(model, E, y, side, cfg.sample_steps, cfg.temperature, cfg.cfg_scale, 10,
                            torch.Generator().manual_seed(0))
        sync(device)
    dt = time.time() - t0
    print(f"sampler: {n / dt:.1f} images/s ({n} images, {cfg.sample_steps} steps, "
          f"cfg_scale {cfg.cfg_scale}: {cfg.sample_steps * (1 + (cfg.cfg_scale != 1))} forwards "
          f"of {n}), eager")
    return {"ms_per_iter": {k: v * 1000 for k, v in results.items()},
            "sampler_images_per_s": n / dt, "config": asdict(cfg)}


if __name__ == "__main__":
    cli.run(main)
