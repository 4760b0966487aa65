"""Tests for compare.py: the three arms in stages on a fake token folder, FID with a stub extractor, no network."""

import csv
import math
import shutil

import numpy as np
import pytest
import torch

import compare
import purrception
from test_purrception import data_dir, tiny_config  # noqa: F401 (a fixture)
from test_sample import StubExtractor

TINY = ("--device=cpu --n_layer=1 --n_head=2 --n_embd=32 --batch_size=4 --warmup_iters=2 --lr=1e-3 --ema_decay=0.9 "
        "--eval_iters=2 --log_interval=1 --sample_steps=2 --grid_cols=2")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")           # torch.jit: still the API of TorchScript files
def test_staged_arms_measure_every_stage_and_match_a_straight_run(data_dir, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    np.random.default_rng(0).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8).tofile(data / "train_images.u8")
    stub = str(tmp_path / "stub.pt")
    torch.jit.script(StubExtractor().eval()).save(stub)
    out = tmp_path / "cmp"
    argv = [f"--out_dir={out}", "--dataset=fake", f"--train_flags={TINY} --data_dir={data}", "--iters=3,6",
            "--fid_samples=6", "--fid_ref=16", "--steps=2", "--bootstrap=3", f"--fid_model={stub}"]
    compare.main(argv)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["objective"], int(r["iter"])) for r in rows] == [(o, i) for o in ("purrception", "cfm", "dfm")
                                                                for i in (3, 6)]
    assert all(math.isfinite(float(r["fid"])) and float(r["fid_se"]) >= 0 for r in rows)
    assert "| purrception | 6 |" in capsys.readouterr().out                          # the report's table
    # stages resume bit-exactly: the staged arm ends with the weights of one straight 6-iteration run
    straight = tmp_path / "straight"
    flags = TINY.split() + [f"--data_dir={data}", "--dataset=fake", "--objective=dfm", f"--out_dir={straight}",
                            "--max_iters=6", "--eval_interval=6"]
    purrception.train(purrception.parse_args(flags, purrception.Config()))
    a, b = (torch.load(p / "ckpt.pt", weights_only=True)["model"] for p in (out / "dfm", straight))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a second run finds every stage measured and adds nothing
    compare.main(argv)
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 6
    with pytest.raises(purrception.UserError, match="purrception, cfm or dfm"):
        compare.main(argv[:-1] + ["--objectives=purrception,mdlm"])
