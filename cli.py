"""
cli.py: what every command line here shares, kept out of the way of the code worth reading (nanoGPT
keeps its flags in configurator.py for the same reason).

- flags: every field of a dataclass is a flag, --key=value, typed by its default; --help prints each
  flag with the comment beside its field and its value after the dataset's preset;
- UserError: the one kind of error for bad input; `run` prints it as one line and exits with
  status 2;
- pick_device, atomic_save and progress: one of each, for every script.
"""

import difflib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import fields, replace


class UserError(ValueError):
    """Bad input (a flag, a missing or damaged file). Entry points print it as one line and exit
    non-zero."""


def run(main, argv=None):
    """Call main(argv) and turn a UserError into one line on stderr and exit status 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        sys.exit(f"error: {e}")

# -----------------------------------------------------------------------------
# flags


def field_comments(cls):
    """{field: the comment beside it} from the dataclass's source, for --help."""
    lines = []
    for klass in reversed(cls.__mro__):                       # a subclass's comments win
        try:
            lines += inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            pass
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
        if typ is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
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
    """['--dataset=cifar10', '--lr=3e-4'] -> a copy of the dataclass cfg with the dataset's preset
    (if presets are given), then the flags, applied; the last word wins. `extra` maps more flag
    prefixes ('vq.') to dicts of defaults whose typed values are returned in a second dict
    (extra_help: their meanings). A mistake raises UserError saying what to type."""
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
            hint = difflib.get_close_matches(key, known, n=1)
            raise UserError(f"unknown option {arg.partition('=')[0]!r}"
                            + (f" (did you mean --{hint[0]}?)" if hint else "")
                            + "; --help lists them all")
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
    """rules: {field: (test, what it must be)}; the first field whose value fails its test is a
    UserError."""
    for name, (test, must) in rules.items():
        value = getattr(cfg, name)
        if not test(value):
            raise UserError(f"--{name}={value} is impossible: it must be {must}")

# -----------------------------------------------------------------------------
# devices, files, progress


def pick_device(name=""):
    """'' -> cuda, then mps, then cpu; a named device is checked to exist."""
    import torch
    if not name:
        return ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device={name}: use cuda, mps or cpu (or '' to pick the best available)")
    if (kind == "cuda" and not torch.cuda.is_available()
            or kind == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device={name}, but this machine has no {kind}; try --device=cpu")
    return name


def atomic_save(write, path):
    """write(tmp_path), then rename over path: an interrupted write never leaves a broken file at
    path."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


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
        raise UserError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                        f"it was cut short or edited by hand: delete it and prepare the "
                        f"folder again") from None


PROGRESS_EVERY = 30.0             # seconds between progress lines in a log


def progress(iterable, total=None, desc="", unit="it"):
    """tqdm on a terminal; elsewhere (a log file) a line every PROGRESS_EVERY seconds with the rate
    and the ETA."""
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
