"""pdmd_jax entry point: flags only.

  python main.py --config=configs/gmm.py --workdir=/tmp/pdmd_gmm            # train (resumes)
  python main.py --config=configs/gmm.py --workdir=/tmp/pdmd_gmm --mode=sample
  python main.py --config=configs/gmm.py --workdir=/tmp/pdmd_gmm --mode=eval
  python main.py --distributed ...     # one process of a multi-process run (docs/distributed.md)
  python -m pdmd_jax.launch --num_processes=2 --cpu_devices=4 -- main.py ...   # N local ones
"""

import os
import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from pdmd_jax import distributed
from pdmd_jax import paths
from pdmd_jax import trainer
from pdmd_jax import validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"],
                          "train: distil (resuming from workdir); sample: write samples of the "
                          "latest checkpoint to .npz; eval: metrics of the latest checkpoint.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Join a multi-process run first (jax.distributed: TPU pod "
                                 "slices, GPU clusters, N local processes; one process per host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of "
                                   "process 0 (default $JAX_COORDINATOR_ADDRESS, else detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "--distributed: process count (default $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "--distributed: this process (default $JAX_PROCESS_ID).")
_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300,
                                "--distributed: seconds to wait for the coordinator.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    try:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             _TIMEOUT.value)
    except (ValueError, RuntimeError) as e:
      print(f"Distributed start-up error: {e}", file=sys.stderr)
      sys.exit(2)
  # XLA's CPU compiles are slow (seconds per phase step); a persistent cache makes resumed
  # and repeated runs start at once. PDMD_JAX_CACHE="" disables it.
  cache = os.environ.get("PDMD_JAX_CACHE", os.path.expanduser("~/.cache/pdmd_jax/xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config.get("job") != "teacher":
    try:   # a bad field or missing weights: the message, not a traceback, before compiling
      validation.validate(config)
      validation.mesh_sizes(config, jax.device_count())   # the mesh fits this run's devices
    except (ValueError, FileNotFoundError) as e:
      print(f"Configuration error: {e}", file=sys.stderr)
      sys.exit(2)
  if config.get("job") == "teacher":     # configs/*_teacher.py: train a teacher by flow matching
    from pdmd_jax import teacher_training  # pylint: disable=import-outside-toplevel
    teacher_training.train_teacher(config, workdir)
    return
  try:
    paths.makedirs(workdir)
  except paths.WorkdirError as e:
    print(f"Workdir error: {e}", file=sys.stderr)
    sys.exit(2)
  if _MODE.value == "train":
    out = trainer.train_and_evaluate(config, workdir,
                                     evaluate_phases=config.eval.get("every_phase", True))
    if out.get("preempted"):     # SIGTERM / SIGINT: the step in flight was saved; exit 0
      print(f"Preempted ({out['preempted']}) at step {out['stopped_at_step']}: checkpoint "
            f"saved under {workdir}; the same command resumes.", file=sys.stderr)
  elif _MODE.value == "sample":
    print(f"Wrote {trainer.sample_to_npz(config, workdir)}")
  else:
    run, state = trainer.restore_latest(config, workdir)
    trainer.evaluate(run, state, workdir, tag=f"step{int(state.step)}")


if __name__ == "__main__":
  app.run(main)
