"""The documentation checks itself against the repository: README.md and docs/*.md.

- every relative link and image resolves to a file, and every #anchor to a heading of its target
  (GitHub's slugs);
- every `kmnist-batch COMMAND ...` (or `python -m jobs.predict` / `jobs.tune_grid`) line in a fenced
  code block parses with the real CLI, unknown options included;
- every `--flag` the docs name exists: on the command it is shown with (code blocks, and inline code
  such as `predict --manifest`), and anywhere else on at least one kmnist-batch command, on the
  bench/ script it is shown with, or on the small allow-list of other tools' flags below;
- the `make` targets and the repository paths the docs name exist.

Fast: no Ray, no torch, no training; only the typer app is imported.
"""

from __future__ import annotations

import os
import re
import shlex
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Also holds `kmnist-batch` command lines (the demo); linked from the README.
COMMAND_DOCS = [*DOCS, ROOT / "examples" / "README.md"]

# Flags of other tools that the docs show next to their commands. Each with its reason.
OTHER_TOOLS_FLAGS = {
    # `ray start` on the head and the worker nodes (docs/clusters.md); its --port is also `review`'s
    "--head": "ray start", "--dashboard-port": "ray start",
    "--dashboard-host": "ray start", "--include-dashboard": "ray start",
    # `ray job submit` / `ray job logs`, and `ray get-auth-token` (docs/clusters.md, README)
    "--working-dir": "ray job submit", "--runtime-env-json": "ray job submit",
    "--no-wait": "ray job submit", "--follow": "ray job logs", "--generate": "ray get-auth-token",
}
# Lines in code blocks of these languages are not shell: never parsed as commands.
NOT_SHELL = {"python", "py", "json", "yaml", "toml"}
SUBCOMMAND_OF_MODULE = {"jobs.predict": "predict", "jobs.tune_grid": "tune"}
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}


@dataclass
class Doc:
    path: Path
    prose: list[str]  # lines outside fenced code blocks
    blocks: list[tuple[str, list[str]]]  # (language, lines) of each fenced code block


@lru_cache(maxsize=None)
def read_doc(path: Path) -> Doc:
    prose, blocks, fence, lang, body = [], [], None, "", []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence is None and m:
            fence, lang, body = m.group(1), m.group(2).lower(), []
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((lang, body))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
    assert fence is None, f"{path.name}: unclosed code fence"
    return Doc(path, prose, blocks)


def code_spans(text: str) -> list[str]:
    return re.findall(r"(?<!`)`([^`]+)`(?!`)", text)


def without_code_spans(text: str) -> str:
    return re.sub(r"`[^`]*`", "", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, without punctuation other than
    hyphens and underscores (letters, marks and digits of any script kept), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.replace("`", "").replace("*", "")
    out = []
    for ch in text.lower():
        if ch in " -_" or ch.isalnum() or unicodedata.category(ch).startswith(("L", "M", "N", "Pc")):
            out.append("-" if ch == " " else ch)
    return "".join(out)


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in read_doc(path).prose:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(result)


def links(doc: Doc) -> list[str]:
    text = without_code_spans("\n".join(doc.prose))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text) + re.findall(
        r"<img[^>]+src=\"([^\"]+)\"", text)


