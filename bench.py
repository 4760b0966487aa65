"""
bench.py: what one training step and the sampler cost on this device, for any preset, without
starting a run.

    python bench.py --dataset=shapes    # this CPU: under two minutes, compile included
    python bench.py --dataset=cifar10   # DiT-B/2 at batch 256, bf16 on a GPU
    python bench.py --dataset=cifar10 --compare_compile=false --sample_steps=250 --cfg_scale=1.3

It builds the preset's model (every purrception.py flag works here) on random tokens shaped like the
dataset's (K, d and grid from data/<dataset>/meta.json when it is prepared), then times the real
training step (forward, backward, clipping, AdamW, EMA) eagerly and under torch.compile in the same
process, and the Euler sampler. Printed: ms/iter, images/s, MFU (needs the device's peak FLOP/s:
cli.PEAK_FLOPS knows the H100/H200/H800/A100/A800/L40S parts, else --peak_flops), the peak
memory of each mode on its own (the CUDA allocator's peak; on a CPU the process's peak resident
memory), the compile time and the eager/compiled ratio, and sampler images/s. Like training, no
TF32: what runs outside bf16 autocast is fp32.

    MALLOC_MMAP_THRESHOLD_=65536 python bench.py --dataset=imagenet256 --device=cpu \\
        --n_layer=12 --n_head=12 --n_embd=768 --batch_size=2 --loss_memory=true --cfg_scale=1.3
    python bench.py --dataset=imagenet256 --costs --sample_steps=250 --cfg_scale=1.3

--loss_memory: the peak memory per image of the loss and of a sampler step, the chunked ones of
purrception.py beside the same maths on the whole (B, h, w, K) fp32 logits (Linux). --costs: the
FLOPs of training and of sampling one image, and GPU-hours at --mfu (estimates; shapes only).

    python bench.py --solver_error=out-shapes/ckpt.pt --device=cpu

--solver_error: a trained checkpoint's EMA network sampled by every solver, on the uniform grid and
on --time_shift's, at 8 to 64 network calls, against 400 Euler steps from the same noise: the share
of codes that agree, and the relative L2 distance of the final z (before the readout).
"""

import copy
import os
import resource
import time
from dataclasses import asdict, dataclass

import torch

import cli
import prepare_data
import purrception as pc

# K, d and grid side of each dataset's tokens, for when data/<dataset> is not prepared here
TOKEN_SHAPES = {"shapes": (64, 8, 8), "cifar10": (1024, 8, 16), "imagenet256": (16384, 8, 32)}


@dataclass
class BenchConfig(pc.Config):
    bench_iters: int = 10         # timed training steps (after warmup) per mode
    bench_warmup: int = 3         # untimed steps first (the first compiled step holds the compile)
    compare_compile: bool = True  # also time torch.compile and print eager / compiled
    sample_batch: int = 0         # images per sampler call; 0 means the training batch size
    loss_memory: bool = False     # only the loss's and sampler's memory per image vs whole-batch
    costs: bool = False           # only FLOPs per image (training, sampling) and hours at --mfu
    mfu: float = 0.4              # the model FLOPs utilisation the --costs hours assume
    train_images: float = 0.0     # --costs: images seen in training; 0: max_iters x global batch
    solver_error: str = ""        # a checkpoint: each solver and grid against 400 Euler steps


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def status_bytes(key):
    """A line of /proc/self/status (Linux) in bytes: VmRSS (resident now) or VmHWM (its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


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
        return f"{status_bytes('VmHWM') / 2**30:.2f} GiB (process peak RSS)"
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
            loss = pc.vfm_loss(model, idx, E, y, generator=g, chunk=pc.CHUNK)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pc.update_ema(ema, getattr(model, "_orig_mod", model), cfg.ema_decay)
    sync(device)
    return (time.time() - t0) / max(n, 1)

# -----------------------------------------------------------------------------
# the loss's and the sampler's memory: the chunked ones (purrception.py) against the same maths on
# the whole (B, h, w, K) fp32 tensor of logits. On Linux the peak is the process's peak resident
# memory above what it held before (VmHWM after a reset through /proc/self/clear_refs); run with
# MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the system at once.


def logits_only(net):
    """The same network (the same parameters) seen from outside: logits only, no head input."""
    view = copy.copy(net)
    view.offers_head_input = False
    return view


def peak_above_rest(fn):
    """(seconds, peak resident bytes above the resting ones) of one call of fn()."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                              # VmHWM := VmRSS
    rest, t0 = status_bytes("VmRSS"), time.time()
    fn()
    return time.time() - t0, status_bytes("VmHWM") - rest


