"""Multi-process JAX (one process per host, or N local processes): start-up and host-side helpers.

JAX's multi-controller runtime runs the same program in every process; each process owns its
local devices, and a jitted step over a global mesh is one SPMD program across all of them.
``initialize`` joins the processes through the coordinator (process 0's host:port), taken
from the arguments or the usual environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``); with none of them, JAX's cluster auto-detection (TPU pod slices, SLURM,
Open MPI, Kubernetes) fills them in. CPU processes talk through gloo collectives.
"""

from __future__ import annotations

import os
import socket
import time

import jax

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
  """jax.distributed.initialize from the arguments, else the environment, else auto-detection;
  a coordinator that cannot be reached within ``timeout_s`` is a RuntimeError naming it (for
  processes other than 0, which hosts it)."""
  coordinator_address = coordinator_address or os.environ.get(ENV[0]) or None
  if num_processes is None and os.environ.get(ENV[1]):
    num_processes = int(os.environ[ENV[1]])
  if process_id is None and os.environ.get(ENV[2]):
    process_id = int(os.environ[ENV[2]])
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    raise ValueError("coordinator_address, num_processes and process_id go together (flags "
                     f"or {', '.join(ENV)}); got coordinator_address={coordinator_address!r}, "
                     f"num_processes={num_processes!r}, process_id={process_id!r}")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is not None and process_id != 0:
    # JAX aborts the process (a C++ check failure, no exception) when the coordinator does
    # not answer in time: wait for its port here first, and fail with a message instead.
    _wait_for_port(coordinator_address, timeout_s, process_id, num_processes)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=timeout_s)


def _wait_for_port(address: str, timeout_s: float, process_id, num_processes) -> None:
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f"process {process_id} of {num_processes} could not reach the coordinator at "
            f"{address} within {timeout_s} s (is process 0 running and the port open?): "
            f"{e}") from e
      time.sleep(0.25)


def is_main() -> bool:
  """Process 0: the one that writes logs, metrics and images (checkpoints: every process)."""
  return jax.process_index() == 0
