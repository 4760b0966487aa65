"""
token_folder.py: the checks a token folder (data/NAME/, from prepare_data.py or encode_folder.py)
passes before training and sampling read it: meta.json against the token files, every token
against K, and the tokenizer against the file that made the tokens. Each failure is one line whose
hint (prepare_data.remake) is the command that makes the folder again.

purrception.py opens its folder with open_for_training (which prepares shapes and cifar10 when
missing); sample.py, bench.py and the tests with open_folder.
"""

import os
import shlex

import numpy as np

import cli
import vq
import vqgan
from cli import UserError
from prepare_data import CIFAR10_DIR, data_path, prepare, remake, remake_command

# -----------------------------------------------------------------------------
# meta.json and the token files it describes


def load_meta(data_dir):
    """meta.json of a token folder (K, d, grid, classes, counts, the tokenizer file), checked
    against the token files it describes: any mismatch is a UserError naming the file and the
    command that makes it again, before anything is trained."""
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        raise UserError(f"no prepared tokens in {data_dir} (no meta.json); make them with "
                        f"{remake(data_dir)}")
    meta = cli.read_json(os.path.join(data_dir, "meta.json"))
    need = ("grid_h", "grid_w", "codebook_size", "code_dim", "num_classes", "train_count",
            "val_count", "tokenizer")
    if not isinstance(meta, dict) or not all(k in meta for k in need):
        raise UserError(f"{data_dir} is only half prepared; finish it with "
                        f"{remake(data_dir, meta if isinstance(meta, dict) else {})}")
    for split in ("train", "val"):
        n, hw = meta[f"{split}_count"], meta["grid_h"] * meta["grid_w"]
        for name, size in ((f"{split}.bin", n * hw * 2), (f"{split}_labels.bin", n * 2)):
            path = os.path.join(data_dir, name)
            have = os.path.getsize(path) if os.path.exists(path) else None
            if have != size:
                state = "is missing" if have is None else f"holds {have} bytes where meta.json " \
                                                           f"says {size}"
                raise UserError(f"{path} {state}; it is damaged: make the folder again with "
                                f"{remake(data_dir, meta, force=True)}")
    return meta


def check_tokens(data_dir, meta):
    """Every token < K and every label < num_classes: a cheap pass over the files
    (31 MB for CIFAR-10)."""
    for split in ("train", "val"):
        for name, limit in ((f"{split}.bin", meta["codebook_size"]),
                            (f"{split}_labels.bin", meta["num_classes"])):
            path = os.path.join(data_dir, name)
            if (top := int(np.memmap(path, np.uint16, mode="r").max(initial=0))) >= limit:
                raise UserError(f"{path} holds {top}, but meta.json allows < {limit}: the tokens "
                                f"and meta.json disagree; make the folder again with "
                                f"{remake(data_dir, meta, force=True)}")


# -----------------------------------------------------------------------------
# the tokenizer that made the tokens, and the folder a training run reads


def open_folder(data_dir, device="cpu", check=True):
    """A token folder -> (meta, tokenizer on device): meta.json checked against the token files
    (with check, every token against K), the tokenizer checked to be the file that made them (the
    images' size, downsampling, K, d, grid, then sha1). Else one line with a command that works."""
    meta = load_meta(data_dir)
    if check:
        check_tokens(data_dir, meta)
    streamed = "released_tokenizer" in meta   # encode_folder.py's: only --force encodes again
    path = os.path.join(data_dir, meta["tokenizer"])
    if not os.path.exists(path):
        raise UserError(f"no tokenizer at {path}; make it again and re-tokenize with "
                        f"{remake(data_dir, meta, force=streamed)}")
    tokenizer = vqgan.load_tokenizer(path, device)
    command, made = remake_command(data_dir, meta, force=streamed)
    here = not streamed and os.path.isdir(made) and os.path.samefile(made, data_dir)
    fresh = f"`rm {shlex.quote(path)} && {command}`" if here else remake(data_dir, meta, streamed)
    redo = f"put the tokenizer that made them back, or make another and retokenize: {fresh}"
    c, trained = tokenizer.cfg, meta.get("vq_config", {})
    have = (getattr(c, "image_size", None), getattr(c, "downsample", None))
    px = meta.get("image_size", have[0])
    want = (px, trained.get("downsample", px // meta["grid_h"] if px else have[1]))
    if have != want:
        raise UserError(f"the tokenizer {path} reads {have[0]}px images downsampled {have[1]}x, "
                        f"but the tokens in {data_dir} were made from {want[0]}px images "
                        f"downsampled {want[1]}x; {redo}")
    have = (c.codebook_size, c.code_dim, c.grid)
    if have != (meta["codebook_size"], meta["code_dim"], meta["grid_h"]):
        raise UserError(f"the tokenizer {path} has K={have[0]}, d={have[1]}, a {have[2]}-grid but "
                        f"the tokens were made with K={meta['codebook_size']}, d={meta['code_dim']}"
                        f", a {meta['grid_h']}-grid; {redo}")
    if meta.get("tokenizer_sha1") and vq.file_sha1(path) != meta["tokenizer_sha1"]:
        # prepare_data.py retokenizes with a vq.pt trained on this folder's images (`python vq.py`)
        own = here and vq.read_vq(path).get("trained_on") in (None, "", os.path.basename(made))
        raise UserError(f"the tokenizer {path} is not the file that made the tokens in {data_dir} "
                        f"(its sha1 is not meta.json's tokenizer_sha1); " + (
                            f"put that one back, or retokenize with this one: `{command}`" if own
                            else redo))
    return meta, tokenizer


def open_for_training(dataset, data_dir="", launched=False, device="cpu"):
    """The token folder a training run reads: data_dir, else data/<dataset>, prepared on the spot
    when missing (shapes and cifar10, unless launched by torchrun) -> (folder, meta, tokenizer on
    device), checked by open_folder. The grid must be square (the DiT's)."""
    folder = data_dir or data_path(dataset)
    if not os.path.exists(os.path.join(folder, "meta.json")):
        hint = remake(folder, {"dataset": dataset})
        if data_dir and (os.path.isfile(data_dir) or any(os.path.exists(os.path.join(
                data_dir, f)) for f in ("cifar-10-python.tar.gz", CIFAR10_DIR, "batches.meta"))):
            typed = cli.command("prepare_data.py", "--dataset=cifar10",
                                f"--data_dir={os.path.abspath(data_dir)}")     # CIFAR-10 itself
            hint = f"`{typed}` (it writes {data_path('cifar10')}: pass that as --data_dir)"
        if data_dir or launched or dataset not in ("shapes", "cifar10"):
            raise UserError(f"no prepared tokens in {folder}; run {hint}"
                            + (" once before torchrun" if launched else ""))
        print(f"no prepared data in {folder}: preparing it now (prepare_data.prepare('{dataset}'))")
        prepare(dataset)
    meta, tokenizer = open_folder(folder, device)
    if meta["grid_h"] != meta["grid_w"]:
        raise UserError(f"the token grid {(meta['grid_h'], meta['grid_w'])} is not square; "
                        "prepare square images (prepare_data crops them)")
    return folder, meta, tokenizer
