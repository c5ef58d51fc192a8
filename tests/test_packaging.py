"""The package list in pyproject.toml is written out (the kernels live outside stepdistill/): check that it
names every package folder, and that a built wheel holds the kernels, the shipped assets and every module."""
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def test_every_package_folder_is_listed():
    packages, package_dir = listed()
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stepdistill").rglob("*.py")}
    assert found - packages == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert package_dir == {"stepdistill.kernels": "kernels", "stepdistill.conf": "conf"}
    for pkg in packages - {"stepdistill.conf"}:   # conf/ holds the Hydra configs only
        folder = ROOT / package_dir.get(pkg, pkg.replace(".", "/"))
        assert (folder / "__init__.py").is_file(), f"{folder} needs an __init__.py"


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300)
    wheel = next(tmp_path.glob("stepdistill-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("stepdistill/kernels/triton_attention.py", "stepdistill/kernels/bench.py",
                   "stepdistill/benchmarks/gmm.py", "stepdistill/assets/digits_features.safetensors",
                   "stepdistill/assets/digits_teacher/unet/diffusion_pytorch_model.safetensors"):
        assert module in names, module
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "stepdistill").rglob("*.py")}
    assert sources <= names
    # every Hydra config, as stepdistill/conf/ (a wheel without them failed every console script)
    configs = {f"stepdistill/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)


def test_the_kernels_folder_does_not_hide_hugging_face_s_kernels_package():
    """From the repository root (`python -m pytest`) the root is on sys.path and kernels/ would be found as a
    top-level `kernels`, hiding the installed package of that name that transformers imports (peft and diffusers'
    LoRA loaders then fail to import). It hands the name over: to that package, or to nothing."""
    code = ("try:\n    import kernels\n    print(kernels.__file__)\nexcept ModuleNotFoundError:\n    print('none')\n"
            "import stepdistill.kernels\nprint(stepdistill.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out[0] != str(ROOT / "kernels" / "__init__.py")
    assert out[1] == str(ROOT / "kernels" / "__init__.py")


def test_hand_over_without_another_package_is_module_not_found():
    import pytest

    from stepdistill.kernels._hand_over import hand_over
    with pytest.raises(ModuleNotFoundError) as err:
        hand_over("no_package_of_this_name")
    assert err.value.name == "no_package_of_this_name"