def test_docs_exist_and_the_readme_stays_short():
    assert len(DOCS) > 1
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 260, f"README.md has {lines} lines: move detail into docs/ (issue 27)"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_images_resolve(path):
    problems = []
    for target in links(read_doc(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = Path(os.path.normpath(path.parent / file_part)) if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: points outside the repository")
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{target}: anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_github_slugs():
    assert github_slug("Output schema (version 3) — a contract for downstream pipelines") == \
        "output-schema-version-3--a-contract-for-downstream-pipelines"
    assert github_slug("Page scans to text: `kmnist-batch predict --manifest`") == \
        "page-scans-to-text-kmnist-batch-predict---manifest"
    assert github_slug("The learning-rate × batch-size grid") == "the-learning-rate--batch-size-grid"
    assert github_slug("On your own machines, by hand (what `tests/test_cluster.py` does)") == \
        "on-your-own-machines-by-hand-what-teststest_clusterpy-does"
    assert github_slug("The study's model") == "the-studys-model"


# ---------------------------------------------------------------------------------------- the CLI


@lru_cache(maxsize=None)
def cli():
    import typer.main

    from jobs.cli import app

    return typer.main.get_command(app)


@lru_cache(maxsize=None)
def command_flags(name: str) -> frozenset[str]:
    cmd = cli().commands[name]
    flags = {"--help"}
    for param in cmd.params:
        flags.update(o for o in [*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())] if o.startswith("--"))
    return frozenset(flags)


@lru_cache(maxsize=None)
def all_cli_flags() -> frozenset[str]:
    return frozenset().union(*(command_flags(n) for n in cli().commands))


FLAG_CALL = r"add_argument\(\s*[\"'](--[\w-]+)[\"']"
FLAG_HELPERS = ("bench/common.py", "jobs/recipe.py")  # functions NAME_flag(s) that add a bench script's flags for it


@lru_cache(maxsize=None)
def helper_flags() -> dict[str, frozenset[str]]:
    """The flags each flag helper of FLAG_HELPERS adds, by the helper's name."""
    found = {}
    for path in FLAG_HELPERS:
        parts = re.split(r"^def (\w+)\(", (ROOT / path).read_text(encoding="utf-8"), flags=re.MULTILINE)
        found.update({name: frozenset(re.findall(FLAG_CALL, body)) for name, body in zip(parts[1::2], parts[2::2])
                      if name.endswith(("_flag", "_flags"))})
    return found


@lru_cache(maxsize=None)
def bench_flags(script: str) -> frozenset[str]:
    """A bench script's flags: its own add_argument calls and those of the flag helpers it calls."""
    text = (ROOT / script).read_text(encoding="utf-8")
    shared = [flags for name, flags in helper_flags().items() if re.search(rf"\b{name}\(", text)]
    return frozenset(re.findall(FLAG_CALL, text)).union(*shared) | {"--help"}


@lru_cache(maxsize=None)
def all_bench_flags() -> frozenset[str]:
    return frozenset().union(*(bench_flags(p.relative_to(ROOT).as_posix()) for p in (ROOT / "bench").glob("*.py")))


def logical_lines(lines: list[str]) -> list[str]:
    """Shell lines with `\\` continuations joined."""
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    if pending:
        out.append(pending)
    return out


def find_invocation(tokens: list[str]) -> tuple[str, str, list[str]] | None:
    """(how it was called, subcommand, args) of the first kmnist-batch call in a token list, args cut at
    the first shell operator; None when there is none."""
    for i, tok in enumerate(tokens):
        if tok == "kmnist-batch" or tok.endswith("/kmnist-batch"):  # also .venv/bin/kmnist-batch
            if i + 1 >= len(tokens):
                return None
            name, rest = tokens[i + 1], tokens[i + 2:]
            how = "kmnist-batch"
        elif tok in SUBCOMMAND_OF_MODULE and i > 0 and tokens[i - 1] == "-m":
            name, rest, how = SUBCOMMAND_OF_MODULE[tok], tokens[i + 1:], f"python -m {tok}"
        else:
            continue
        args = []
        for arg in rest:
            if arg in SHELL_OPERATORS or arg.startswith((">", "2>")):
                break
            args.append(arg)
        return how, name, args
    return None


def shown_commands() -> list[tuple[str, str, str, list[str]]]:
    """(where, line, subcommand, args) of every kmnist-batch call in the docs' fenced code blocks."""
    found = []
    for path in COMMAND_DOCS:
        for lang, body in read_doc(path).blocks:
            if lang in NOT_SHELL:
                continue
            for line in logical_lines(body):
                if "kmnist-batch" not in line and "jobs." not in line:
                    continue
                tokens = shlex.split(line, comments=True)  # comments and `$ ` prompts drop out / are skipped
                call = find_invocation(tokens)
                if call:
                    found.append((path.relative_to(ROOT).as_posix(), line.strip(), call[1], call[2]))
    return found


def test_the_docs_show_commands():
    names = {name for _, _, name, _ in shown_commands()}
    # One example per job that exists today; a command removed from the CLI fails the parse test.
    assert names >= {"predict", "train", "evaluate", "tune", "status", "report"}, names


def test_every_command_shown_in_a_code_block_parses_with_the_cli():
    problems, parsed = [], 0
    for where, line, name, args in shown_commands():
        if name not in cli().commands:
            problems.append(f"{where}: `{line}`: no command {name!r}")
            continue
        # A shell variable's value is unknown here, so such a line cannot be parsed as it would run.
        # None is shown today; should one be needed, it is skipped rather than guessed.
        if any("$" in a for a in args):
            continue
        try:
            cli().commands[name].make_context(name, list(args), resilient_parsing=False)
            parsed += 1
        except Exception as e:  # click's UsageError family (typer vendors click): unknown option, missing value
            problems.append(f"{where}: `{line}`: {type(e).__name__}: {e}")
    assert not problems, "\n".join(problems)
    assert parsed >= 10


def test_flags_on_command_lines_exist_for_that_command():
    # make_context above rejects unknown options too; this names every unknown flag on a line at once.
    problems = []
    for where, line, name, args in shown_commands():
        for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
            if name in cli().commands and flag not in command_flags(name):
                problems.append(f"{where}: `{line}`: {name} has no {flag}")
    assert not problems, "\n".join(problems)


def bench_script(words: list[str]) -> str | None:
    """`bench/x.py ...` or `python bench/x.py ...`: the script run by an inline code span."""
    if words and words[0].endswith("python"):
        words = words[1:]
    return words[0] if words and re.fullmatch(r"bench/\w+\.py", words[0]) else None


def test_flags_in_inline_code_exist_for_the_command_they_follow():
    """`predict --manifest`, `evaluate --precision int8`, `kmnist-batch status OUT --json`, `python -m
    jobs.predict --help`, `bench/pages_throughput.py --chars 10000`: the flags after a command name."""
    names = set(cli().commands)
    problems = []
    for path in DOCS:
        for span in code_spans("\n".join(read_doc(path).prose)):
            words = span.split()
            if not words:
                continue
            call = find_invocation(words)
            if call is None and words[0] in names:
                call = ("", words[0], words[1:])
            if call is not None:
                _, name, args = call
                if name in names:
                    allowed = command_flags(name)
                elif name.isupper():  # a placeholder such as `kmnist-batch COMMAND --help`
                    allowed = frozenset.intersection(*(command_flags(n) for n in names))
                else:
                    problems.append(f"{path.name}: `{span}`: no command {name!r}")
                    continue
            elif bench_script(words) is not None:
                script = bench_script(words)
                if not (ROOT / script).exists():
                    problems.append(f"{path.name}: `{span}`: no {script}")
                    continue
                allowed, args = bench_flags(script), words[words.index(script) + 1:]
            else:
                continue
            for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
                if flag not in allowed:
                    problems.append(f"{path.name}: `{span}`: {flag} is not an option of {call[1] if call else script}")
    assert not problems, "\n".join(problems)


def test_bench_lines_in_code_blocks_use_the_scripts_own_flags():
    problems = []
    for path in DOCS:
        for lang, body in read_doc(path).blocks:
            if lang in NOT_SHELL:
                continue
            for line in logical_lines(body):
                if "bench/" not in line:
                    continue
                tokens = shlex.split(line, comments=True)
                scripts = [t for t in tokens if re.fullmatch(r"bench/\w+\.py", t)]
                if not scripts:
                    continue
                if not (ROOT / scripts[0]).exists():
                    problems.append(f"{path.name}: `{line.strip()}`: no {scripts[0]}")
                    continue
                for flag in (t.split("=", 1)[0] for t in tokens[tokens.index(scripts[0]) + 1:] if t.startswith("--")):
                    if flag not in bench_flags(scripts[0]):
                        problems.append(f"{path.name}: `{line.strip()}`: {scripts[0]} has no {flag}")
    assert not problems, "\n".join(problems)


def test_every_flag_named_anywhere_exists_somewhere():
    """Prose names options loosely ("`--resume` keeps every committed shard"): each must be an option of
    a kmnist-batch command, of a bench/ script, or one of the other tools' flags allowed above."""
    known = all_cli_flags() | all_bench_flags() | set(OTHER_TOOLS_FLAGS)
    problems = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))):
            if flag not in known:
                problems.append(f"{path.relative_to(ROOT)}: {flag} is no option of kmnist-batch, bench/ or the allow-list")
    assert not problems, "\n".join(problems)


