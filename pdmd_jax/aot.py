"""Ahead-of-time plan of the trainer's phase step: compile it without weights; memory, FLOPs, shardings.

  python -m pdmd_jax.aot --config=configs/wan22.py --devices=64 --config.mesh.fsdp=-1 \
      --config.data.num_frames=9 --config.data.height=240 --config.data.width=416

The run is assembled exactly as ``main.py`` assembles it (``assembly.build``: the family's
``build``, the step config, the logical-rule shardings, the donated jitted phase step), but with
``abstract=True``: parameters, optimizer states and batch are ShapeDtypeStructs and no weight or
embedding file is read, so nothing of the model is allocated. The step is lowered through
``Assembly.lower``, the function the trainer compiles, on simulated CPU devices
(``jax_num_cpu_devices``): per-device argument/output/temp bytes come from XLA:CPU's
``compiled.memory_analysis()`` for the mesh. FLOPs are counted twice: XLA's ``cost_analysis``
(per device, but a loop body -- lax.scan over layers, the TTUR fori_loop -- counted once) and
the matmul FLOPs of the jaxpr with every scan multiplied by its length (global; a while loop
of dynamic trip count, the SGTS no-grad steps, counted once).

XLA:CPU has no bf16 matmul: it upcasts bf16 operands to f32, and its while-loop invariant code
motion then hoists the upcast of whole stacked arrays (the bf16 teacher's [40, ...] kernels,
the scan's saved bf16 activations) out of the layer scans, holding f32 copies of them.
``--cpu_upcast_hoisting=false`` disables those two passes (``CPU_ONLY_PASSES``) so the figure
is closer to what a TPU/GPU, which computes bf16 dots natively, allocates; the program is the
same.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import time

import jax
import jax.extend

from pdmd_jax import assembly
from pdmd_jax import train_step as ts


# ============================================================================================
# FLOPs
# ============================================================================================

def _subjaxprs(value):
  vals = value if isinstance(value, (tuple, list)) else (value,)
  for v in vals:
    if isinstance(v, jax.extend.core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jax.extend.core.Jaxpr):
      yield v


def jaxpr_matmul_flops(jaxpr) -> tuple[float, int]:
  """(2 * MACs of every dot_general, number of while loops counted once) of a jaxpr.

  lax.scan bodies are multiplied by their length; cond takes its most expensive branch.
  """
  total, whiles = 0.0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
      (_, rc), (_, rb) = eqn.params["dimension_numbers"]
      free = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
      total += 2.0 * math.prod(lhs.shape) * math.prod(rhs.shape[d] for d in free)
      continue
    subs = [(f, w) for v in eqn.params.values() for f, w in map(jaxpr_matmul_flops,
                                                                 _subjaxprs(v))]
    if not subs:
      continue
    if name == "cond":
      f, w = max(subs)
    else:
      f, w = sum(s[0] for s in subs), sum(s[1] for s in subs)
    if name == "scan":
      f *= eqn.params["length"]
    whiles += w + (name == "while")
    total += f
  return total, whiles


def matmul_flops(fn, *args) -> tuple[float, int]:
  """Global matmul FLOPs of fn(*args) (args may be abstract); see ``jaxpr_matmul_flops``."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan")))


# ============================================================================================
# Compile and report
# ============================================================================================

