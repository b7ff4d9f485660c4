"""The registry archive holds what a user runs and nothing a reviewer would flag; pyproject.toml and the publish
workflow say what is true. No host needed.

`comfy node publish` (comfy-cli, run by Comfy-Org/publish-node-action) zips every file `git ls-files` lists that no
pattern of .comfyignore matches (gitignore syntax). The test builds that archive the same way into a temporary zip,
with git's own gitignore matcher (`git ls-files -c -i --exclude-from=.comfyignore`) standing in for the pathspec
library comfy-cli uses, and reads the zip back.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORE = REPO / ".comfyignore"

# Every tracked top-level entry is either shipped or listed here as developer material: a new folder has to be
# sorted into one of the two (and .comfyignore told), never shipped by accident.
SHIPPED_TOP = {"__init__.py", "nodes", "guidance", "attention_patches", "headless", "run.py", "workflows",
               "assets", "web", "README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "requirements.txt"}
DEV_ONLY_TOP = {"tests", "tools", "docs", ".ci", ".github", "BENCHMARKS.md", "EVALUATION.md", ".gitignore",
                ".comfyignore"}
REQUIRED = ["__init__.py", "nodes/__init__.py", "run.py", "README.md", "LICENSE", "pyproject.toml",
            "requirements.txt", "assets/z2i_example.png"]

# Ways a module can start a process (and so run pip): imports and calls the archive must not contain.
PROCESS_MODULES = {"subprocess", "pip", "ensurepip", "pty"}
PROCESS_CALLS = re.compile(r"^(os\.(system|popen|spawn\w*|exec\w*|posix_spawn\w*|fork\w*)"
                           r"|asyncio\.create_subprocess_\w+|runpy\.run_module|importlib\.import_module)$")


def _git(*args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> zipfile.ZipFile:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the archive is built from `git ls-files`")
    assert IGNORE.is_file(), "no .comfyignore: comfy-cli would ship every tracked file (tests, tools, docs)"
    tracked = _git("ls-files")
    ignored = set(_git("ls-files", "-c", "-i", f"--exclude-from={IGNORE}"))
    path = tmp_path_factory.mktemp("publish") / "node.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in tracked:
            if name not in ignored and (REPO / name).is_file():   # comfy-cli skips tracked files deleted on disk
                z.write(REPO / name, name)
    with zipfile.ZipFile(path) as z:
        yield z


def _names(archive) -> list[str]:
    return archive.namelist()


def test_the_archive_holds_no_developer_material(archive):
    names = _names(archive)
    bad = [n for n in names if n.split("/")[0] in DEV_ONLY_TOP or n.startswith("docs/screenshots/")
           or re.search(r"(^|/)(benchmark|bench_)|BENCHMARK", n, re.I)]
    assert not bad, f"developer files in the archive: {bad}"
    tops = {n.split("/")[0] for n in names}
    assert tops <= SHIPPED_TOP, f"unexpected top-level entries shipped: {sorted(tops - SHIPPED_TOP)}"


def test_every_tracked_top_level_entry_is_sorted():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tops = {n.split("/")[0] for n in _git("ls-files")}
    unsorted = tops - SHIPPED_TOP - DEV_ONLY_TOP
    assert not unsorted, (f"tracked entries neither shipped nor developer-only: {sorted(unsorted)}; add them to "
                          "SHIPPED_TOP or to DEV_ONLY_TOP and .comfyignore")


def test_the_archive_holds_what_a_user_runs(archive):
    names = set(_names(archive))
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"missing from the archive: {missing}"
    for package in ("nodes", "guidance", "attention_patches", "headless"):
        tracked = {n for n in _git("ls-files", package) if n.endswith(".py")}
        assert tracked and tracked <= names, f"{package}/ not shipped whole: {sorted(tracked - names)}"
    web = _pyproject()["tool"]["comfy"].get("web")
    if web:  # the folder ComfyUI serves for the pack (node help pages)
        served = set(_git("ls-files", web))
        assert served and served <= names, f"{web}/ not shipped whole: {sorted(served - names)}"
    workflows = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "workflows").glob("*.json"))
    assert workflows and set(workflows) <= names, "the workflow templates are shipped"
    thumbs = [w[:-5] + ".jpg" for w in workflows]
    assert set(thumbs) <= names, "the template thumbnails are shipped"
    for w in workflows:  # the image every template names is in the archive, the one the pack copies into input/
        assert "z2i_example.png" in archive.read(w).decode()
    assert archive.read("assets/z2i_example.png") == (REPO / "assets" / "z2i_example.png").read_bytes()
    assert len(archive.read("assets/z2i_example.png")) < 60_000


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _process_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PROCESS_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PROCESS_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and PROCESS_CALLS.match(_dotted(node.func)):
            found.append(f"{_dotted(node.func)}() at line {node.lineno}")
    return found


def _builtin_eval_exec(tree: ast.AST) -> list[int]:
    """Lines calling the builtin eval/exec (what ruff S307/S102 flag); `model.eval()` is an attribute, fine."""
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("eval", "exec")]


def test_no_shipped_module_starts_a_process_or_runs_pip(archive):
    bad = {}
    for name in _names(archive):
        if name.endswith(".py"):
            uses = _process_uses(ast.parse(archive.read(name), filename=name))
            if uses:
                bad[name] = uses
    assert not bad, f"shipped modules that can start processes (pip installs are the user's or Manager's): {bad}"


def test_the_checks_catch_what_they_look_for():
    src = ("import subprocess\nfrom pip._internal import main\nimport os\nos.system('pip install x')\n"
           "eval('1')\nexec('x = 1')\nmodel.eval()\nself.exec()\n")
    tree = ast.parse(src)
    assert len(_process_uses(tree)) == 3
    assert _builtin_eval_exec(tree) == [5, 6]


def test_no_builtin_eval_or_exec_anywhere():
    """Not in the archive, and not in the whole checkout either: the publish action lints the checkout (ruff S102,
    S307) and opens a security-review issue for any hit."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    bad = {}
    for name in _git("ls-files", "*.py"):
        if (REPO / name).is_file():
            lines = _builtin_eval_exec(ast.parse((REPO / name).read_bytes(), filename=name))
            if lines:
                bad[name] = lines
    assert not bad, f"builtin eval/exec calls: {bad}"


