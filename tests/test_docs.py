"""Every command the documentation writes parses: the headers of conf/experiment/*.yaml, the shell blocks and inline
commands of README.md, experiments/*/README.md and notebooks/README.md.

Nothing is trained or timed. `arvision-train/-eval/-sample/-bench` compose their config with the command's
overrides (each value of a `-m` sweep at least once), as Hydra would before running; `arvision-table` and the
Python scripts parse their arguments (a table whose rows are a committed CSV is rendered); `make` targets, `bash`
scripts and the repository paths a command names must exist. A failure names the file and line of the command.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from arvision.analysis.tables import HEADERS
from arvision.cli.common import config_dir
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted(REPO.glob("experiments/*/README.md")), REPO / "notebooks" / "README.md"]
HEADERS_YAML = sorted(REPO.glob("conf/experiment/*.yaml"))
HYDRA_PROGRAMS = {"arvision-train": "train", "arvision-eval": "eval", "arvision-sample": "sample",
                  "arvision-bench": "bench"}
PYTHON = {"python", "python3"}
STARTS = (*HYDRA_PROGRAMS, "arvision-table", "python ", "python3 ", "make ", "bash ", "pytest ", "jupytext ",
          "papermill ", "jupyter ", "for ")
# Programs the docs call that are not arvision's: only the repository paths they name are checked.
OTHER_PROGRAMS = {"pytest", "jupytext", "papermill", "jupyter", "export", "nvidia-smi", "cd", "git", "head", "tail"}
REPO_DIRS = ("conf/", "src/", "tests/", "experiments/", "notebooks/")
PLACEHOLDER = re.compile(r"<[^<>\n]+>")  # <run dir>, <date>, <time>: the reader fills them in


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str


# --------------------------------------------------------------------------------------------- extraction
def _is_command(text: str) -> bool:
    text = re.sub(r"^(\w+=\S+\s+)+", "", text.strip())  # VAR=value prefixes
    return text.startswith(STARTS) and len(text.split()) > 1


def _logical_lines(numbered: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines joined across `\\` continuations and `for …; do … done` loops, with their first line number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in numbered:
        stripped = line.strip()
        if pending is None and (not stripped or stripped.startswith("#")):
            continue
        start, text = pending if pending is not None else (number, "")
        if stripped.startswith("#") and text.rstrip().endswith("\\"):
            stripped = ""  # a comment line inside a continuation (e.g. a commented-out Python hint)
        text = f"{text[:-1].rstrip()} {stripped}" if text.endswith("\\") else (f"{text}; {stripped}" if text
                                                                               else stripped)
        inside_loop = text.startswith("for ") and not re.search(r"(^|[;\s])done\s*$", text)
        pending = (start, text) if text.endswith("\\") or inside_loop else None
        if pending is None:
            out.append((start, text.replace("; ;", ";").replace("do;", "do")))
    if pending is not None:
        out.append(pending)
    return out


def _name(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def markdown_commands(path: Path) -> list[Command]:
    lines = path.read_text().splitlines()
    found, block, language = [], None, ""
    prose: list[tuple[int, str]] = []
    block_of_bad_inputs = False
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if block is None:
                block, language = [], line.strip()[3:].strip()
            else:
                if language in ("bash", "sh", "shell", ""):
                    found += [Command(f"{_name(path)}:{n}", t) for n, t in _logical_lines(block)
                              if _is_command(t)]
                block = None
            continue
        if block is not None:
            block.append((number, line))
        elif line.startswith("<!-- table: csv tests/fixtures/bad_inputs.csv"):
            block_of_bad_inputs = True
        elif line.startswith("<!-- /table"):
            block_of_bad_inputs = False
        elif not block_of_bad_inputs:  # the bad-input table's commands fail on purpose (tests/test_bad_input.py)
            prose.append((number, line))
    # Inline commands, also those a paragraph wraps over two lines.
    text = "\n".join(line for _, line in prose)
    starts = [0]
    for _, line in prose:
        starts.append(starts[-1] + len(line) + 1)
    for match in re.finditer(r"`([^`]+)`", text):
        span = " ".join(match[1].split())
        if _is_command(span):
            number = prose[max(i for i, start in enumerate(starts[:-1]) if start <= match.start())][0]
            found.append(Command(f"{_name(path)}:{number}", span))
    return sorted(found, key=lambda c: int(c.where.rsplit(":", 1)[1]))


def yaml_header_commands(path: Path) -> list[Command]:
    header = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("#"):
            break
        header.append((number, line[1:]))
    return [Command(f"{_name(path)}:{n}", t) for n, t in _logical_lines(header) if _is_command(t)]


def _simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ;, &&, ||, |), loops expanded, placeholders filled in."""
    text = PLACEHOLDER.sub("PLACEHOLDER", text)
    loop = re.fullmatch(r"for (\w+) in (.+?);\s*do\s+(.+?);?\s*done", text.strip())
    if loop:
        name, items, body = loop.groups()
        return [cmd for item in shlex.split(items)
                for cmd in _simple_commands(re.sub(rf"\$\{{?{name}\}}?", item, body))]
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for command in commands:
        while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):
            command = command[1:]  # an environment assignment
        if command:
            out.append(command)
    return out