def test_allow_listed_flags_are_not_kmnist_batch_options():
    # Keeps the allow-list honest: a flag kmnist-batch has is checked against the CLI, not allowed blindly.
    assert not set(OTHER_TOOLS_FLAGS) & all_cli_flags()


# ------------------------------------------------------------------------- make targets and paths


def test_make_targets_the_docs_name_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    problems = []
    for path in COMMAND_DOCS:
        doc = read_doc(path)
        lines = [line for lang, body in doc.blocks if lang not in NOT_SHELL for line in body]
        lines += code_spans("\n".join(doc.prose))
        for line in lines:
            m = re.match(r"^\s*make\s+([\w-]+)", line)
            if m and m.group(1) not in targets:
                problems.append(f"{path.name}: `{line.strip()}`: no make target {m.group(1)}")
    assert not problems, "\n".join(problems)


REPO_DIRS = ("kmnist_core/", "batch_infer/", "tune/", "jobs/", "bench/", "tests/", "examples/", "docs/")


def test_repository_paths_named_in_the_docs_exist():
    problems = []
    for path in DOCS:
        for span in code_spans("\n".join(read_doc(path).prose)):
            for word in span.split():
                word = word.strip("(),;:")
                if not word.startswith(REPO_DIRS) or re.search(r"[<>*{}]|\.\.\.|[A-Z]{3,}", word):
                    continue  # placeholders such as OUT, DIR, <name>, chunk-*.parquet
                if not (ROOT / word.split("#")[0]).exists():
                    problems.append(f"{path.relative_to(ROOT)}: `{span}` names {word}, which does not exist")
    assert not problems, "\n".join(problems)
