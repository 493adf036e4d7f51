"""The README and the documentation site say what the code does.

- Every Python snippet in README.md and in docs/ runs as written (each in a fresh process:
  some pick a Keras backend).
- The API reference covers every public module and every name in its ``__all__`` has a
  docstring; the command-line page covers every command and option of ``anypool``.
- The suite tables of BENCHMARKS.md are what ``benchmarks/render.py`` makes of the recorded JSON.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
SNIPPETS = [(page, code) for page in PAGES for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


def _id(snippet) -> str:
    page, code = snippet
    return f"{page.relative_to(ROOT)}:{code.strip().splitlines()[0][:40]}"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[_id(s) for s in SNIPPETS])
def test_snippet_runs(snippet, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", snippet[1]], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[_id(s) for s in SNIPPETS])
def test_snippet_checks_its_result(snippet):
    """A snippet that only runs proves little: each one asserts what it claims (or verifies, or expects an error)."""
    assert re.search(r"\bassert|\.verify\(|pytest\.raises", snippet[1]), f"{_id(snippet)} asserts nothing"


def test_every_guide_has_a_snippet():
    for page in sorted((DOCS / "guides").glob("*.md")):
        assert "```python\n" in page.read_text(), f"{page.relative_to(ROOT)} has no Python snippet to run"


def _public_modules() -> list[str]:
    """Modules users import: no ``_`` component, not the internal backends or the benchmark suite."""
    found = []
    for path in sorted((ROOT / "src" / "anypool").rglob("*.py")):
        parts = list(path.relative_to(ROOT / "src").with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(p.startswith("_") for p in parts) or parts[1:2] in (["backends"], ["bench"]):
            continue
        found.append(".".join(parts))
    return found


def test_the_api_reference_covers_every_public_name():
    griffe = pytest.importorskip("griffe")
    package = griffe.load("anypool", search_paths=[str(ROOT / "src")])
    reference = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    directives = set(re.findall(r"^::: ([\w.]+)$", reference, re.M))
    modules = [m for m in _public_modules() if m not in ("anypool.cli", "anypool.layers")]
    assert {"anypool", "anypool.onnx", "anypool.layers.torch"} <= set(modules)
    for name in modules:
        assert name in directives, f"no page of docs/api has `::: {name}`"
        module = package if name == "anypool" else package[name.removeprefix("anypool.")]
        assert module.exports, f"{name} has no __all__: the reference would not know its public names"
        for export in module.exports:
            member = module[export]
            if member.is_attribute and not member.docstring:  # made at run time (Keras' layer factory)
                assert f"`{export}`" in reference, f"{name}.{export}: no docstring, and docs/api does not name it"
            else:
                assert member.docstring, f"{name}.{export} has no docstring"


def test_the_command_line_page_covers_every_command_and_option():
    from anypool import cli

    page = (DOCS / "api" / "cli.md").read_text()
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if a.choices and hasattr(a.choices, "items")]
    assert sorted(commands.choices) == sorted(re.findall(r"^## `anypool (\w+)`$", page, re.M))
    for name, sub in commands.choices.items():
        section = page.split(f"## `anypool {name}`", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings or [action.dest]:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section, f"docs/api/cli.md: `anypool {name}` does not describe {flag}"


def test_the_benchmark_tables_are_rendered_from_their_json():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render.py"), "--check"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
