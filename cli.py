"""
cli.py: what every command line here shares, kept out of the way of the code worth reading (nanoGPT
keeps its flags in configurator.py for the same reason): flags (every dataclass field is a typed
--key=value), UserError (bad input: one line on stderr, exit status 2), checks of the model's shape
and of checkpoints, devices (pick_device, torchrun, autocast, PEAK_FLOPS for MFU), and files
(atomic_save, one_writer, progress).
"""

import atexit
import contextlib
import difflib
import errno
import glob
import inspect
import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import time
import traceback
import uuid
from dataclasses import fields, replace


class UserError(ValueError):
    """Bad input (a flag, a missing or damaged file): `run` prints it as one line, exit status 2."""


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: unwinds like Ctrl-C, so every `finally` (a temporary file, a lock)
    runs before the process ends."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# What a stop keeps and how to go on, said in the one line a stopped command ends with; a command
# updates it as its work is saved (a checkpoint, a part, a chunk).
stop_note = "nothing was left half-written; run the same command again"


def _stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)     # one stop: a second signal waits for the
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # clean-up instead of cutting it short
    raise Stopped(signum)


def run(main, argv=None):
    """Call main(argv): a UserError becomes one line on stderr and exit status 2. SIGTERM (a
    scheduler's) and SIGINT (Ctrl-C) remove temporaries and locks, print stop_note, and end the
    process by the signal itself, so its exit status is the usual one."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        if int(os.environ.get("RANK", 0)) == 0:      # under torchrun, one line for all processes
            print(f"stopped by {signal.Signals(e.signum).name}: {stop_note}", file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)

# -----------------------------------------------------------------------------
# flags


def field_comments(cls):
    """{field: the comment beside it} from the dataclass's source, for --help."""
    lines = []
    for klass in reversed(cls.__mro__):                       # a subclass's comments win
        with contextlib.suppress(OSError, TypeError):
            lines += inspect.getsource(klass).splitlines()
    out = {}
    for line in lines:
        code, _, comment = line.partition("  #")
        name = code.strip().partition(":")[0]
        if comment and name.isidentifier():
            out[name] = comment.strip()
    return out


def convert(key, text, default):
    """A flag's text -> the type of its default: --lr=1 is a float, --compile=false a bool,
    --max_iters=1e5 an int, a tuple default takes a comma list."""
    typ = type(default)
    try:
        if typ is bool:
            return {"true": True, "1": True, "yes": True,
                    "false": False, "0": False, "no": False}[text.lower()]
        if typ in (int, float):
            value = float(text)
            if not math.isfinite(value) or typ is int and not value.is_integer():
                raise ValueError
            return typ(value)
        if typ is tuple:
            return tuple(convert(key, part, default[0]) for part in text.split(","))
        return typ(text)
    except (KeyError, ValueError, IndexError):
        raise UserError(f"--{key} expects {typ.__name__}, got {text!r}") from None


def help_text(cfg, doc="", extra=None, extra_help=None):
    comments = field_comments(type(cfg))
    rows = [(f"--{f.name}={getattr(cfg, f.name)}", comments.get(f.name, "")) for f in fields(cfg)]
    rows += [(f"--{prefix}{k}={v}", (extra_help or {}).get(k, ""))
             for prefix, table in (extra or {}).items() for k, v in table.items()]
    width = max(len(left) for left, _ in rows) + 2
    return ((doc.strip() + "\n\n" if doc else "") + "options (values after the preset):\n"
            + "\n".join(f"  {left:<{width}}{comment}".rstrip() for left, comment in rows))


def parse_args(argv, cfg, presets=None, doc="", extra=None, extra_help=None):
    """['--dataset=cifar10', '--lr=3e-4'] -> a copy of the dataclass cfg with the dataset's preset,
    then the flags, applied (the last word wins). `extra` maps flag prefixes ('vq.') to dicts of
    defaults whose typed values come back in a second dict (extra_help: their meanings)."""
    defaults = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    extra = extra or {}
    flags, more, wants_help = {}, {}, False
    for arg in argv:
        if arg in ("-h", "--help"):
            wants_help = True
            continue
        key, eq, text = arg.removeprefix("--").partition("=")
        prefix = next((p for p in extra if key.startswith(p)), None)
        table = extra[prefix] if prefix else defaults
        name = key[len(prefix):] if prefix else key
        if not arg.startswith("--") or name not in table:
            known = list(defaults) + [p + k for p, t in extra.items() for k in t]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"unknown option {arg.split('=')[0]!r}{hint}; --help lists them all")
        if not (eq or isinstance(table[name], bool)):
            raise UserError(f"write options as --{key}=VALUE (got {arg!r})")
        # a bare --compile means true
        value = convert(key, text if eq else "true", table[name])
        (more.setdefault(prefix, {}) if prefix else flags)[name] = value
    preset = (presets or {}).get(flags.get("dataset", defaults.get("dataset")), {})
    cfg = replace(cfg, **{**preset, **flags})
    if wants_help:
        print(help_text(cfg, doc, extra, extra_help))
        sys.exit(0)
    return (cfg, more) if extra else cfg


