"""The commands that the README, docs/*.md and the scripts' docstrings show name scripts that exist
and use flags that exist, with values of the right type: each is parsed by its own script's command
line (with --help, so nothing runs)."""

import contextlib
import importlib
import io
import os
import re
import shlex

import pytest

import cli
from conftest import ROOT

SCRIPTS = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
DOCS = sorted(f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def script_at(words, i):
    """The index of the script that words[i] launches: `python X.py`, `torchrun [its flags] X.py`;
    None when words[i] launches no .py file."""
    if words[i] == "python":
        j = i + 1
    elif words[i] == "torchrun":
        j = next((j for j in range(i + 1, len(words)) if not words[j].startswith("-")), None)
    else:
        return None
    return j if j is not None and j < len(words) and words[j].endswith(".py") else None


def shown_commands(text):
    """`python X.py --a=1 ...` and `torchrun ... X.py ...` in fenced code blocks (with their
    backslash continuations, without comments) and in inline code -> [(script, [flags])], for any
    X.py named, whether it exists or not."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines += [re.sub(r"(^|\s)#.*", "", line)
                  for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:python|torchrun)\s[^`]*)`",
                        re.sub(r"```.*?```", "", text, flags=re.S))
    commands = []
    for line in lines:
        for part in re.split(r"\s(?:\||&&|;|>)\s", line):
            try:
                words = shlex.split(part)
            except ValueError:                    # a quote left open: not a command
                continue
            j = next((j for i in range(len(words)) if (j := script_at(words, i)) is not None), None)
            if j is not None:
                commands.append((words[j][:-3], [w for w in words[j + 1:] if w.startswith("--")]))
    return commands


def docs():
    yield "README.md", open(os.path.join(ROOT, "README.md")).read()
    for name in DOCS:
        yield f"docs/{name}", open(os.path.join(ROOT, "docs", name)).read()
    for script in SCRIPTS:
        yield f"{script}.py", importlib.import_module(script).__doc__ or ""


def test_shown_commands_are_found():
    commands = shown_commands("```bash\npython sample.py --a=1 \\\n    --b=2   # c\n"
                              "torchrun --standalone --nproc_per_node=8 fid.py --x=y\n```\n"
                              "and `python bench.py --costs` inline")
    assert commands == [("sample", ["--a=1", "--b=2"]), ("fid", ["--x=y"]), ("bench", ["--costs"])]


def test_commands_on_several_machines_and_after_variables_are_found():
    commands = shown_commands(
        "```\ntorchrun --nnodes=2 --nproc_per_node=8 --node_rank=1 "
        "--rdzv_backend=c10d --rdzv_endpoint=HOST:29500 purrception.py --lr=1\n"
        "$ OMP_NUM_THREADS=1 python nowhere.py --a=1\npython -c 'import x.py'\n"
        "pip install torch\n```")
    assert commands == [("purrception", ["--lr=1"]), ("nowhere", ["--a=1"])]


def misused(text):
    """The shown commands that their script refuses, or whose script does not exist, each with its
    one-line error."""
    bad = []
    for script, flags in shown_commands(text):
        if script not in SCRIPTS:
            bad.append(f"{script}.py {' '.join(flags)}: there is no {script}.py")
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
                importlib.import_module(script).main(flags + ["--help"])
        except cli.UserError as e:
            bad.append(f"{script}.py {' '.join(flags)}: {e}")
    return bad


def test_a_misspelt_flag_or_a_mistyped_value_is_caught():
    bad = misused("```\npython sample.py --num_sample=4\npython fid.py --batch_size=many\n"
                  "python sample.py --num_samples=4\n```")
    assert len(bad) == 2 and "did you mean --num_samples" in bad[0] and "batch_size" in bad[1]


def test_a_command_naming_a_missing_script_is_caught():
    bad = misused("```\npython sampel.py --out_dir=x\npython sample.py --out_dir=x\n```")
    assert bad == ["sampel.py --out_dir=x: there is no sampel.py"]


@pytest.mark.parametrize("name, text", list(docs()), ids=[name for name, _ in docs()])
def test_shown_commands_use_flags_that_exist(name, text):
    if name == "README.md":
        assert len(shown_commands(text)) >= 25
    bad = misused(text)
    assert not bad, "\n".join(bad)
