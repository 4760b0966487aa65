"""
encode_folder.py: an image folder of any size -> uint16 token files for purrception.py, through a
tokenizer file (LlamaGen's VQ-8/VQ-16, LDM's vq-f8, or one written by vq.py), on one GPU or many.

    python encode_folder.py --data_dir=ROOT --name=imagenet256 --tokenizer=llamagen-vq8 \\
        --workers=8 --batch_size=64
    torchrun --standalone --nproc_per_node=8 encode_folder.py --data_dir=ROOT --name=imagenet256 \\
        --tokenizer=llamagen-vq8

It writes data/NAME/ as prepare_data.py does ({train,val}.bin and _labels.bin, meta.json), with
vq.pt a pointer to the tokenizer file (vq.save_pointer), so training and sample.py read it alike.
Nothing per image is kept but its tokens: worker processes decode and crop (ADM's centre crop),
the encoder takes batches, and every --chunk images become one small file
data/NAME/.tokens-KEY/{split}.{c:06d}.npz, written atomically as it comes. A run killed at any
moment (kill -9) resumes from the chunks on disk when the same command runs again. Under torchrun
process r encodes chunks r, r + world, ...; a chunk's batches are the same whichever process
encodes it, so the token files, assembled in order at the end, are byte-identical to one
process's. KEY hashes all the tokens depend on (the tokenizer file, the image size, the file list,
chunk and batch sizes), so other settings never mix with a run's chunks.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import time
import uuid
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import cli
import vq
import vqgan
from cli import UserError
from prepare_data import (FILES, TOKEN_FILES, check_writable, data_path, load_image,
                          record_source, remove, split_imagefolder, write_file)


@dataclass
class EncodeConfig:
    data_dir: str = ""            # ROOT: ROOT/<class>/* or ROOT/{train,val}/<class>/*
    name: str = ""                # the folder data/<name>
    tokenizer: str = ""           # a file (LlamaGen's, LDM's, vq.py's) or a name: llamagen-vq8, ...
    image_size: int = 256         # image side after ADM's centre crop
    workers: int = 4              # processes that decode and crop images (0: this process)
    batch_size: int = 64          # images a batch of the encoder
    chunk: int = 1024             # images a resumable piece (a kill loses at most one a process)
    skip_unreadable: bool = False  # leave out (and count) files that do not decode, not stop
    force: bool = False           # redo the tokens of a folder made with other settings
    seed: int = 0                 # the held-out split of a flat ROOT/<class>/ folder
    device: str = ""              # encoder device; '' picks cuda, then mps, then cpu


RANGES = {"image_size": (lambda v: v >= 1, "at least 1"),
          "workers": (lambda v: v >= 0, "at least 0"),
          "batch_size": (lambda v: v >= 1, "at least 1"),
          "chunk": (lambda v: v >= 1, "at least 1")}

# -----------------------------------------------------------------------------
# decoding: worker processes read and crop images, the encoder gets them in batches


class ImageFiles(torch.utils.data.Dataset):
    """[(file, label)] -> (index, uint8 (S, S, 3) image or None, what went wrong). The paths live
    in one numpy array: a forked worker that reads Python strings writes their reference counts,
    and so copies, page by page, the list it inherited (162 bytes an image)."""

    def __init__(self, files, image_size):
        self.paths, self.image_size = np.array([os.fsencode(f) for f, _ in files]), image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, load_image(os.fsdecode(self.paths[i]), self.image_size), ""
        except Exception as e:                # PIL raises many kinds; name the file instead
            return i, None, f"{type(e).__name__}: {e}"


def end_with_parent(worker_id):
    """A decoding worker leaves SIGINT (Ctrl-C, sent to every process of the terminal) to the
    process that started it, ends at SIGTERM, and (Linux) ends when that process does, even after
    a kill -9 (which leaves the loader no chance to stop it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):       # another OS: the loader's own checks remain
        pass

# -----------------------------------------------------------------------------
# chunks: {split}.{c:06d}.npz, written as they are encoded, read back in order at the end