def check_ranges(cfg, rules):
    """rules: {field: (test, what it must be)}; the first field that fails is a UserError."""
    for name, (test, must) in rules.items():
        value = getattr(cfg, name)
        if not test(value):
            raise UserError(f"--{name}={value} is impossible: it must be {must}")


def interval(text):
    """'lo,hi' -> (lo, hi) with 0 <= lo <= hi <= 1, else None."""
    try:
        lo, hi = map(float, text.split(","))
    except ValueError:
        return None
    return (lo, hi) if 0 <= lo <= hi <= 1 else None


def split_batch(batch_size, grad_accum, world):
    """The global batch, batch_size x grad_accum images, over `world` processes -> (images per
    micro-step, micro-steps per process): n equal micro-steps, the fewest n >= grad_accum that the
    processes share evenly."""
    G = batch_size * grad_accum
    if G % world:
        fits = [n for n in range(1, world) if G % n == 0][-1]
        raise UserError(f"the global batch of {G} images (--batch_size={batch_size} x --grad_accum="
                        f"{grad_accum}) does not split over {world} processes; keep it on "
                        f"--nproc_per_node={fits}, or pick a global batch {world} divides, e.g. "
                        f"--batch_size={G - G % world} --grad_accum=1")
    n = next(n for n in range(world * -(-grad_accum // world), G + 1, world) if G % n == 0)
    return G // n, n // world


def check_transformer(n_embd, n_head, patch_size=1, side=0):
    """The DiT's shape flags: heads split the width, the 2-D positions take a quarter of it each,
    and a patch tiles the token grid (side, when known); else a UserError naming what works."""
    # the nearest value below x and above it
    near = lambda values, x: [v for v in (max((v for v in values if v < x), default=None),
                                          min((v for v in values if v > x), default=None)) if v]
    if n_embd % 4:
        step = math.lcm(4, n_head)
        widths = [w for w in (n_embd // step * step, n_embd // step * step + step) if w > 0]
        raise UserError(f"--n_embd={n_embd} must be a multiple of 4 (the 2-D positions) and of "
                        f"--n_head={n_head}: try " + " or ".join(f"--n_embd={w}" for w in widths))
    if n_embd % n_head:
        heads = near([h for h in range(1, n_embd + 1) if n_embd % h == 0 and h != n_head], n_head)
        raise UserError(f"--n_head={n_head} does not divide --n_embd={n_embd}: try "
                        + " or ".join(f"--n_head={h}" for h in heads))
    if side and side % patch_size:
        sizes = [p for p in range(1, min(8, side) + 1) if side % p == 0]
        raise UserError(f"--patch_size={patch_size} does not divide the {side}x{side} token grid; "
                        f"try " + ", ".join(f"--patch_size={p}" for p in sizes))

# -----------------------------------------------------------------------------
# devices, files, progress


HERE = os.path.dirname(os.path.abspath(__file__))


def command(script, *args):
    """'python SCRIPT ARGS' as typed from the working directory: a hint is a command that works."""
    shown = script if os.path.abspath(os.getcwd()) == HERE else os.path.join(HERE, script)
    return " ".join(["python", shlex.quote(shown), *map(shlex.quote, args)])


def same_command(**flags):
    """This process's own command, as typed, with `flags` set: the hint to continue its work."""
    args = [a for a in sys.argv[1:] if a.partition("=")[0].lstrip("-") not in flags]
    return command(os.path.basename(sys.argv[0]), *args, *(f"--{k}={v}" for k, v in flags.items()))


def pick_device(name="", flag="--device"):
    """'' -> cuda, then mps, then cpu; a named device (set by `flag`) is checked to exist."""
    import torch
    if not name:
        return ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"{flag}={name}: use cuda, mps or cpu (or '' to pick the best available)")
    if (kind == "cuda" and not torch.cuda.is_available()
            or kind == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"{flag}={name}, but this machine has no {kind}; try {flag}=cpu")
    return name


def setup_distributed(device=""):
    """-> (rank, local_rank, world, device). Under torchrun (it sets RANK): join the process group
    (NCCL on CUDA, else gloo), one GPU a process (cuda:LOCAL_RANK). Otherwise (0, 0, 1, device)."""
    device = pick_device(device)
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    import torch
    import torch.distributed as dist
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        atexit.register(dist.destroy_process_group)
    return rank, local, world, device


def autocast(device):
    """bf16 autocast on a CUDA GPU that has it (no fp16, so no GradScaler), fp32 elsewhere. No TF32
    switch: what runs outside autocast (the sampler's geometry, the readout) stays true fp32."""
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# dense bf16 tensor-core peaks from the datasheets (no sparsity), for the MFU print. The first name
# a GPU's name contains wins, so the PCIe and NVL parts come before their SXM namesakes.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H800 PCIe": 756e12,
              "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12}


def device_peak_flops(device):
    """The PEAK_FLOPS entry of a CUDA device (0: unknown, or not a GPU)."""
    import torch
    name = torch.cuda.get_device_name(device) if "cuda" in str(device) else ""
    return next((flops for key, flops in PEAK_FLOPS.items() if name and key in name), 0.0)


def load_checkpoint(path, hint="train one with `python purrception.py --dataset=NAME`"):
    """A checkpoint of this repository -> its dict (weights_only: no code runs) or a UserError."""
    import torch
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, EOF, foreign pickle: all mean the same to a user
        raise UserError(f"cannot read {path} ({type(e).__name__}): it is truncated or not a "
                        f"checkpoint; restore it from a copy or train again") from None
    if (not isinstance(ckpt, dict)
            or not {"model", "ema", "iter", "model_args", "config"} <= set(ckpt)):
        raise UserError(f"{path} is not a checkpoint of this repository (it lacks model, ema, iter "
                        "or config)")
    if not all(torch.isfinite(v).all() for key in ("model", "ema") for v in ckpt[key].values()
               if v.is_floating_point()):
        raise UserError(f"{path} holds non-finite weights (its run diverged); use an earlier "
                        "checkpoint")
    return ckpt


def note_cpu_cost(dt, left):
    """Print what `left` more iterations of dt seconds would cost on this CPU, when over 4 hours."""
    if dt * left > 4 * 3600:
        print(f"note: on this CPU one iter takes {dt:.1f} s, so {left} more would take "
              f"{format_seconds(dt * left)}; this preset is sized for a GPU. The README's "
              f"'CIFAR-10 on a CPU' recipe trains a smaller model in an hour")


def diverged(what, it, ckpt_path, lr):
    """The one line every process stops with when training diverges."""
    last = (f"the last good checkpoint {ckpt_path} is untouched" if os.path.exists(ckpt_path)
            else "nothing saved")
    return UserError(f"{what} at iter {it}: training diverged, {last}; try a lower --lr (now "
                     f"{lr:g}), more --warmup_iters or a smaller --grad_clip")


def same_tokenizer(ckpt, ckpt_path, meta, data_dir):
    """A checkpoint's codes index the codebook it was trained with: a data folder whose tokenizer is
    another file is refused, naming the folder the run used (checkpoints that predate the record
    pass)."""
    trained, here = ckpt.get("tokenizer_sha1"), meta.get("tokenizer_sha1")
    if trained and here and trained != here:
        run_dir = ckpt["config"].get("data_dir", "")
        raise UserError(f"{ckpt_path} was trained with the tokenizer of {run_dir} (sha1 "
                        f"{trained[:12]}), but {data_dir} holds another (sha1 {here[:12]}), whose "
                        f"codes mean other images; pass --data_dir={run_dir}")


def load_resume(ckpt_path, max_iters, objective, meta, data_dir):
    """The checkpoint a --init_from=resume run continues, checked: iters left, objective, K, d."""
    ckpt = load_checkpoint(ckpt_path, "drop --init_from=resume to start from scratch")
    same_tokenizer(ckpt, ckpt_path, meta, data_dir)
    args, it = ckpt["model_args"], ckpt["iter"]
    if it >= max_iters:
        raise UserError(f"{ckpt_path} is already at iter {it}: --max_iters={max_iters} leaves "
                        f"nothing to do; pass a larger --max_iters")
    if ckpt.get("objective", "purrception") != objective:
        raise UserError(f"{ckpt_path} was trained with the {ckpt.get('objective')} objective; "
                        f"resume it with that one, or pick another --out_dir")
    if (args["K"], args["d"]) != (meta["codebook_size"], meta["code_dim"]):
        raise UserError(f"{ckpt_path} was trained on K={args['K']} codes of d={args['d']}, but "
                        f"{data_dir} has K={meta['codebook_size']}, d={meta['code_dim']}; resume "
                        f"it on its own data (--data_dir)")
    return ckpt


def resumed_config(cfg, ckpt, architecture, per_invocation, verbose=True):
    """cfg with the architecture of the checkpoint it resumes, so what is printed and saved is true;
    verbose: one line naming the flags (not per_invocation) that differ from the checkpoint's."""
    arch = {k: ckpt["model_args"][k] for k in architecture if k in ckpt["model_args"]}
    trained, new = ckpt.get("config", {}), replace(cfg, **arch)    # the flags it was trained with
    kept = [f"--{k}={arch[k]}" for k in arch if getattr(cfg, k) != arch[k]]
    changed = [f"--{k}={getattr(new, k)} (was {trained[k]})" for k in trained
               if k not in (*architecture, *per_invocation) and hasattr(new, k)
               and getattr(new, k) != trained[k]]
    said = [f"the model is the checkpoint's ({' '.join(kept)})"] if kept else []
    said += [f"flags unlike its run's, used from here on: {', '.join(changed)}"] if changed else []
    if verbose and said:
        print(f"resuming at iter {ckpt['iter']}: " + "; ".join(said))
    return new


def atomic_save(write, path, size=None):
    """write(tmp), then rename tmp over path. tmp is unique, in path's folder, ending like path (PIL
    and numpy read the extension); the file and folder are fsynced, so a power cut leaves the old
    file or the new one, and tmp is removed on any failure. A full disk or a file-size limit is a
    UserError saying how much space the file needs (`size`, when the caller knows it)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}"
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)   # the writer's open file goes, and so its space
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and _out_of_space(e, path, written):
            raise UserError(_no_space(path, size, written)) from None
        raise
    with contextlib.suppress(OSError):   # the rename itself reaches the disk (not on every OS)
        _fsync(os.path.dirname(os.path.abspath(path)))


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_size_limit():
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return None if limit == resource.RLIM_INFINITY else limit
    except (ImportError, OSError, ValueError):
        return None


def _free_bytes(path):
    stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return stat.f_bavail * stat.f_frsize


def _out_of_space(e, path, written):
    """Did a write fail for want of space? torch and numpy turn ENOSPC/EFBIG into messages of their
    own, so the disk and the size limit are asked too."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    limit = _file_size_limit()
    try:
        return (limit is not None and written >= limit) or _free_bytes(path) < (1 << 20)
    except OSError:
        return False


def _no_space(path, size, written):
    """The line for a write short of space: how much the file needs, and where the limit is."""
    mb = lambda n: f"{n / 1e6:.1f}" if n < 1e7 else f"{n / 1e6:.0f}"
    old = os.path.getsize(path) if os.path.exists(path) else 0
    limit, free = _file_size_limit(), _free_bytes(path)
    capped = limit is not None and limit < written + free        # the size limit bit, not the disk
    fitted = max(written, limit) if capped else written + free
    need = (f"{mb(size)} MB" if size else f"about {mb(max(old, fitted))} MB" if old > fitted
            else f"over {mb(fitted)} MB")
    where = (f"the file-size limit (ulimit -f) is {mb(limit)} MB" if capped
             else f"{mb(free)} MB free")
    kept = f"the previous {os.path.basename(path)} is intact" if old else "no file was replaced"
    fix = "raise the limit (ulimit -f unlimited)" if capped else "free some space"
    return (f"no space left on device writing {path}: {need} needed, {where}; {kept}; {fix} and "
            f"run it again")


def check_space(folder, nbytes, largest, what="the files"):
    """Refuse before any work when the disk cannot hold nbytes more in folder, or this process may
    not write a file of `largest` bytes (ulimit -f)."""
    free, limit = _free_bytes(os.path.join(folder, "x")), _file_size_limit()
    size = lambda n: f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"
    why = (f"only {size(free)} are free there" if free < nbytes else
           f"this process may write files of at most {size(limit)} (ulimit -f)"
           if limit is not None and limit < largest else "")
    if why:
        raise UserError(f"{what} need {size(nbytes)} in {folder} (the largest file "
                        f"{size(largest)}), but {why}; " + ("make room" if free < nbytes else
                        "raise the limit (ulimit -f unlimited)") + " and run again")


def write_json(obj, path):
    """Atomic JSON file."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_save(write, path)


def read_json(path, what="file"):
    """A JSON file -> its value, or a UserError naming the file when it is missing or damaged."""
    if not os.path.exists(path):
        raise UserError(f"no {what} at {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); delete "
                        f"it and prepare the folder again") from None


def cache_dir():
    """Where downloaded files live: $PURRCEPTION_CACHE, else $XDG_CACHE_HOME/purrception, else
    ~/.cache/purrception."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("PURRCEPTION_CACHE") or os.path.join(xdg, "purrception")


def fetch(url, name, hub=None, check=None):
    """The published file at url -> its path, cache_dir()/name, downloaded on first use: through
    huggingface_hub when it is installed and the file is on the Hub (hub: (repo, filename)), else by
    the standard library into a temporary that is renamed only when whole (the size the server
    announced; then check(tmp), True for the expected layout), so a cut download never counts.
    Offline: one line naming the URL and where to put the file by hand."""
    path = os.path.join(cache_dir(), name)
    if os.path.exists(path):
        return path
    if hub is not None:            # not installed, offline or refused: the standard library's way
        with contextlib.suppress(Exception):
            from huggingface_hub import hf_hub_download
            return hf_hub_download(*hub)                    # the Hub's own cache and checks
    import http.client
    import urllib.request

    def download(tmp):
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
        if total and os.path.getsize(tmp) != total:
            raise OSError(f"it stopped at {os.path.getsize(tmp)} of {total} bytes")
        if check is not None and not check(tmp):
            raise UserError(f"{url} did not give the published {name} (its layout is another): "
                            f"download it by hand and put it at {path}")
    print(f"downloading {url} to {path}")
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        atomic_save(download, path)
    except (OSError, http.client.HTTPException) as e:
        raise UserError(f"cannot download {url} ({e}); download it by hand and put it at {path} "
                        f"(or set PURRCEPTION_CACHE to the folder that holds {name})") from None
    return path


LOCK_FILE = "run.lock"


@contextlib.contextmanager
def one_writer(out_dir, instead="pick another --out_dir"):
    """Hold out_dir as its only writer while the block runs: a flock on out_dir/run.lock (which
    records the holder), dropped by the kernel when the holder dies, so kill -9 never blocks a
    resume. A second writer gets a UserError naming the holder and `instead`. A folder made here and
    left empty is removed on exit. (No lock where the OS has no flock: Windows.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    created = not os.path.isdir(out_dir)
    path = os.path.join(out_dir, LOCK_FILE)
    while True:
        try:
            os.makedirs(out_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write into {out_dir} ({e.strerror}); {instead}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder, stop = _lock_holder(fd)
            os.close(fd)
            raise UserError(f"{out_dir} is in use by {holder}; wait for it to end{stop}, or "
                            f"{instead}") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)                 # the holder removed the file as we opened it: once more
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "command": os.path.basename(sys.argv[0]),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    try:
        # as the only writer, what atomic_save temporaries remain are from a writer killed mid-write
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp-*-*")):
            if re.search(r"\.tmp-\d+-[0-9a-f]{8}(\.\w+)?$", tmp):
                os.remove(tmp)
        yield
    finally:
        os.remove(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)


def _lock_holder(fd):
    """-> (who holds the lock, how to stop it) from the lock file's record."""
    try:
        who = json.loads(os.pread(fd, 4096, 0) or b"{}")
        here = who["host"] == socket.gethostname()
        return (f"{who['command']} (pid {who['pid']} on {who['host']}, since {who['since']})",
                f" or stop it (kill {who['pid']}{'' if here else ' on ' + who['host']})")
    except (ValueError, KeyError, OSError):
        return "another process that is starting", ""


PROGRESS_EVERY = 30.0             # seconds between progress lines in a log


def progress(iterable, total=None, desc="", unit="it"):
    """tqdm on a terminal; in a log file, a line with the rate and ETA every PROGRESS_EVERY s."""
    from tqdm import tqdm
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    total = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else None
    t0 = last = time.time()
    for i, item in enumerate(iterable):
        yield item
        now = time.time()
        if now - last >= PROGRESS_EVERY:
            last, rate = now, (i + 1) / (now - t0)
            eta = f", ETA {format_seconds((total - i - 1) / rate)}" if total else ""
            print(f"{desc}: {i + 1}/{total or '?'} {unit} ({rate:.2f} {unit}/s{eta})", flush=True)


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