def loss_memory(model, E, K, side, cfg, reps=3):
    """Print the peak memory per image and the time of forward + backward with each loss, and of
    one sampler step, the whole-batch versions beside the chunked ones: for the whole network, and
    for the loss alone (the same network without its blocks: embeddings, final layer and loss).
    -> {(network, name): (seconds, peak bytes)}."""
    B, g = cfg.batch_size, torch.Generator().manual_seed(0)
    idx, y = torch.randint(0, K, (B, side, side), generator=g), torch.arange(B) % 10
    headless = copy.deepcopy(model)
    headless.blocks = torch.nn.ModuleList()

    def body(net):                            # the head's input; its weights get gradients too
        x, W, b = net(torch.randn(B, side, side, E.shape[1]), torch.rand(B), y, head_input=True)
        return x.square().mean() + 0 * (W.sum() + b.sum())
    loss = lambda net, chunk: pc.vfm_loss(net, idx, E, y, generator=g, chunk=chunk)
    sampler = lambda net, chunk: pc.sample_ode(net, E, y, side, 1, 1.0, cfg.cfg_scale, 10, g,
                                               chunk=chunk)
    steps = {"network, no loss": body,
             "whole-batch fp32 loss": lambda net: loss(net, None),
             "chunked, logits only": lambda net: loss(logits_only(net), pc.CHUNK),
             "chunked, head input": lambda net: loss(net, pc.CHUNK),
             "whole-batch sampler": lambda net: sampler(net, None),
             "sample_ode": lambda net: sampler(net, pc.CHUNK)}
    out = {}
    for _ in range(reps):                         # in turns: a busy machine slows them alike
        for net, where in ((model, "whole network"), (headless, "loss alone")):
            for name, fn in steps.items():
                net.zero_grad(set_to_none=True)   # as the training loop does: .grad made anew
                train = "sampler" not in name and name != "sample_ode"
                dt, peak = peak_above_rest((lambda: fn(net).backward()) if train
                                           else lambda: fn(net))
                best = out.get((where, name), (dt, peak))
                out[where, name] = min(dt, best[0]), max(peak, best[1])
    for (where, name), (dt, peak) in out.items():
        what = f"1 step, cfg_scale {cfg.cfg_scale}" if "sample" in name else "forward + backward"
        print(f"{where}, {name}: peak {peak / B / 2**20:.0f} MiB per image, {dt:.2f} s ({what},"
              f" batch {B}, best of {reps})")
    time0, memory0 = out["whole network", "whole-batch fp32 loss"][0], out["loss alone",
                                                                         "whole-batch fp32 loss"][1]
    ratio = lambda a, b: f"{a / b:.2f}x" if b > 0 else "n/a (too small to measure)"
    for name in ("chunked, logits only", "chunked, head input"):
        memory, dt = out["loss alone", name][1], out["whole network", name][0]
        print(f"{name} / whole-batch: memory of the loss alone {ratio(memory, memory0)}, "
              f"the whole network's step time {ratio(dt, time0)}")
    return out


def sampling_flops(model, steps, cfg_scale):
    """FLOPs of sampling one image: per step a forward (a third of training's 6 per weight and
    token), twice the body under guidance but the head once (guidance mixes its input), and the
    posterior mean pi @ E (2 K d per position)."""
    head = 2 * model.final_layer.linear.weight.numel() * model.n_tokens
    forward = model.flops_per_image() / 3
    per_step = (forward - head) * (1 + (cfg_scale != 1)) + head
    return steps * (per_step + 2 * model.out_dim * model.in_dim * model.grid_size ** 2)


def costs(model, cfg, peak):
    """Print training and sampling FLOPs per image and what they cost in hours at cfg.mfu."""
    train, sample = model.flops_per_image(), sampling_flops(model, cfg.sample_steps, cfg.cfg_scale)
    n_train = cfg.train_images or cfg.max_iters * cfg.batch_size * cfg.grad_accum
    hours = lambda flops: flops / (peak * cfg.mfu) / 3600
    print(f"training: {train / 1e9:.1f} GFLOP per image; {n_train:.3g} images = "
          f"{train * n_train:.3g} FLOP = {hours(train * n_train):.1f} GPU-hours at "
          f"{cfg.mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s (an estimate until measured)")
    print(f"sampling: {sample / 1e12:.2f} TFLOP per image at {cfg.sample_steps} steps, cfg_scale "
          f"{cfg.cfg_scale}; 50000 images = {hours(sample * 50000):.1f} GPU-hours at the same MFU "
          f"(an estimate)")
    return {"train_flops_per_image": train, "sample_flops_per_image": sample}