# --------------------------------------------------------------------------------------------- checks
class _Parsed(Exception):
    """Raised in place of running a script, once its arguments parsed."""


def _parse_only(run, argv: list[str]) -> str | None:
    """Run a script's argument parsing and stop there; the parser's error, or None."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    saved = sys.argv
    sys.argv = argv
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with warnings.catch_warnings():  # runpy's note that the module was already imported (by this test)
            warnings.simplefilter("ignore", RuntimeWarning)
            run()
    except _Parsed:
        return None
    except SystemExit as err:
        return f"its arguments do not parse (exit {err.code})"
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved
    return "it did not parse arguments with argparse"


def _check_hydra(program: str, args: list[str]) -> str | None:
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun") and a != "…" and "…" not in a]
    if any(a.startswith("-") for a in overrides):
        return f"unknown option {next(a for a in overrides if a.startswith('-'))}"
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # Hydra's OverrideParseException
        return f"overrides do not parse: {str(err).splitlines()[0]}"
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        return f"{sweeps[0].input_line} is a sweep: it needs -m"
    values = [list(o.sweep_string_iterator()) for o in sweeps]
    for k in range(max((len(v) for v in values), default=1)):  # every value of every sweep at least once
        chosen = [f"{o.get_key_element()}={v[min(k, len(v) - 1)]}" for o, v in zip(sweeps, values)]
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                compose(config_name=HYDRA_PROGRAMS[program], overrides=[*fixed, *chosen], return_hydra_config=True)
        except Exception as err:
            where = f" with {' '.join(chosen)}" if chosen else ""
            return f"config does not compose{where}: {str(err).splitlines()[0]}"
        finally:
            GlobalHydra.instance().clear()
    return None


KNOWN_COLUMNS = set(HEADERS) | set(HEADERS.values()) | {
    "run", "seed", "tags", "finished", "source", "num_evaluations", "tokens_per_image", "train_tokens",
    "s_per_image", "test_loss"}
COLUMN_FAMILIES = ("tok.", "gen.", "eval.", "cfg.", "cost.", "spec.", "choice.")


def _check_table(args: list[str]) -> str | None:
    from arvision.cli.table import parser, render_table

    args = [a for a in args if a != "…"] if "…" not in args[:1] else ["RUNS", *args[1:]]
    try:
        parsed = parser().parse_args(args)
    except SystemExit:
        return "its arguments do not parse"
    if Path(parsed.root).suffix == ".csv" and (REPO / parsed.root).is_file():
        parsed.root = str(REPO / parsed.root)
        parsed.out = None
        try:
            render_table(parsed)
        except (FileNotFoundError, KeyError, ValueError) as err:
            return f"renders no table from the committed CSV: {err.args[0] if err.args else err}"
        return None
    named = [*(parsed.columns.split(",") if parsed.columns else []),
             *(k.lstrip("-") for k in (parsed.sort.split(",") if parsed.sort else [])),
             *(re.split(r"!?=", f, maxsplit=1)[0] for r in parsed.rows or [] for f in r.split(";"))]
    unknown = [c for c in named if c not in KNOWN_COLUMNS and not c.startswith(COLUMN_FAMILIES)]
    return f"no such column: {', '.join(unknown)}" if unknown else None


def _check_paths(tokens: list[str]) -> str | None:
    """Repository paths a command reads must exist (what it writes, `--out` / `out=`, need not)."""
    for before, token in zip(["", *tokens], tokens):
        if before == "--out" or token.startswith(("--out=", "out=")):
            continue
        value = token.split("=", 1)[1] if re.match(r"^[\w.]+=", token) else token
        if value.startswith(REPO_DIRS) and "PLACEHOLDER" not in value and "$" not in value \
                and not list(REPO.glob(value.rstrip("/"))):
            return f"{value} is not in the repository"
    return None


def check(command: list[str]) -> str | None:
    """Why this simple command would not run as written (None: it parses)."""
    program, args = command[0], command[1:]
    problem = _check_paths(args)
    if problem:
        return problem
    if program in HYDRA_PROGRAMS:
        return _check_hydra(program, args)
    if program == "arvision-table":
        return _check_table(args)
    if program in PYTHON:
        if args[:1] == ["-c"]:
            try:
                compile(args[1], "<-c>", "exec")
            except SyntaxError as err:
                return f"python -c: {err}"
            return None
        if args[:1] == ["-m"]:
            module = args[1]
            if module == "arvision.cli.table":
                return _check_table(args[2:])
            cli = {f"arvision.cli.{m}": p for m, p in
                   (("train", "arvision-train"), ("evaluate", "arvision-eval"), ("sample", "arvision-sample"),
                    ("bench", "arvision-bench"))}
            if module in cli:
                return _check_hydra(cli[module], args[2:])
            if module.startswith("arvision."):
                return _parse_only(lambda: runpy.run_module(module, run_name="__main__"), [module, *args[2:]])
            return None  # another tool's module (pip, …)
        script = REPO / args[0]
        if not script.is_file():
            return f"{args[0]} is not in the repository"
        if "argparse" in script.read_text():
            return _parse_only(lambda: runpy.run_path(str(script), run_name="__main__"), [str(script), *args[1:]])
        return None
    if program == "make":
        targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
        missing = [a for a in args if "=" not in a and a not in targets]
        return f"no make target {missing[0]}" if missing else None
    if program == "bash":
        if not (REPO / args[0]).is_file():
            return f"{args[0]} is not in the repository"
        done = subprocess.run(["bash", "-n", str(REPO / args[0])], capture_output=True, text=True)
        return f"bash -n: {done.stderr.strip()}" if done.returncode else None
    if program in OTHER_PROGRAMS:
        return None  # their repository paths were checked above
    return f"{program}: unknown program (a shell operator inside an argument?)"


def _failures(commands: list[Command]) -> list[str]:
    failures = []
    for command in commands:
        for simple in _simple_commands(command.text):
            problem = check(simple)
            if problem:
                failures.append(f"{command.where}: {shlex.join(simple)}\n    {problem}")
    return failures


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_in_the_readmes_parses(path, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = markdown_commands(path)
    assert commands or path.parent.name in ("demo",), f"{path}: no commands found"
    failures = _failures(commands)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("path", HEADERS_YAML, ids=lambda p: p.name)
def test_every_command_in_the_experiment_config_headers_parses(path, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = yaml_header_commands(path)
    assert commands, f"{path}: its header names no command that runs it"
    failures = _failures(commands)
    assert not failures, "\n".join(failures)


def test_the_checker_finds_each_kind_of_broken_command(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("\n".join([
        "Run `arvision-train tokenizer=vq generator.model.no_such_key=1` or this:", "", "```bash",
        "arvision-train -m experiment=scaling paradigm=raster,nope \\", "  generator.model.depth=1,2",
        "for s in \"[1,8]\" \"[1,2,4,8]\"; do", "  arvision-eval run=<run dir> \"sample.schedule=$s\" bad==", "done",
        "arvision-table outputs/ --columns tokenizer,psnr --format markdown|latex|csv",
        "arvision-train generator.model.depth=1,2", "python experiments/speed/gpu_suite.py --no-such-flag",
        "make no_such_target", "jupytext --sync notebooks/missing.py", "python -c \"print(1\"", "```", ""]))
    commands = markdown_commands(readme)
    assert [c.where for c in commands] == ["README.md:1", "README.md:4", "README.md:6", "README.md:9",
                                           "README.md:10", "README.md:11", "README.md:12", "README.md:13",
                                           "README.md:14"]
    failures = _failures(commands)
    text = "\n".join(failures)
    assert "README.md:1:" in text and "no_such_key" in text
    assert "README.md:4:" in text and "paradigm=nope" in text
    assert text.count("README.md:6:") == 2 and "'sample.schedule=[1,2,4,8]' bad==" in text  # once per item
    assert "README.md:9:" in text and "no such column: psnr" in text and "latex: unknown program" in text
    assert "README.md:10:" in text and "needs -m" in text
    assert "README.md:11:" in text and "do not parse" in text
    assert "README.md:12:" in text and "no make target no_such_target" in text
    assert "README.md:13:" in text and "notebooks/missing.py is not in the repository" in text
    assert "README.md:14:" in text and "python -c" in text


def layout_missing(text: str) -> list[str]:
    """What the README's Layout block names (folders, modules, files in a description, config groups) that is not in
    the tree. Entries start in column 0 (the repository) or 2 (src/arvision/); deeper lines continue a description."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    missing, folder = [], REPO
    for line in block.splitlines():
        words = line.split()
        if not words:
            continue
        indent = len(line) - len(line.lstrip())
        if indent < 4:
            base = REPO if indent == 0 else REPO / "src" / "arvision"
            entries = words if all(w.endswith("/") for w in words) else words[:1]
            missing += [str((base / e).relative_to(REPO)) for e in entries if not (base / e).exists()]
            folder = base / words[0] if words[0].endswith("/") else base
            description = " ".join(words[1:])
        else:
            description = line.strip()
        if folder == REPO / "conf":
            missing += [f"conf/{g}" for g in description.split(":")[-1].split() if not (REPO / "conf" / g).is_dir()]
        else:
            missing += [str((folder / name).relative_to(REPO)) for name in re.findall(r"[\w/]+\.(?:py|md)\b",
                                                                                      description)
                        if not (folder / name).exists()]
    return missing


def test_the_readme_layout_names_what_is_in_the_tree():
    text = (REPO / "README.md").read_text()
    assert layout_missing(text) == [], "README.md's Layout names what is not in the tree"
    broken = text.replace("  cli/             arvision-train", "  cli/             speed.py arvision-train", 1)
    broken = broken.replace("metrics paths debug", "metrics paths nope debug", 1)
    assert layout_missing(broken) == ["conf/nope", "src/arvision/cli/speed.py"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_in_the_readmes_exists(path):
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [link.split("#", 1)[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    missing = [link for link in local if link and not (path.parent / link).exists()]
    assert not missing, f"{path.relative_to(REPO)} links to what is not in the tree: {missing}"
