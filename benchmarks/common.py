"""What every benchmark prints beside its figures: the machine they were measured on."""

import platform


def cpu_model() -> str:
  """'<model name> (N logical cores)' from /proc/cpuinfo, else what ``platform`` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    return f'{names[0]} ({len(names)} logical cores)'
  except (OSError, IndexError):
    return platform.processor() or 'unknown CPU'