def solver_error(cfg, device):
    """Print and return {(solver, time_shift, steps): (share of codes agreeing, relative L2 of z)}
    against a 400-step Euler solution (see the docstring)."""
    import sample
    sampler = sample.load_sampler(cfg.solver_error, device=device)
    C, trained = sampler.meta["num_classes"], sampler.ckpt["config"]
    y = torch.arange(cfg.sample_batch or 40, device=device) % C            # class-balanced
    noise = sample.sample_noise(sampler, 0, len(y), cfg.seed)

    def solve(steps, **solver):                # the final codes and z (the last step's mu)
        idx, path = pc.sample_ode(sampler.model, sampler.E, y, sampler.grid, steps,
                                  trained["temperature"], trained["cfg_scale"], C, noise=noise,
                                  return_trajectory=True, chunk=pc.CHUNK, **solver)
        return idx, path["mu"][-1]
    ref_idx, ref_z = solve(400)
    out = {}
    for solver in pc.SOLVERS:
        for shift in sorted({1.0, cfg.time_shift}, reverse=True):
            for steps in (8, 16, 32, 64):
                idx, z = solve(steps, solver=solver, time_shift=shift)
                out[solver, shift, steps] = ((idx == ref_idx).float().mean().item(),
                                             ((z - ref_z).norm() / ref_z.norm()).item())
            print(f"{solver}, time_shift {shift}: codes equal to 400 Euler steps / relative L2 of "
                  f"z at 8, 16, 32, 64 network calls: " + ", ".join(
                      f"{out[solver, shift, n][0]:.3f} / {out[solver, shift, n][1]:.3f}"
                      for n in (8, 16, 32, 64)))
    return out


def main(argv):
    cfg = cli.parse_args(argv, BenchConfig(), pc.PRESETS, __doc__)
    cli.check_ranges(cfg, {**pc.RANGES, "bench_iters": (lambda v: v >= 1, "at least 1"),
                           "bench_warmup": (lambda v: v >= 1, "at least 1"),
                           "sample_batch": (lambda v: v >= 0, "at least 0")})
    device = cli.pick_device(cfg.device)
    if cfg.solver_error:
        with torch.no_grad():
            return solver_error(cfg, device)
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
    if cfg.costs:                             # shapes only: no memory, any size
        with torch.device("meta"):
            model = pc.DiT(d, K, side, cfg.patch_size, cfg.n_layer, cfg.n_head, cfg.n_embd, 1000)
        print(f"{model.num_params() / 1e6:.0f}M parameters, K={K} d={d} grid {side}x{side}")
        return costs(model, cfg, cfg.peak_flops or cli.PEAK_FLOPS["H100"])
    device_type = device.split(":")[0]
    ctx = cli.autocast(device)
    torch.manual_seed(cfg.seed)
    model = pc.DiT(d, K, side, cfg.patch_size, cfg.n_layer, cfg.n_head, cfg.n_embd, 10,
                   cfg.time_embed).to(device)
    E = torch.nn.functional.normalize(torch.randn(K, d), dim=1).to(device)
    peak = cfg.peak_flops or cli.device_peak_flops(device)
    flops = model.flops_per_image() * cfg.batch_size
    print(f"bench on {device} ({torch.get_num_threads()} threads): {cfg.dataset} preset, "
          f"{model.num_params() / 1e6:.2f}M parameters, batch {cfg.batch_size}, K={K} d={d} grid "
          f"{side}x{side}, {'bf16 autocast' if device_type == 'cuda' else 'fp32'}, "
          f"{flops / 1e12:.3f} TFLOP per step")

    if cfg.loss_memory:
        if not os.path.exists("/proc/self/clear_refs"):
            raise cli.UserError("--loss_memory reads the peak memory from /proc/self (Linux)")
        return loss_memory(model, E, K, side, cfg)
    results = {}
    for mode in ["eager"] + ["compiled"] * cfg.compare_compile:
        net = copy.deepcopy(model)
        ema = copy.deepcopy(net).requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, fused=device_type == "cuda")
        stepped = torch.compile(net) if mode == "compiled" else net
        reset_peak_memory(device)
        warm = cfg.bench_warmup * time_steps(stepped, ema, opt, E, K, side, cfg, device, ctx,
                                             cfg.bench_warmup)
        dt = time_steps(stepped, ema, opt, E, K, side, cfg, device, ctx, cfg.bench_iters)
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
            pc.sample_ode(model, E, y, side, cfg.sample_steps, cfg.temperature, cfg.cfg_scale, 10,
                          torch.Generator().manual_seed(0), chunk=pc.CHUNK, solver=cfg.solver,
                          time_shift=cfg.time_shift, cfg_interval=cli.interval(cfg.cfg_interval))
        sync(device)
    dt = time.time() - t0
    print(f"sampler: {n / dt:.1f} images/s ({n} images, {cfg.solver} on {cfg.sample_steps} steps: "
          f"{cfg.sample_steps} network calls, of {n * (1 + (cfg.cfg_scale != 1))} rows with "
          f"cfg_scale {cfg.cfg_scale}), eager")
    return {"ms_per_iter": {k: v * 1000 for k, v in results.items()},
            "sampler_images_per_s": n / dt, "config": asdict(cfg)}


if __name__ == "__main__":
    cli.run(main)
