"""``import dbcache_compile`` is quiet and light (issue #25 item 4): nothing from torchao (nor diffusers) is imported
until it is used, no warning reaches stderr even with ``-W default``, and the lazily loaded public names are the same
objects as before (also after a submodule of the same name was imported first)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_import_pulls_in_neither_torchao_nor_diffusers_and_prints_nothing():
    """A fresh interpreter: ``import dbcache_compile`` leaves torchao, diffusers, peft and transformers out of
    ``sys.modules`` (diffusers' hook package imports peft, which imports transformers, which imports torchao when
    they are installed, as they are here), and stderr stays empty under ``-W default``."""
    proc = _python("import dbcache_compile, sys\n"
                   "loaded = [m for m in ('torchao', 'diffusers', 'peft', 'transformers') if m in sys.modules]\n"
                   "assert not loaded, loaded\n"
                   "assert dbcache_compile.__version__\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_public_names_load_on_first_use_and_functions_win_over_their_submodules():
    """``dbc.optimize`` / ``dbc.export`` / ``dbc.calibrate`` are the functions even when their submodules
    (``dbcache_compile.optimize``, ...) were imported first, as bench/run.py does; every name of ``__all__``
    resolves, ``from dbcache_compile import <submodule>`` still imports the submodule, and loading the API (which
    imports diffusers' hooks, hence torchao here) still prints nothing."""
    proc = _python(
        "from dbcache_compile.optimize import COMPILE_MODES\n"
        "from dbcache_compile.export import capture_transformer_inputs\n"
        "from dbcache_compile.calibrate import ssim\n"
        "import dbcache_compile as dbc, sys, types\n"
        "assert dbc.optimize is sys.modules['dbcache_compile.optimize'].optimize\n"
        "assert dbc.export is sys.modules['dbcache_compile.export'].export\n"
        "assert dbc.calibrate is sys.modules['dbcache_compile.calibrate'].calibrate\n"
        "assert all(not isinstance(getattr(dbc, n), types.ModuleType) for n in dbc.__all__)\n"
        "assert dbc.DBCacheConfig.from_string('F1B0_W4MC6_R0.24').Fn_compute_blocks == 1\n"
        "from dbcache_compile import metrics\n"
        "assert metrics.__name__ == 'dbcache_compile.metrics'\n"
        "try:\n"
        "    dbc.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
