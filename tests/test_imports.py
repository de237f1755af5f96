"""Library modules import no optional dependency: torch only when the torch extra is used."""

import subprocess
import sys

_IMPORT_ALL = """
import importlib, importlib.util, pkgutil, sys
import apogeenet_jax, tfds_apogee
# Modules of an extra, imported only on its path: checked when the extra is installed (CI).
EXTRA = {'tfds_apogee.beam_generation': 'apache_beam'}
names = [m.name for pkg in (apogeenet_jax, tfds_apogee)
         for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')
         if not m.name.endswith('_test')
         and (m.name not in EXTRA or importlib.util.find_spec(EXTRA[m.name]) is not None)]
for name in names:
  importlib.import_module(name)
assert 'apogeenet_jax.models.torch_reference' in sys.modules and len(names) > 20, names
print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))
"""


def test_no_library_module_imports_torch_or_tensorflow():
  out = subprocess.run([sys.executable, '-c', _IMPORT_ALL], capture_output=True, text=True,
                       check=False, env={'JAX_PLATFORMS': 'cpu', 'PATH': ''})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == '[]', out.stdout
