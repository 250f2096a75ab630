"""The TensorFlow side of ``test_tf_interop.py``, run by a Python that has TensorFlow and NumPy only
(``LUB_FAST_TF_PYTHON``; ``.ci/run`` makes ``.venv-tf`` with ``pip install tensorflow-cpu numpy``).

``python tf_side.py JOBS.json RESULTS.json`` runs a JSON list of jobs in one process (TensorFlow
takes seconds to import) and writes one JSON result per job. Arrays travel as ``.npz`` files
(bfloat16 as its uint16 bits, named in ``bfloat16``); string tensors as lists of hex strings.

Jobs (``op``):
- ``save_v2``: ``tf.raw_ops.SaveV2`` of ``arrays`` (+ ``strings``) at ``prefix``, in name order.
- ``merge``: ``tf.raw_ops.MergeV2Checkpoints`` of ``prefixes`` into ``destination``.
- ``read``: every tensor of the checkpoint ``path`` (a prefix, or a directory: its
  ``tf.train.latest_checkpoint``) through ``tf.train.load_checkpoint`` into ``out`` (.npz); the
  result has ``dtypes``, ``strings`` and ``latest`` (for a directory).
- ``saver``: ``tf.Variable``s of ``arrays``, with Adam slots (``<name>/adam_m``, ``/adam_v``, as
  Google's AdamWeightDecayOptimizer names them) and ``global_step`` when ``slots``, saved by
  ``tf.compat.v1.train.Saver`` at ``prefix`` (``-global_step`` appended when given); the result has
  the path saved and the ``checkpoint`` file TensorFlow wrote.
- ``object``: ``tf.train.Checkpoint`` (TF2's object-based format) of ``arrays`` written at ``prefix``.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf


def _tensors(job):
    arrays = dict(np.load(job["arrays"])) if job.get("arrays") else {}
    bfloat16 = set(job.get("bfloat16", ()))
    tensors = {}
    for name, array in arrays.items():
        if name in bfloat16:
            tensors[name] = tf.bitcast(tf.constant(array, tf.uint16), tf.bfloat16)
        else:
            tensors[name] = tf.constant(array)
    for name, items in job.get("strings", {}).items():
        tensors[name] = tf.constant([bytes.fromhex(x) for x in items], tf.string)
    return tensors


def save_v2(job):
    tensors = _tensors(job)
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=job["prefix"], tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tensors[n] for n in names])
    return {}


def merge(job):
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=job["prefixes"],
                                  destination_prefix=job["destination"])
    return {}


def read(job):
    path = job["path"]
    latest = tf.train.latest_checkpoint(path) if os.path.isdir(path) else None
    reader = tf.train.load_checkpoint(path)
    dtypes = {name: dtype.name for name, dtype in reader.get_variable_to_dtype_map().items()}
    arrays, strings = {}, {}
    for name, dtype in dtypes.items():
        value = np.asarray(reader.get_tensor(name))
        if dtype == "string":
            strings[name] = [bytes(x).hex() for x in value.reshape(-1)]
        else:
            arrays[name] = value.view(np.uint16) if dtype == "bfloat16" else value
    np.savez(job["out"], **arrays)
    return {"dtypes": dtypes, "strings": strings, "latest": latest}


def saver(job):
    variables = {name: tf.Variable(t) for name, t in _tensors(job).items()}
    if job.get("slots"):
        for name in list(variables):
            if "LayerNorm" not in name:
                variables[f"{name}/adam_m"] = tf.Variable(tf.zeros_like(variables[name]))
                variables[f"{name}/adam_v"] = tf.Variable(tf.ones_like(variables[name]))
        variables["global_step"] = tf.Variable(np.int64(job.get("global_step") or 0))
    path = tf.compat.v1.train.Saver(var_list=variables).save(
        None, job["prefix"], global_step=job.get("global_step"), write_meta_graph=False)
    with open(os.path.join(os.path.dirname(job["prefix"]), "checkpoint"), encoding="utf-8") as f:
        return {"path": path, "checkpoint_file": f.read()}


def object_checkpoint(job):
    checkpoint = tf.train.Checkpoint(**{name: tf.Variable(t) for name, t in _tensors(job).items()})
    return {"path": checkpoint.write(job["prefix"])}


OPS = {"save_v2": save_v2, "merge": merge, "read": read, "saver": saver, "object": object_checkpoint}


def main(jobs_file, results_file):
    with open(jobs_file, encoding="utf-8") as f:
        jobs = json.load(f)
    results = [OPS[job["op"]](job) for job in jobs]
    with open(results_file, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
