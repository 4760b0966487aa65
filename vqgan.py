"""
vqgan.py: the released tokenizers the paper's ImageNet results use, read from their files:

    LlamaGen VQ-8 / VQ-16   vq_ds8_c2i.pt, vq_ds16_c2i.pt    {"model": state_dict}
    LDM vq-f8               the first stage of latent diffusion {"state_dict": state_dict, ...}

Both are taming-transformers' VQGAN autoencoder; their files differ in key names, not in what they
compute. One implementation reads both, its shape taken from the file's tensors, and computes the
same function as the official classes (LlamaGen tokenizer/tokenizer_image/vq_model.py; LDM
ldm/models/autoencoder.py with ldm/modules/diffusionmodules/model.py and taming's
VectorQuantizer2): the same codes and, up to float rounding, the same images. Its keys match the
files' strictly, so a file is read exactly as released or refused in one line.

A VQGAN has the interface of the tokenizer trained here (vq.py): encode(uint8 images) -> indices,
decode(indices) -> images, codebook (K, d) as the decoder consumes it. load_tokenizer, at the end,
reads any tokenizer file, this family's or vq.py's own, telling the files apart by their keys.
"""

import os
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import vq
from vq import ResnetBlock, batched, nearest_code, to_float

# -----------------------------------------------------------------------------
# the encoder and the decoder
#
#     encoder: conv_in -> per level [n_res x (ResnetBlock, + AttnBlock at the attention levels),
#              Downsample but at the last level] -> mid (ResnetBlock, AttnBlock, ResnetBlock)
#              -> GroupNorm, swish, conv_out (z_channels)
#     quant_conv (1x1, z_channels -> d) -> nearest of the K codebook rows
#     -> post_quant_conv (1x1, d -> z_channels)
#     decoder: the mirror, with n_res + 1 blocks a level and nearest-neighbour Upsample
# GroupNorm(32 groups, eps 1e-6) everywhere, swish = x * sigmoid(x), single-head attention.
# LlamaGen VQ-8: width 128, ch_mult (1, 2, 2, 4), attention at the lowest level, z 256, K=16384,
# d=8, and the quantiser l2-normalises both the encoder output and the rows (the rows' stored norms
# are free after training), so the codebook the generator sees is the normalised rows. VQ-16: the
# same with ch_mult (1, 1, 2, 2, 4). LDM vq-f8: width 128, ch_mult (1, 2, 2, 4), attention at 32x32,
# z 4, K=16384, d=4, raw rows and a plain L2 nearest neighbour.


def Normalize(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)


class AttnBlock(nn.Module):
    """x + proj_out(softmax(q k^T / sqrt(C)) v): one head over all h*w positions, 1x1 convs."""

    def __init__(self, ch):
        super().__init__()
        self.norm = Normalize(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(B, 1, C, H * W).transpose(2, 3) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)                             # (B, 1, HW, C)
        return x + self.proj_out(y.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halve H and W: pad one pixel right and bottom, then a 3x3 conv of stride 2 (taming)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Middle(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, ch):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(ch, ch, Normalize), AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch, Normalize)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


def make_level(c_in, c_out, n_blocks, attn):
    """A level: n_blocks ResnetBlocks (the first from c_in), each followed by an AttnBlock where
    the level has attention."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, Normalize)
                                for j in range(n_blocks))
    level.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks) if attn)
    return level


def run_level(level, h):
    """A level's ResnetBlocks, each followed by its AttnBlock where the level has them."""
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