def stream_split(model, files, workdir, split, image_size, *, chunk, batch_size, workers,
                 skip_unreadable, rank=0, world=1, all_chunks=0, log=print):
    """Encode this process's missing chunks of files [(file, label)] into workdir (all_chunks:
    of both splits, for the line a stop ends with)."""
    n_chunks = -(-len(files) // chunk)
    todo = [c for c in range(rank, n_chunks, world)
            if not os.path.exists(os.path.join(workdir, f"{split}.{c:06d}.npz"))]
    bounds = [(c * chunk, min((c + 1) * chunk, len(files))) for c in todo]
    batches = [range(s, min(s + batch_size, end)) for start, end in bounds
               for s in range(start, end, batch_size)]
    if len(todo) < len(range(rank, n_chunks, world)):
        log(f"tokenize {split}: resuming, {len(todo)} of {n_chunks} chunks left to this process")
    # the loader keeps at most 2 batches a worker in flight: memory does not grow with the images
    loader = torch.utils.data.DataLoader(ImageFiles(files, image_size), batch_sampler=batches,
                                         num_workers=workers, collate_fn=list,
                                         worker_init_fn=end_with_parent)
    tokens, labels, skipped, t0, n = [], [], [], time.time(), 0
    for batch in cli.progress(loader, total=len(batches), desc=f"tokenize {split}", unit="batch"):
        for i, _, err in (b for b in batch if b[1] is None):
            if not skip_unreadable:
                raise UserError(f"cannot read image {files[i][0]} ({err}); replace it, or pass "
                                f"--skip_unreadable=true to leave out such files (counted)")
            skipped.append(i)
        good = [(i, image) for i, image, _ in batch if image is not None]
        if good:
            idx = model.encode(np.stack([image for _, image in good]), batch_size=len(good))
            tokens.append(idx.reshape(len(good), -1).numpy().astype(np.uint16))   # (b, h*w)
            labels += [files[i][1] for i, _ in good]
        n, last = n + len(batch), batch[-1][0]
        if last + 1 == min((last // chunk + 1) * chunk, len(files)):     # the chunk is complete
            arrays = dict(tokens=np.concatenate(tokens) if tokens else np.zeros((0, 0), np.uint16),
                          labels=np.array(labels, np.uint16), skipped=np.array(skipped, np.int64))
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            write_file(os.path.join(workdir, f"{split}.{last // chunk:06d}.npz"),
                       [buffer.getvalue()])
            note_chunks(workdir, all_chunks)
            tokens, labels, skipped = [], [], []
    if n:
        dt = time.time() - t0
        log(f"tokenize {split}: {n} images in {dt:.1f}s ({n / dt:.2f} images/s, "
            f"{workers} decoding workers)")


def note_chunks(workdir, all_chunks):
    """cli.stop_note: how many chunks a stop keeps."""
    done = sum(f.endswith(".npz") and ".tmp-" not in f for f in os.listdir(workdir))
    cli.stop_note = (f"{done} of {all_chunks} chunks in {workdir} are kept; the same command "
                     f"resumes")


def read_chunks(workdir, split, n):
    """The chunk files of a split, in order, one at a time -> (tokens, labels, skipped)."""
    for c in range(n):
        path = os.path.join(workdir, f"{split}.{c:06d}.npz")
        if not os.path.exists(path):
            raise UserError(f"{path} is missing; run the same command again to encode it")
        with np.load(path, allow_pickle=False) as z:
            yield z["tokens"], z["labels"], z["skipped"]


def remove_chunks(folder, keep, log):
    """Remove the chunk folders in folder but keep (a path, or None)."""
    for old in os.listdir(folder):
        if old.startswith(".tokens-") and os.path.join(folder, old) != keep:
            log(f"removing {old}: the chunks of other settings or of a finished run")
            shutil.rmtree(os.path.join(folder, old))


def all_agree(ok, world, device):
    """True when every process says ok (one all-reduce; the processes wait for each other)."""
    if world == 1:
        return ok
    import torch.distributed as dist
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def together(step, world, device, why):
    """step() on every process; a UserError on any stops all of them (why: the others' line)."""
    error = None
    try:
        step()
    except UserError as e:                    # the others must not wait for this process forever
        error = e
    if not all_agree(error is None, world, device):
        raise error or UserError(why)


@contextlib.contextmanager
def only_writer(folder, workdir, rank, world, device):
    """The block runs with process 0 as folder's only writer (cli.one_writer: a second run is
    refused in one line; what a killed run left half-written is removed, in workdir too)."""
    with contextlib.ExitStack() as stack:
        def hold():
            if rank == 0:
                stack.enter_context(cli.one_writer(folder, "pass --name=OTHER"))
                if os.path.isdir(workdir):
                    remove(*(os.path.join(workdir, f) for f in os.listdir(workdir)
                             if ".tmp-" in f))
        together(hold, world, device, f"process 0 could not take {folder} (its error is above)")
        yield

# -----------------------------------------------------------------------------
# stream_folder: the folder, checked, encoded chunk by chunk, then assembled


def stream_folder(data_dir, name, tokenizer, image_size=256, *, force=False, seed=0, workers=4,
                  batch_size=64, chunk=1024, skip_unreadable=False, device="", rank=0, world=1,
                  log=print):
    """An image folder -> data/NAME/{train,val}.bin and _labels.bin, meta.json and source.json,
    streamed through the tokenizer file (vqgan.load_tokenizer: vq.py's own, LlamaGen's, LDM's),
    with process 0 the folder's only writer. -> the folder."""
    folder = data_path(name)
    check_writable(folder)
    classes, train, val = split_imagefolder(data_dir, seed)
    device = device or cli.pick_device("")
    if tokenizer in vqgan.RELEASED:        # a name: process 0 fetches it once, the rest find it
        fetch = lambda: vqgan.tokenizer_file(tokenizer) if rank == 0 else None
        together(fetch, world, device, "process 0 could not fetch the tokenizer (see its line)")
        tokenizer = vqgan.tokenizer_file(tokenizer)
    if not os.path.isfile(tokenizer):
        raise UserError(f"no tokenizer file at {tokenizer}; pass --tokenizer=FILE: LlamaGen's, "
                        f"LDM's, or a vq.pt of prepare_data.py's, or a name: "
                        f"{', '.join(vqgan.RELEASED)}")
    model = vqgan.load_tokenizer(tokenizer, device)
    f = model.cfg.image_size // model.cfg.grid
    if isinstance(model, vqgan.VQGAN):           # a released tokenizer reads any multiple of f
        model.cfg = replace(model.cfg, image_size=image_size)
    if model.cfg.image_size != image_size or image_size % f:
        raise UserError(f"the tokenizer {tokenizer} takes {model.cfg.image_size}px images with a "
                        f"grid of {f}px cells; pass a matching --image_size")
    K, L = model.cfg.codebook_size, model.cfg.grid ** 2
    if K > 65536:
        raise UserError(f"the tokenizer {tokenizer} has K={K} codes: more than uint16 tokens hold")
    sha1, p = vq.file_sha1(tokenizer), {f: os.path.join(folder, f) for f in FILES}
    splits, key = {"train": train, "val": val}, hashlib.sha1(
        json.dumps([sha1, image_size, chunk, batch_size, skip_unreadable]).encode())
    for split, files in splits.items():           # the file list, without one big string
        for path, label in files:
            key.update(f"{split}\0{path}\0{label}\n".encode())
    workdir = os.path.join(folder, f".tokens-{key.hexdigest()[:12]}")
    with only_writer(folder, workdir, rank, world, device):
        meta = cli.read_json(p["meta.json"]) if os.path.exists(p["meta.json"]) else {}
        before = {"dataset": meta.get("dataset"), "image_size": meta.get("image_size"),
                "released_sha1": meta.get("released_sha1")}
        asked = {"dataset": "imagefolder", "image_size": image_size, "released_sha1": sha1}
        if before == asked and "tokenizer" in meta and not force and all(
                os.path.exists(p[f]) for f in TOKEN_FILES):
            if rank == 0:
                remove_chunks(folder, None, log)   # left by a run stopped after its last write
            log(f"{folder}: tokens exist, skipping")
            return folder
        if meta and before != asked and not force:  # (equal: a run stopped while finishing)
            diff = [f"{k}={v} (asked for {asked[k]})" if k != "released_sha1" else
                    f"the tokenizer {meta.get('released_tokenizer', 'vq.pt')} (not {tokenizer})"
                    for k, v in before.items() if v != asked[k]]
            raise UserError(f"{folder} was made with {', '.join(diff) or 'other settings'}; pass "
                            f"--force to redo it (its files are replaced only when the new ones "
                            f"are complete), or --name=OTHER")
        os.makedirs(workdir, exist_ok=True)
        if rank == 0:                             # chunks of other settings can never be used
            remove_chunks(folder, workdir, log)
        done = sum(os.path.getsize(os.path.join(workdir, c)) for c in os.listdir(workdir))
        total = 2 * L * (len(train) + len(val)) + 2 * (len(train) + len(val))
        cli.check_space(folder, 2 * total - done, 2 * L * len(train), "the tokens")
        log(f"tokenizing {len(train)} train and {len(val)} val images of {len(classes)} classes "
            f"from {data_dir} with {tokenizer} (K={K}, {model.cfg.grid}x{model.cfg.grid} grid) on "
            f"{device}, {world} process{'es' * (world > 1)}")
        n_chunks = {split: -(-len(files) // chunk) for split, files in splits.items()}
        note_chunks(workdir, sum(n_chunks.values()))
        def encode():
            for split, files in splits.items():
                stream_split(model, files, workdir, split, image_size, chunk=chunk,
                             batch_size=batch_size, workers=workers,
                             skip_unreadable=skip_unreadable, rank=rank, world=world,
                             all_chunks=sum(n_chunks.values()), log=log)
        together(encode, world, device, "another process stopped (its error is above); fix it "
                                        "and run the same command again: it resumes")
        if rank == 0:
            counts, unreadable = assemble(workdir, splits, n_chunks, L, p, tokenizer, image_size)
            meta = {"dataset": "imagefolder", "image_size": image_size, "seed": seed,
                    "num_classes": len(classes), "class_names": classes,
                    "train_count": counts["train"], "val_count": counts["val"],
                    "grid_h": model.cfg.grid, "grid_w": model.cfg.grid, "codebook_size": K,
                    "code_dim": int(model.codebook.shape[1]), "tokenizer": "vq.pt",
                    "tokenizer_sha1": vq.file_sha1(p["vq.pt"]),
                    "released_tokenizer": os.path.abspath(tokenizer), "released_sha1": sha1,
                    "tokenizer_config": asdict(model.cfg), "preprocessing": "ADM centre crop",
                    "unreadable_skipped": len(unreadable)}
            cli.write_json(meta, p["meta.json"])
            shutil.rmtree(workdir)
            remove(p["train_images.u8"], p["val_images.u8"], p["vq_recon.png"])  # prepare_data's
            record_source(folder, data_dir=data_dir, name=name, tokenizer=tokenizer,
                          image_size=image_size, seed=seed, skip_unreadable=skip_unreadable,
                          workers=workers, batch_size=batch_size, chunk=chunk)
            if unreadable:
                log(f"skipped {len(unreadable)} unreadable images, e.g. {unreadable[0]}")
            log(f"wrote {folder}: {counts['train']} train / {counts['val']} val images as "
                f"{model.cfg.grid}x{model.cfg.grid} tokens in [0, {K})")
    return folder


def staged(path):
    """A name beside path for its next version, in cli.atomic_save's pattern for temporaries
    (cli.one_writer removes those a killed writer left)."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def assemble(workdir, splits, n_chunks, L, p, tokenizer, image_size):
    """Every chunk is on disk: the token files are assembled beside the old ones (under
    atomic_save's temporary names, removed on any failure or stop) and replace them only once
    all are written; until meta.json is rewritten, the folder reads as half made.
    -> ({split: images}, [unreadable files])."""
    cli.stop_note = (f"the chunks in {workdir} are kept; the same command assembles the token "
                     f"files from them")
    new = {f: staged(p[f]) for f in ("train.bin", "train_labels.bin", "val.bin",
                                     "val_labels.bin", "vq.pt")}
    counts, unreadable = {}, []
    try:
        for split, files in (("val", splits["val"]), ("train", splits["train"])):
            chunks = lambda: read_chunks(workdir, split, n_chunks[split])
            labels = np.concatenate([y for _, y, _ in chunks()])
            unreadable += [files[i][0] for _, _, s in chunks() for i in s]
            write_file(new[f"{split}.bin"], (t.tobytes() for t, _, _ in chunks()),
                       2 * L * len(labels))
            write_file(new[f"{split}_labels.bin"], [labels.tobytes()])
            counts[split] = len(labels)
        vq.save_pointer(new["vq.pt"], tokenizer, image_size)   # vq.pt: the tokenizer file
        meta = cli.read_json(p["meta.json"]) if os.path.exists(p["meta.json"]) else {}
        if "tokenizer" in meta:
            cli.write_json({k: v for k, v in meta.items() if k != "tokenizer"}, p["meta.json"])
        for f, tmp in new.items():
            os.replace(tmp, p[f])
    except UserError as e:
        raise UserError(f"{e} ({os.path.dirname(workdir)}'s own files are as they were, and the "
                        f"same command resumes from the chunks on disk)") from None
    finally:
        remove(*new.values())
    return counts, unreadable

# -----------------------------------------------------------------------------
# command line: one process, or one a GPU under torchrun


def main(argv):
    t0 = time.time()
    opt = cli.parse_args(argv, EncodeConfig(), doc=__doc__)
    needed = {"data_dir": "--data_dir=ROOT", "name": "--name=NAME", "tokenizer": "--tokenizer=FILE"}
    missing = [flag for key, flag in needed.items() if not getattr(opt, key)]
    if missing:
        raise UserError(f"pass {' '.join(missing)} too (see --help)")
    cli.check_ranges(opt, RANGES)
    rank, _, world, device = cli.setup_distributed(opt.device)
    folder = stream_folder(opt.data_dir, opt.name, opt.tokenizer, opt.image_size, force=opt.force,
                           seed=opt.seed, workers=opt.workers, batch_size=opt.batch_size,
                           chunk=opt.chunk, skip_unreadable=opt.skip_unreadable, device=device,
                           rank=rank, world=world, log=print if rank == 0 else lambda *a: None)
    if rank == 0:
        print(f"done in {time.time() - t0:.0f}s: {folder}")


if __name__ == "__main__":
    cli.run(main)
