"""The Beam side of the `apogee` builder: what Beam's workers run for each split.

Imported only on the Beam path (it imports apache_beam), and always by this name: Beam pickles
`_read_or_skip` by reference, and its workers (local processes, or Dataflow/Spark/Flink machines
that have this package installed) import it as `tfds_apogee.beam_generation`, however the
launching process loaded the builder. Each file is read by the same `read_example` as the local
process pool.
"""

import json

import apache_beam as beam
from absl import logging

from tfds_apogee.apogee import apogee_dataset_builder

SKIPPED_TAG = 'skipped'


def _read_or_skip(task_json: str):
  """One task line → (APOGEE ID, example), or a skip report line [file, id, reason] as 'skipped'."""
  task = json.loads(task_json)
  apogee_id, example, reason = apogee_dataset_builder.read_example(task)
  if example is None:
    logging.warning('apogee: skipped %s', reason)
    yield beam.pvalue.TaggedOutput(SKIPPED_TAG, json.dumps([task[1], apogee_id, reason]))
  else:
    yield apogee_id, example


@beam.ptransform_fn
def read_split(root, tasks_file: str, skipped_prefix: str):
  """PTransform of one split: task file → (APOGEE ID, example); unreadable files → skipped_prefix.

  The tasks (one JSON line each: path, path relative to manual_dir, catalogue fields, split) come
  from a text file that Beam splits among its workers, not through beam.Create: a survey's 650k
  tasks would otherwise be pickled into the pipeline graph itself, past what Dataflow accepts for
  one job. The unreadable files go to a side output, written as text shards
  `<skipped_prefix>-SSSSS-of-NNNNN.jsonl` that the builder merges into skipped.csv.
  """
  results = (root
             | 'Tasks' >> beam.io.ReadFromText(tasks_file)
             # Lines of one text shard would otherwise stay on one worker.
             | 'Spread' >> beam.Reshuffle()
             | 'Read' >> beam.FlatMap(_read_or_skip).with_outputs(SKIPPED_TAG, main='examples'))
  _ = results[SKIPPED_TAG] | 'ReportSkipped' >> beam.io.WriteToText(
      skipped_prefix, file_name_suffix='.jsonl')
  return results.examples
