"""The pure core must import with ComfyUI blocked, and the pack root must do no work at import."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, pkgutil, sys
sys.modules["comfy"] = None            # any `import comfy...` now raises ImportError
sys.modules["comfy_api"] = None
sys.modules["folder_paths"] = None
sys.modules["nodes"] = None
import z2i
assert "torch" not in sys.modules, "importing the pack root imported torch"
names = []
for pkg in ("z2i.guidance", "z2i.attention_patches"):
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        importlib.import_module(info.name)
        names.append(info.name)
print("\n".join(names))
"""


def test_core_imports_without_comfy():
    pythonpath = REPO / ".host" / "pythonpath"
    r = subprocess.run([sys.executable, "-c", PROBE], env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    imported = r.stdout.split()
    assert "z2i.guidance.ddim" in imported and "z2i.guidance.schedules" in imported
    assert "z2i.attention_patches" in imported


def test_probe_would_catch_a_comfy_import(tmp_path):
    """The blocking trick itself works: a module importing comfy fails under it (so the test can fail)."""
    (tmp_path / "bad.py").write_text("import comfy.samplers\n")
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['comfy'] = None; import bad"],
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin"}, capture_output=True, text=True)
    assert r.returncode != 0 and "ImportError" in r.stderr + r.stdout or "ModuleNotFoundError" in r.stderr
