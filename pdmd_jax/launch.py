"""Starts N local processes of main.py as one multi-process JAX run (CPU tests, one GPU node).

  python -m pdmd_jax.launch --num_processes=2 --cpu_devices=4 -- \\
      main.py --config=configs/gmm.py:runlocal --workdir=/tmp/run

Every process gets ``--distributed`` and the coordinator through the environment
(``JAX_COORDINATOR_ADDRESS`` = localhost and a free port, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``). ``--cpu_devices=n`` simulates n CPU devices per process;
``--gpus_per_process=g`` gives process i the GPUs [i g, (i + 1) g) (one GPU node; across nodes
use the scheduler's launch lines in docs/distributed.md). Process 0 prints to this terminal,
the others to ``<logdir>/process_<i>.log``. SIGTERM / SIGINT reach every process as SIGTERM
(they agree on a step, checkpoint it and exit 0); if one process fails the others are stopped and the exit code
is the failing one's, with the tail of its log.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(i: int, n: int, port: int, cpu_devices: int = 0, gpus_per_process: int = 0,
                base: dict | None = None) -> dict:
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n),
             JAX_PROCESS_ID=str(i))
  if cpu_devices:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
  if gpus_per_process:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(
        str(d) for d in range(i * gpus_per_process, (i + 1) * gpus_per_process))
  return env


def launch(program: list[str], num_processes: int, *, cpu_devices: int = 0,
           gpus_per_process: int = 0, logdir: str | None = None, quiet: bool = False,
           timeout: float | None = None) -> int:
  """Runs ``python program...`` in ``num_processes`` processes; returns the exit code."""
  if num_processes < 1:
    raise ValueError(f"num_processes={num_processes} must be >= 1")
  logdir = logdir or tempfile.mkdtemp(prefix="pdmd_launch_")
  os.makedirs(logdir, exist_ok=True)
  port = free_port()
  procs, logs = [], []
  for i in range(num_processes):
    log = open(os.path.join(logdir, f"process_{i}.log"), "w")   # pylint: disable=consider-using-with
    logs.append(log)
    out = log if (i > 0 or quiet) else None
    procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, *program, "--distributed"],
        env=process_env(i, num_processes, port, cpu_devices, gpus_per_process),
        stdout=out, stderr=subprocess.STDOUT if out else None))

  def forward(signum, frame):   # as SIGTERM: JAX's coordination service agrees on the stop step
    del signum, frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  start = time.time()
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed or all(c == 0 for c in codes):
        break
      if timeout is not None and time.time() - start > timeout:
        failed = [i for i, c in enumerate(codes) if c is None]
        print(f"launch: timeout after {timeout:.0f} s; stopping processes {failed}",
              file=sys.stderr)
        break
      time.sleep(0.1)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  if not failed:
    for log in logs:
      log.close()
    return 0
  for p in procs:
    if p.poll() is None:
      p.terminate()
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      p.kill()
  for log in logs:
    log.close()
  i = failed[0]
  code = procs[i].returncode if procs[i].returncode not in (None, 0) else 1
  path = os.path.join(logdir, f"process_{i}.log")
  tail = open(path).read()[-3000:] if i > 0 or quiet else ""
  print(f"launch: process {i} exited with {code} (log: {path})\n{tail}", file=sys.stderr)
  return code


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="simulated CPU devices per process (0: the platform's devices)")
  parser.add_argument("--gpus_per_process", type=int, default=0)
  parser.add_argument("--logdir", default=None, help="process_<i>.log of processes 1..N-1")
  parser.add_argument("program", nargs=argparse.REMAINDER,
                      help="-- main.py --config=... --workdir=...")
  a = parser.parse_args(argv)
  program = a.program[1:] if a.program[:1] == ["--"] else a.program
  if not program:
    parser.error("no program given: ... -- main.py --config=... --workdir=...")
  return launch(program, a.num_processes, cpu_devices=a.cpu_devices,
                gpus_per_process=a.gpus_per_process, logdir=a.logdir)


if __name__ == "__main__":
  sys.exit(main())