def _pyproject() -> dict:
    import tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement_names(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_pyproject_declares_what_requirements_txt_needs_except_torch():
    deps = _requirement_names("\n".join(_pyproject()["project"]["dependencies"]))
    reqs = _requirement_names((REPO / "requirements.txt").read_text())
    assert "torch" not in deps, "never declare torch: ComfyUI installs the build that fits the user's GPU"
    assert sorted(deps) == sorted(r for r in reqs if r != "torch")


def test_pyproject_requires_the_comfyui_versions_ci_tests():
    """requires-comfyui spans exactly the hosts CI runs: 0.3.75 (tools/setup.sh) and the second host (tools/test.sh
    tarball comfyui-<version>.tar.gz)."""
    project = _pyproject()
    spec = project["tool"]["comfy"]["requires-comfyui"]
    first = re.search(r'__version__ = "([0-9.]+)"', (REPO / "tools" / "setup.sh").read_text()).group(1)
    second = re.search(r"comfyui-([0-9.]+)\.tar\.gz", (REPO / "tools" / "test.sh").read_text()).group(1)
    assert spec == f">={first},<={second}", (spec, first, second)
    assert project["tool"]["comfy"]["PublisherId"] and project["project"]["version"]
    pytest_cfg = project["tool"]["pytest"]["ini_options"]
    assert pytest_cfg["testpaths"] == ["tests"] and "host" in " ".join(pytest_cfg["markers"])


def test_publish_workflow_uses_the_registry_action_on_pyproject_changes():
    text = (REPO / ".github" / "workflows" / "publish.yml").read_text()
    yaml = pytest.importorskip("yaml")
    wf = yaml.safe_load(text)
    on = wf.get("on", wf.get(True))   # YAML 1.1 reads a bare `on` key as True
    assert on["push"]["branches"] == ["main"] and on["push"]["paths"] == ["pyproject.toml"]
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    publish = [s for s in steps if str(s.get("uses", "")).startswith("Comfy-Org/publish-node-action@")]
    assert len(publish) == 1
    assert publish[0]["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
