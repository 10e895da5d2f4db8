"""The CLI's surface: --version, help that lists the eval overrides, and bad paths refused before torch loads."""

import subprocess
import sys

import pytest

from bimdist import __version__
from tests.conftest import ROOT


def run(*code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_version_and_a_missing_command_name_no_internal_argument():
    proc = subprocess.run([sys.executable, "-m", "bimdist", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"bimdist {__version__}"
    bare = subprocess.run([sys.executable, "-m", "bimdist"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "required: COMMAND" in bare.stderr and "verb" not in bare.stderr


def test_eval_help_lists_every_eval_override():
    from bimdist.config import EvalConfig

    proc = subprocess.run([sys.executable, "-m", "bimdist", "eval", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for name, field in EvalConfig.model_fields.items():
        assert f"--eval.{name}={field.default}" in proc.stdout


@pytest.mark.parametrize("argv", [["eval", "/no/such/run"], ["recon", "/no/such/run"],
                                  ["export", "/no/such/run", "--depth", "1", "--out", "x.safetensors"],
                                  ["trace", "merge", "/no/such/run"],
                                  ["data", "prepare", "folder", "/no/such/src", "--out", "/tmp/x"]])
def test_a_missing_folder_is_refused_before_torch_is_imported(argv):
    proc = run("import sys", "from bimdist.cli import main", f"code = main({argv!r})",
               "print('TORCH_LOADED' if 'torch' in sys.modules else 'torch not loaded', code)")
    assert proc.stdout.strip() == "torch not loaded 2", proc.stderr
    assert "/no/such/" in proc.stderr and "does not exist" in proc.stderr


def test_a_folder_without_config_yaml_is_not_a_run(tmp_path):
    proc = run("from bimdist.cli import main", f"raise SystemExit(main(['eval', {str(tmp_path)!r}]))")
    assert proc.returncode == 2 and "not a bimdist run folder" in proc.stderr
