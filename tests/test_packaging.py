"""The wheel: built from a clean copy of the source tree (the files git tracks or would
track, so stale build/ or egg-info folders in the checkout cannot leak in), it holds only the
`cnndsl` package (with its grammar and kernels) and its dist-info, and once installed into
an empty folder it imports from there and runs `python -m cnndsl`."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def source_files() -> list[str]:
    """The checkout's files as a fresh clone plus the uncommitted ones would have them."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def package_sources() -> set[str]:
    """What the wheel must hold: every module and grammar file of the source tree, at its
    installed path (cnndsl/..., grammar/ -> cnndsl/grammar/, kernels/ -> cnndsl/kernels/)."""
    want = set()
    for f in source_files():
        top, _, rest = f.partition("/")
        if top == "cnndsl" and f.endswith(".py"):
            want.add(f)
        elif top in ("grammar", "kernels") and "/" not in rest and rest.endswith((".py", ".lark")):
            want.add(f"cnndsl/{top}/{rest}")
    return want


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for f in source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    dist = tmp / "dist"
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
                            str(src)], check=False, capture_output=True, text=True)
    if build.returncode != 0 and "No module named build" in build.stderr:
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                                "-w", str(dist)], check=False, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list(dist.glob("cnndsl-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def site(wheel) -> Path:
    target = wheel.parent.parent / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                          "--target", str(target), str(wheel)], check=False, capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return target


def names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_holds_only_the_cnndsl_package(wheel):
    files = names(wheel)
    tops = {f.split("/")[0] for f in files}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("cnndsl-")
    assert tops - dist_info == {"cnndsl"}, f"unexpected top-level entries: {sorted(tops - dist_info - {'cnndsl'})}"
    assert "cnndsl/__init__.py" in files and "cnndsl/__main__.py" in files
    assert "cnndsl/grammar/cnn.lark" in files
    assert {"cnndsl/datasets/digits.csv.gz", "cnndsl/datasets/DIGITS.md"} <= set(files)  # the default data
    kernels = [f for f in files if f.startswith("cnndsl/kernels/") and f.endswith(".py")]
    assert "cnndsl/kernels/__init__.py" in kernels and len(kernels) > 1
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert not [f for f in files if f.startswith(("cnndsl/tests", "cnndsl/examples"))]


def test_wheel_holds_every_kernel_and_the_grammar(wheel):
    files = set(names(wheel))
    want = {f for f in package_sources() if f.startswith(("cnndsl/kernels/", "cnndsl/grammar/"))}
    assert want <= files, f"missing from the wheel: {sorted(want - files)}"


def test_wheel_holds_every_module(wheel):
    files = set(names(wheel))
    missing = package_sources() - files
    assert not missing, f"missing from the wheel: {sorted(missing)}"


def run_installed(site: Path, code: list[str]) -> subprocess.CompletedProcess:
    """Run Python in site's parent folder with only the installed wheel providing cnndsl.

    `-S` skips the .pth files, so a development install (`pip install -e .`, whose import
    hook would quietly supply modules the wheel lacks) stays out; the interpreter's own
    site-packages follow the wheel's folder on PYTHONPATH for torch and lark."""
    paths = dict.fromkeys([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, "-S", *code], cwd=site.parent, env=env, check=False,
                          capture_output=True, text=True)


LOADED = "import sys; print(*sorted(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'cnndsl'))"


def test_installed_wheel_imports_from_its_folder(site):
    run = run_installed(site, ["-c", "import cnndsl; print(cnndsl.__file__); print(cnndsl.__version__)"])
    assert run.returncode == 0, run.stderr
    path, version = run.stdout.split()
    assert Path(path).resolve().is_relative_to(site.resolve()), path
    assert version == "0.1.0"
    run = run_installed(site, ["-c", "import cnndsl.api, cnndsl.cli, cnndsl.grammar, cnndsl.kernels; " + LOADED])
    assert run.returncode == 0, run.stderr
    for path in run.stdout.split():
        assert Path(path).resolve().is_relative_to(site.resolve()), path


def test_installed_wheel_checks_a_model(site):
    run = run_installed(site, ["-m", "cnndsl", "check", str(ROOT / "examples" / "lenet5.cnn"), "--json"])
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["total_params"] == 61706 and report["name"] == "lenet5"


def test_installed_wheel_reads_its_bundled_digits(site):
    run = run_installed(site, ["-c", "from cnndsl import data; tr, te = data.load(); print(len(tr), len(te))"])
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1438", "359"]


def test_installed_wheel_reports_errors_without_a_traceback(site, tmp_path):
    bad = tmp_path / "bad.cnn"
    bad.write_text("network bad\ninput 1x8x8\nconv 4 3\ndense 10\n")
    run = run_installed(site, ["-m", "cnndsl", "check", str(bad)])
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "bad.cnn:4:1" in run.stderr


def test_installed_wheel_compiles_and_runs(site):
    code = ("import torch, cnndsl, sys; "
            f"m = cnndsl.compile({str(ROOT / 'examples' / 'lenet5.cnn')!r}, backend='torch', device='cpu'); "
            "y = m(torch.randn(2, 1, 32, 32)); print(tuple(y.shape)); " + LOADED)
    run = run_installed(site, ["-c", code])
    assert run.returncode == 0, run.stderr[-2000:]
    shape, *paths = run.stdout.split("\n", 1)[0], *run.stdout.split("\n", 1)[1].split()
    assert shape == "(2, 10)"
    for path in paths:
        assert Path(path).resolve().is_relative_to(site.resolve()), path