@dataclass
class VQGANConfig:
    """The shape of a released tokenizer, as read from its tensors (read_vqgan_config)."""
    family: str = "llamagen"      # 'llamagen' (l2-normalised codes) or 'ldm' (raw codes)
    ch: int = 128                 # width at full resolution
    ch_mult: tuple = (1, 2, 2, 4)  # width multiplier per level; 2^(levels-1) is the downsampling
    n_res: int = 2                # ResnetBlocks a level in the encoder (the decoder has one more)
    attn_levels: tuple = (3,)     # the levels with attention (0: full resolution)
    z_channels: int = 256         # channels around the quantiser's 1x1 convs
    codebook_size: int = 16384    # K
    code_dim: int = 8             # d
    image_size: int = 256         # the side this project feeds it (ImageNet 256, as in the paper)

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self):
        return self.image_size // self.downsample


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in (1, *cfg.ch_mult)]                        # in, then each level
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            level = make_level(chs[i], chs[i + 1], cfg.n_res, i in cfg.attn_levels)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(chs[i + 1])
            self.down.append(level)
        self.mid = Middle(chs[-1])
        self.norm_out = Normalize(chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)                                     # halve H and W
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f). up[i] is level i, run from the lowest up."""

    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[-1], 3, padding=1)
        self.mid = Middle(chs[-1])
        self.up = nn.ModuleList()
        for i in range(len(chs)):
            c_in = chs[i + 1] if i + 1 < len(chs) else chs[-1]      # the level below's width
            level = make_level(c_in, chs[i], cfg.n_res + 1, i in cfg.attn_levels)
            if i != 0:
                level.upsample = Upsample(chs[i])
            self.up.append(level)
        self.norm_out = Normalize(chs[0])
        self.conv_out = nn.Conv2d(chs[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)                                       # double H and W
        return self.conv_out(F.silu(self.norm_out(h)))

# -----------------------------------------------------------------------------
# the tokenizer: encoder, quantiser, decoder behind vq.py's interface


@contextmanager
def exact_fp32():
    """No TF32 inside (CUDA's convolutions use it by default): a trained codebook's nearest-code
    margins can be 1e-5, under what TF32's 10-bit mantissa changes."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


class VQGAN(nn.Module):
    """A released tokenizer with this project's interface: encode(uint8) -> indices,
    decode(indices) -> images, codebook (K, d) as the decoder consumes it. Always fp32."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.codebook_size, cfg.code_dim)

    @property
    def l2_norm(self):
        return self.cfg.family == "llamagen"

    @property
    def codebook(self):
        """E: (K, d) float32: LlamaGen's rows normalised (what its decoder receives), LDM's raw."""
        E = self.quantize.embedding.weight.detach().float()
        return (F.normalize(E, dim=1) if self.l2_norm else E).clone()

    @torch.no_grad()
    def encode(self, images, batch_size=32):
        """images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] -> indices (N, h, w) int64,
        on cpu."""
        E = self.codebook.to(next(self.parameters()).device)

        def enc(x):
            z = self.quant_conv(self.encoder(to_float(x))).permute(0, 2, 3, 1).contiguous()
            z = F.normalize(z, dim=-1) if self.l2_norm else z               # (b, h, w, d)
            return nearest_code(z, E)                                       # (b, h, w)
        with exact_fp32():
            return batched(self, enc, torch.as_tensor(images), batch_size)

    @torch.no_grad()
    def decode_z(self, z, batch_size=32):
        """z: (N, h, w, d) points in code space -> images (N, 3, H, W), on cpu."""
        dec = lambda zb: self.decoder(self.post_quant_conv(zb.float().permute(0, 3, 1, 2)))
        with exact_fp32():
            return batched(self, dec, z, batch_size)

    @torch.no_grad()
    def decode(self, indices, batch_size=32):
        """indices: (N, h, w) integers in [0, K) -> images (N, 3, H, W) in [-1, 1], on cpu."""
        return self.decode_z(self.codebook[torch.as_tensor(indices).long()], batch_size)

# -----------------------------------------------------------------------------
# reading the files: LlamaGen's key names, the shape from the tensors, a strict load

# LlamaGen's key names -> the ones above (LDM's): its levels are conv_blocks.{i}.res/.attn, its
# middle a list, and its decoder's levels counted from the lowest resolution up.
LLAMAGEN_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}
LLAMAGEN_DROP = ("quantize.codebook_used",)       # the usage ring buffer of its training loop
LDM_DROP = ("loss.",)                             # the LPIPS and discriminator of its training loss


def rename_llamagen(sd):
    """A LlamaGen VQModel state dict -> VQGAN's key names (and its usage buffer dropped)."""
    n_dec = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.conv_blocks."))
    out = {}
    for key, value in sd.items():
        if key.startswith(LLAMAGEN_DROP):
            continue
        part = key.split(".")
        if part[1] == "mid":
            part[2] = LLAMAGEN_MID[part[2]]
        elif part[1] == "conv_blocks":
            i = int(part[2]) if part[0] == "encoder" else n_dec - 1 - int(part[2])
            part[1:3] = ["down" if part[0] == "encoder" else "up", str(i)]
            part[3] = {"res": "block"}.get(part[3], part[3])
        out[".".join(part)] = value
    return out


