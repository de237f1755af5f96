"""What every benchmark prints beside its figures: the machine they were measured on."""

import os
import platform
import time


def cpu_model() -> str:
  """'<model name> (N logical cores)' from /proc/cpuinfo, else what ``platform`` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    return f'{names[0]} ({len(names)} logical cores)'
  except (OSError, IndexError):
    return platform.processor() or 'unknown CPU'


def manual_dir_or_survey(manual_dir: str | None, tmp: str, num_stars: int) -> str:
  """``manual_dir``, or a fresh synthetic survey of ``num_stars`` written below ``tmp`` (timed)."""
  if manual_dir is not None:
    return manual_dir
  from apogeenet_jax import synthetic  # Only when a survey is needed.

  manual_dir = os.path.join(tmp, 'manual')
  start = time.perf_counter()
  synthetic.write_survey(manual_dir, num_stars, seed=0, show_progress=False)
  elapsed = time.perf_counter() - start
  print(f'synthetic survey: {num_stars} stars in {elapsed:.1f} s ({num_stars / elapsed:.0f} files/s)')
  return manual_dir
