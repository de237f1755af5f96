r"""A tiny variant for the tests (in-memory sources; seconds on a CPU).

    pytest tests/test_training.py

Reduced network (channels 4,4; hidden 16) with dropout 0 so runs are exactly reproducible. Built
on the paper's recipe (configs/paper.py: plain SGD, raw flux) rather than the default's Adam:
the logic tests need an optimiser whose step is proportional to the gradient — Adam's is scale
invariant, so it would hide an N× gradient (docs/jax_stack_notes.md, the shard_map trap) — and raw flux, so a huge
input gives a huge loss. The default recipe's own tests use configs/default.py directly.
"""

from configs import paper


def get_config():
  config = paper.get_config()
  config.batch_size = 8
  config.eval_batch_size = 8
  config.optim.learning_rate = 0.01
  config.model.dropout_rate = 0.0
  config.max_epochs = 4
  config.patience = 5
  config.num_threads = 2
  config.num_devices = 0
  config.model.channels = (4, 4)
  config.model.hidden = (16,)
  config.log_every_steps = 0
  return config
