r"""A tiny variant for the tests (in-memory sources; seconds on a CPU).

    pytest tests/test_training.py

Reduced network (channels 4,4; hidden 16) with dropout 0 so runs are exactly reproducible.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 8
  config.eval_batch_size = 8
  config.learning_rate = 0.01
  config.dropout_rate = 0.0
  config.max_epochs = 4
  config.patience = 5
  config.num_threads = 2
  config.num_devices = 0
  config.model.channels = (4, 4)
  config.model.hidden = (16,)
  config.log_every_steps = 0
  return config