def compile_phase_step(asm: assembly.Assembly, k: int, count_flops: bool = True) -> dict:
  """Lowers and compiles phase k's step (the trainer's) for the abstract arguments."""
  args = (asm.abstract_state(k), asm.teacher_params(), asm.abstract_batch())
  t0 = time.perf_counter()
  lowered = asm.lower(k, *args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  report = {"lower_s": t1 - t0, "compile_s": t2 - t1, "memory": assembly.memory(compiled),
            "xla_flops_per_device": xla_flops(compiled), "compiled": compiled,
            "lowered": lowered, "args": args}
  if count_flops:
    with jax.set_mesh(asm.mesh):
      report["matmul_flops"], report["while_loops"] = matmul_flops(
          functools.partial(ts.phase_step, asm.step_cfg, k), *args)
  return report


def largest_arrays(tree, n: int = 8) -> list[dict]:
  """The n largest leaves of an abstract tree with shardings: path, shape, dtype, spec, bytes."""
  rows = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    nbytes = math.prod(x.shape) * x.dtype.itemsize
    shard = x.sharding.shard_shape(x.shape)
    rows.append({"path": _short(jax.tree_util.keystr(path)), "shape": tuple(x.shape),
                 "dtype": str(x.dtype), "spec": str(x.sharding.spec), "bytes": nbytes,
                 "shard_bytes": math.prod(shard) * x.dtype.itemsize})
  rows.sort(key=lambda r: -r["bytes"])
  # Stacked experts/fakes repeat the same leaves: keep one row per (path pattern, spec).
  seen, out = set(), []
  for r in rows:
    key = (re.sub(r"\[\d+\]", "[i]", r["path"]), r["spec"])
    if key not in seen:
      seen.add(key)
      out.append(r)
  return out[:n]


def _short(path: str) -> str:
  return path.replace("['", ".").replace("']", "").lstrip(".")


def size(b) -> str:
  return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def format_report(r: dict, mesh, title: str) -> str:
  m = r["memory"]
  lines = [f"## {title}", "",
           f"mesh {dict(mesh.shape)}; lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s", "",
           "| per device | bytes |", "|---|---|"]
  for k in ("argument", "output", "alias", "temp", "peak"):
    lines.append(f"| {k} | {size(m[k])} |")
  lines += ["", f"XLA cost_analysis FLOPs per device (loop bodies once): "
            f"{r['xla_flops_per_device']:.3e}"]
  if "matmul_flops" in r:
    lines.append(f"jaxpr matmul FLOPs, global (scans x length; {r['while_loops']} while loop(s) "
                 f"once): {r['matmul_flops']:.3e} = {r['matmul_flops'] / mesh.size:.3e} per device")
  lines += ["", "| largest arguments | shape | dtype | spec | size | per device |",
            "|---|---|---|---|---|---|"]
  state, teacher, batch = r["args"]
  for a in largest_arrays({"state": state, "teacher": teacher, "batch": batch}):
    lines.append(f"| {a['path']} | {a['shape']} | {a['dtype']} | {a['spec']} | {size(a['bytes'])}"
                 f" | {size(a['shard_bytes'])} |")
  return "\n".join(lines)


# ============================================================================================
# CLI
# ============================================================================================

CPU_ONLY_PASSES = "while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion"

def define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", "configs/wan22.py", "The run's config "
                                  "(configs/<name>.py[:variant]); --config.x=... overrides.",
                                  lock_config=False)
  flags.DEFINE_integer("devices", 8, "Simulated devices (the mesh of config.mesh over them).")
  flags.DEFINE_integer("phase", -1, "Phase to compile (-1 = the last: longest frozen prefix).")
  flags.DEFINE_bool("flops", True, "Also count the jaxpr's matmul FLOPs (one more trace).")
  flags.DEFINE_bool("cpu_upcast_hoisting", True, "XLA:CPU as is; false: without the loop "
                    "invariant code motion that hoists f32 upcasts of whole bf16 stacks (a "
                    "CPU-only cost; closer to TPU/GPU).")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if not f.cpu_upcast_hoisting:   # read when the backend starts, i.e. below
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_disable_hlo_passes={CPU_ONLY_PASSES}").strip()
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", f.devices)
  config = f.config
  asm = assembly.build(config, abstract=True)
  c = asm.step_cfg
  k = f.phase % c.plan.num_phases
  r = compile_phase_step(asm, k, count_flops=f.flops)
  title = (f"{config.teacher.type}: {c.plan.method} {c.plan.num_steps} steps "
           f"{c.plan.num_phases} phases, phase {k + 1}; batch {config.train.batch_size}, "
           f"TTUR {c.ttur}, sample {c.sample_shape}"
           + ("" if f.cpu_upcast_hoisting else "; XLA:CPU without upcast hoisting"))
  print(format_report(r, asm.mesh, title))
  sys.stdout.flush()


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
