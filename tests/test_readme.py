"""The commands the README and the scripts' docstrings show use flags that exist, with values of
the right type: each is parsed by its own script's command line (with --help, so nothing runs)."""

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


def shown_commands(text):
    """`python X.py --a=1 ...` and `torchrun ... X.py ...` in fenced code blocks (with their
    backslash continuations, without comments) and in inline code -> [(script, [flags])]."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines += [re.sub(r"(^|\s)#.*", "", line) for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:python|torchrun)\s[^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = []
    for line in lines:
        for part in re.split(r"\s(?:\||&&|;|>)\s", line):
            try:
                words = shlex.split(part)
            except ValueError:                    # a quote left open: not a command
                continue
            for i, word in enumerate(words[1:], 1):
                if word.endswith(".py") and word[:-3] in SCRIPTS and (
                        words[i - 1] == "python" or words[i - 1].startswith("--nproc_per_node")):
                    commands.append((word[:-3], [w for w in words[i + 1:] if w.startswith("--")]))
                    break
    return commands


def docs():
    yield "README.md", open(os.path.join(ROOT, "README.md")).read()
    for script in SCRIPTS:
        yield f"{script}.py", importlib.import_module(script).__doc__ or ""


def test_shown_commands_are_found():
    commands = shown_commands("```bash\npython sample.py --a=1 \\\n    --b=2   # c\n"
                              "torchrun --standalone --nproc_per_node=8 fid.py --x=y\n```\n"
                              "and `python bench.py --costs` inline")
    assert commands == [("sample", ["--a=1", "--b=2"]), ("fid", ["--x=y"]), ("bench", ["--costs"])]


def misused(text):
    """The shown commands that their script refuses, each with its one-line error."""
    bad = []
    for script, flags in shown_commands(text):
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


@pytest.mark.parametrize("name, text", list(docs()), ids=[name for name, _ in docs()])
def test_shown_commands_use_flags_that_exist(name, text):
    if name == "README.md":
        assert len(shown_commands(text)) > 30
    bad = misused(text)
    assert not bad, "\n".join(bad)
