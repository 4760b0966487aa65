"""Tests of what every file shares: the copyable functions run alone, imports run one way, every
command line parses flags the same way and answers --help with meanings."""

import ast
import importlib
import os
import re

import pytest
import torch

import cli
from conftest import ROOT

SCRIPTS = ("purrception", "baselines", "sample", "prepare_data", "vq", "compare", "bench", "fid")


def copied_names():
    """The names the README's 'Copy this' paragraph tells people to copy (before 'Pasted')."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    text = readme.split("**Copy this:**")[1].split("Pasted")[0]
    return re.findall(r"`(\w+)`", text)


def pasted(names):
    """The functions and classes named in `names` (from purrception.py, and vq.py's readout),
    pasted into a namespace that holds only torch."""
    chunks = []
    for file in ("purrception.py", "vq.py"):              # vq.py: nearest_code, the one readout
        source = open(os.path.join(ROOT, file)).read()
        chunks += [ast.get_source_segment(source, node, padded=True)
                   for node in ast.parse(source).body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names]
    assert len(chunks) == len(set(names))
    namespace = {"torch": torch}                                                 # nothing else
    exec(compile("\n\n".join(chunks), "pasted.py", "exec"), namespace)
    return namespace


def large_k_section():
    """The names defined in purrception.py's section "at K = 16384", and the patch order they
    use."""
    source = open(os.path.join(ROOT, "purrception.py")).read()
    section = source.split("# at K = 16384")[1].split("# ---")[0]
    return re.findall(r"^(?:def|class) (\w+)", section, re.M) + ["patchify", "unpatchify"]


class Toy(torch.nn.Module):                                       # not this project's model
    def __init__(self, d, K, num_classes):
        super().__init__()
        self.label = torch.nn.Embedding(num_classes + 1, 8)
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1 + 8, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, K))

    def forward(self, z, t, y):
        B, h, w, _ = z.shape
        cond = torch.cat([t.view(B, 1).float(), self.label(y)], -1)[:, None, None]
        return self.net(torch.cat([z, cond.expand(B, h, w, -1)], -1))


@pytest.mark.parametrize("chunk", [None, 7])
def test_the_copied_functions_run_alone_with_only_torch_on_a_foreign_network(chunk):
    names = copied_names()
    assert {"vfm_loss", "sample_ode"} <= set(names)
    namespace = pasted(names + (large_k_section() if chunk else []))
    K, d, C = 12, 3, 4
    E, net = torch.randn(K, d), Toy(d, K, C)
    idx, y = torch.randint(0, K, (6, 3, 5)), torch.randint(0, C, (6,))         # a non-square grid
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    same_draws = lambda: torch.Generator().manual_seed(0)                    # the same t and noise
    vfm_loss, sample_ode = namespace["vfm_loss"], namespace["sample_ode"]
    loss = vfm_loss(net, idx, E, y, generator=same_draws(), chunk=chunk)
    loss.backward()
    opt.step()
    assert vfm_loss(net, idx, E, y, generator=same_draws(), chunk=chunk) < loss   # a step down
    out = sample_ode(net, E, y, (3, 5), 4, temperature=0.9, cfg_scale=2.0, null_label=C,
                       chunk=chunk)
    assert out.shape == (6, 3, 5) and out.dtype == torch.long and 0 <= out.min() and out.max() < K


def project_imports(path):
    """Every project module a file imports, at the top or inside functions."""
    tree, mods = ast.parse(open(path).read()), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def test_no_file_imports_a_file_that_imports_it_back():
    files = [f[:-3] for f in os.listdir(ROOT)
             if f.endswith(".py") and not f.startswith(("test_", "conftest"))]
    graph = {f: project_imports(os.path.join(ROOT, f + ".py")) & set(files) - {f} for f in files}
    assert "baselines" not in graph["purrception"] and "sample" not in graph["purrception"]

    def reach(start, seen):
        for nxt in graph[start]:
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen
    for f in files:
        assert f not in reach(f, set()), f"{f} imports itself through {sorted(reach(f, set()))}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_line_answers_help_with_meanings_and_refuses_a_malformed_flag_alike(
        script, capsys):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as e:
        main(["--dataset=shapes", "--help"] if script not in ("sample", "fid") else ["--help"])
    assert e.value.code in (0, None)
    text = capsys.readouterr().out
    assert "options (values after the preset):" in text
    rows = [line for line in text.splitlines() if line.startswith("  --")]
    # a meaning beside each
    assert rows and sum(len(line.split()) > 1 for line in rows) >= 0.8 * len(rows)
    with pytest.raises(cli.UserError) as e:
        main(["--nonsense=1"])
    assert str(e.value).startswith("unknown option '--nonsense'") and "\n" not in str(e.value)
    with pytest.raises(cli.UserError, match=r"^--\w+ expects int, got '1.5'$"):
        int_flag = next(f for f in ("seed", "num_samples", "fid_samples", "steps", "batch_size")
                        if f"  --{f}=" in text)
        main([f"--{int_flag}=1.5"])


def test_numbers_parse_the_same_everywhere():
    from purrception import Config
    cfg = cli.parse_args(["--max_iters=1e4", "--lr=3e-4", "--compile", "--class_dropout=0"],
                         Config())
    assert cfg.max_iters == 10000 and cfg.lr == 3e-4
    assert cfg.compile is True and cfg.class_dropout == 0.0
    for bad in ("--lr=nan", "--max_iters=inf", "--compile=maybe", "--lr"):
        with pytest.raises(cli.UserError):
            cli.parse_args([bad], Config())


def test_a_resume_takes_the_checkpoints_model_and_names_the_flags_unlike_its_run(capsys):
    import dataclasses
    import purrception as pc
    run = dataclasses.replace(pc.Config(), n_layer=2, n_embd=32, batch_size=8, max_iters=10)
    ckpt = {"iter": 10, "config": dataclasses.asdict(run),
            "model_args": dict(K=64, d=8, grid_size=8, patch_size=2, n_layer=2, n_head=6,
                               n_embd=32, num_classes=3, time_embed="scaled")}
    # the preset's flags
    again = dataclasses.replace(pc.Config(), max_iters=20, init_from="resume")
    cfg = cli.resumed_config(again, ckpt, pc.ARCHITECTURE, pc.PER_INVOCATION)
    assert (cfg.n_layer, cfg.n_embd, cfg.batch_size, cfg.max_iters) == (2, 32, 64, 20)
    line = capsys.readouterr().out
    assert "the model is the checkpoint's (--n_layer=2 --n_embd=32)" in line
    assert "--batch_size=64 (was 8)" in line and "max_iters" not in line
    cli.resumed_config(dataclasses.replace(run, max_iters=20), ckpt, pc.ARCHITECTURE,
                       pc.PER_INVOCATION)              # the run's flags
    assert capsys.readouterr().out == ""