def read_vqgan_config(sd, family):
    """VQGAN's shape from its tensors: width, levels and their widths, blocks a level, the levels
    with attention, z channels, K and d."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    width = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    n_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    attn = tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    K, d = sd["quantize.embedding.weight"].shape
    return VQGANConfig(family=family, ch=ch, ch_mult=tuple(w // ch for w in width), n_res=n_res,
                       attn_levels=attn, z_channels=sd["quant_conv.weight"].shape[1],
                       codebook_size=K, code_dim=d)


def load_vqgan(ckpt):
    """A released checkpoint dict -> VQGAN, or None when it is neither LlamaGen's nor LDM's."""
    sd = ckpt.get("model") if isinstance(ckpt.get("model"), dict) else ckpt.get("state_dict")
    if not isinstance(sd, dict):
        return None
    if any(k.startswith("encoder.conv_blocks.") for k in sd):
        family, sd = "llamagen", rename_llamagen(sd)
    elif "encoder.down.0.block.0.conv1.weight" in sd:
        family, sd = "ldm", {k: v for k, v in sd.items() if not k.startswith(LDM_DROP)}
    else:
        return None
    model = VQGAN(read_vqgan_config(sd, family))
    want = model.state_dict()
    for key in sorted(want.keys() | sd.keys()):  # strict: every key, every shape, as released
        if key not in sd or key not in want or sd[key].shape != want[key].shape:
            raise ValueError(f"its key {key} " + ("is missing" if key not in sd else "is unexpected"
                             if key not in want else f"has the shape {tuple(sd[key].shape)}, not "
                             f"{tuple(want[key].shape)}"))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model

# -----------------------------------------------------------------------------
# any tokenizer file


# The released tokenizers by name (--tokenizer=NAME): the published files, downloaded once into
# cli.cache_dir(). LDM's comes as a zip whose model.ckpt is a Lightning file.
LLAMAGEN = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/"
RELEASED = {
    "llamagen-vq8": (LLAMAGEN + "vq_ds8_c2i.pt", ("FoundationVision/LlamaGen", "vq_ds8_c2i.pt")),
    "llamagen-vq16": (LLAMAGEN + "vq_ds16_c2i.pt", ("FoundationVision/LlamaGen", "vq_ds16_c2i.pt")),
    "ldm-vqf8": ("https://ommer-lab.com/files/latent-diffusion/vq-f8.zip", None),
}


def is_tokenizer_file(path):
    try:
        return bool(vq.read_vq(path))
    except cli.UserError:
        return False


def tokenizer_file(name):
    """A tokenizer file's path: as given, or for a name in RELEASED the published file, fetched on
    first use (its layout checked before it counts; LDM's model.ckpt taken out of its zip)."""
    if name not in RELEASED:
        return name
    url, hub = RELEASED[name]
    if not url.endswith(".zip"):
        return cli.fetch(url, os.path.basename(url), hub, check=is_tokenizer_file)
    ckpt = os.path.join(cli.cache_dir(), f"{name}.ckpt")
    if not os.path.exists(ckpt):
        is_zip_with_ckpt = lambda path: zipfile.is_zipfile(path) and any(
            n.endswith("model.ckpt") for n in zipfile.ZipFile(path).namelist())

        archive = cli.fetch(url, os.path.basename(url), None, is_zip_with_ckpt)

        def extract(tmp):
            with zipfile.ZipFile(archive) as z:
                member = next(n for n in z.namelist() if n.endswith("model.ckpt"))
                with z.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        cli.atomic_save(extract, ckpt)
    return ckpt


def load_tokenizer(path, device="cpu"):
    """Any tokenizer file (vq.py's own, LlamaGen's VQ-8/VQ-16, LDM's vq-f8, or a save_pointer to
    one), or a name in RELEASED -> its model, in eval mode on device; the architecture comes from
    the file."""
    path = tokenizer_file(path)
    ckpt = vq.read_vq(path)
    if "released" in ckpt:                       # a data folder's pointer (prepare_data.py)
        target = ckpt["released"]
        if not os.path.exists(target) or vq.file_sha1(target) != ckpt["sha1"]:
            raise cli.UserError(f"{path} stands for the tokenizer {target}, which is "
                                + ("missing" if not os.path.exists(target) else "another file "
                                   "now (its sha1 changed)")
                                + "; put the file back, or encode the folder again with "
                                  "encode_folder.py and --force")
        model = load_tokenizer(target, device)
        if not isinstance(model, vq.VQVAE):
            model.cfg = replace(model.cfg, image_size=ckpt["image_size"])
        return model
    if "vq_config" in ckpt:
        model = vq.VQVAE(vq.VQConfig(**ckpt["vq_config"]))
        model.load_state_dict(ckpt["model"])
    else:
        model = load_released(path, ckpt)                # LlamaGen's or LDM's layout
    if not all(v.isfinite().all() for v in model.state_dict().values() if v.is_floating_point()):
        raise cli.UserError(f"{path} holds weights or a codebook that are not finite (a diverged "
                            f"or damaged tokenizer); train it again or fetch the file again")
    return model.to(device).eval()


def load_released(path, ckpt):
    """A released tokenizer's checkpoint dict -> a VQGAN, or a UserError naming the file."""
    try:
        model = load_vqgan(ckpt)
    except (KeyError, ValueError, RuntimeError) as e:
        raise cli.UserError(f"{path} is laid out like a released tokenizer, but {e}; it reads "
                            + ", ".join(vq.LAYOUTS)) from None
    if model is None:
        raise cli.UserError(f"{path} is not a tokenizer file; it reads " + ", ".join(vq.LAYOUTS))
    return model
