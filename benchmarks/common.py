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


def torch_runner(flux, err, mc, threads):
  """``run() -> seconds``: the paper's model, one batch of ``mc`` draws per star, in a loop."""
  import torch

  from apogeenet_jax import uncertainty
  from apogeenet_jax.models.torch_reference import TorchAPOGEENet
  torch.set_num_threads(threads)
  model = TorchAPOGEENet().eval()
  gen = torch.Generator().manual_seed(0)

  def one(f, e):
    scale = torch.from_numpy(uncertainty.prepare_errors(e))
    noise = torch.randn((mc, f.shape[-1]), generator=gen) * scale
    noise[0] = 0  # draw 0 noiseless, as in the authors' code
    x = (torch.from_numpy(f) + noise)[:, None, :]
    out = model(x)
    return out.mean(0), out.std(0, unbiased=False)

  def run():
    with torch.no_grad():
      t0 = time.perf_counter()
      for f, e in zip(flux, err, strict=True):
        one(f, e)
      return time.perf_counter() - t0

  with torch.no_grad():
    one(flux[0], err[0])  # warm-up
  return run
