"""Can guidance buy a video teacher temporal consistency? Spatiotemporal skip guidance (STG).

STG (Hyun et al. 2024, used with Wan and HunyuanVideo) guides away from the same network with
its temporal layers skipped:

  v = v_u + s (v_c - v_u) + w (v_c - v_c^skip),

v_c / v_u the conditional / null-class velocity (CFG scale s) and v_c^skip the conditional
velocity with every block's temporal branch off (``dit.temporal_skipped``: each frame is
denoised by the spatial layers alone, as the image teacher would). w > 0 pushes each step away
from what independent frames would do; ``--interval`` restricts it to a t range (the frames of the
shipped teacher part ways between t = 0.9 and 0.6: docs/results/teacher_consistency.md).
Each row samples the same noise and labels with the teacher's 32-step Euler grid and reports
warp error (temporal inconsistency), mean flow and per-clip speed std (motion), frame accuracy
and FD to real clips (``video_metrics.video_report``).

  python experiments/skip_guidance.py --out=docs/results/skip_guidance
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pdmd_jax import assets  # noqa: E402
from pdmd_jax import sampling  # noqa: E402
from pdmd_jax import teacher_training  # noqa: E402
from pdmd_jax import teachers  # noqa: E402
from pdmd_jax.models import dit  # noqa: E402
from pdmd_jax.evaluation import video_metrics  # noqa: E402

_TEACHER = flags.DEFINE_string("teacher", "", "Video teacher directory ('' = the shipped one).")
_SCALES = flags.DEFINE_list("scales", ["0", "0.25", "0.5", "1", "2"], "STG scales w.")
_INTERVAL = flags.DEFINE_list("interval", ["0", "1"], "t range [lo, hi] where w applies "
                              "(0 elsewhere).")
_NUM = flags.DEFINE_integer("num_clips", 100, "Clips per row (classes in turn).")
_BATCH = flags.DEFINE_integer("batch", 25, "Clips per sampler call (memory).")
_STEPS = flags.DEFINE_integer("steps", 32, "Euler steps.")
_CFG = flags.DEFINE_float("guidance_scale", 3.0, "CFG scale s.")
_SHIFT = flags.DEFINE_float("shift", 3.0, "Time shift of the Euler grid.")
_OUT = flags.DEFINE_string("out", "/tmp/skip_guidance", "Output directory.")

KEYS = ("warp_error", "mean_flow", "std_flow", "accuracy", "fd_real", "saturation")


def main(_):
  directory = _TEACHER.value or assets.path("video_teacher")
  cfg, net, params, card = teacher_training.load_teacher(directory)
  interval = tuple(map(float, _INTERVAL.value))
  if len(interval) != 2 or not 0.0 <= interval[0] < interval[1] <= 1.0:
    raise app.UsageError(f"--interval={_INTERVAL.value}: need lo,hi with 0 <= lo < hi <= 1")
  both = (params, dit.temporal_skipped(params))
  real, _ = video_metrics.real_clips(card["data"], _NUM.value)
  y = jnp.arange(_NUM.value) % cfg.num_classes
  z = jax.random.normal(jax.random.PRNGKey(1234), (_NUM.value,) + tuple(cfg.sample_shape))
  times, _ = sampling.fine_grid([1.0, 0.0], _STEPS.value, _SHIFT.value)
  rows = []
  for w in map(float, _SCALES.value):
    teacher = teachers.skip_guidance_teacher(net.apply, cfg.num_classes, _CFG.value, w, interval)
    run = jax.jit(lambda p, z, y: sampling.euler(teacher, p, times, z, y)[-1])
    clips = np.concatenate([np.asarray(run(both, z[i:i + _BATCH.value], y[i:i + _BATCH.value]))
                            for i in range(0, _NUM.value, _BATCH.value)])
    rep = video_metrics.video_report(clips, np.asarray(y), real=real,
                                     sprite_size=card["data"].get("sprite_size"))
    rows.append({"scale": w, "interval": list(interval), **{k: rep[k] for k in KEYS}})
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in rows[-1].items()), flush=True)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "skip_guidance.json")
  old = json.load(open(path)) if os.path.exists(path) else []
  keep = [r for r in old if r["interval"] != list(interval) or r["scale"] not in
          [r2["scale"] for r2 in rows]]
  rows = sorted(keep + rows, key=lambda r: (r["interval"], r["scale"]))
  with open(path, "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(_OUT.value, "skip_guidance.md"), "w") as f:
    f.write(f"# Skip guidance (STG) on the video teacher ({os.path.relpath(directory, ROOT)}, "
            f"card fingerprint {assets.fingerprint(directory)})\n\n"
            f"`python experiments/skip_guidance.py --scales=... --interval=lo,hi` "
            f"({_NUM.value} clips per row, same noise and labels, {_STEPS.value}-step Euler, "
            f"shift {_SHIFT.value:g}, CFG {_CFG.value:g}; w = 0 is the teacher as shipped).\n\n"
            "| w | t range | warp error | mean flow (px/frame) | speed std | frame acc. | "
            "FD real | saturation |\n|---|---|---|---|---|---|---|---|\n")
    for r in rows:
      f.write(f"| {r['scale']:g} | [{r['interval'][0]:g}, {r['interval'][1]:g}] | "
              f"{r['warp_error']:.4f} | {r['mean_flow']:.3f} | {r['std_flow']:.3f} | "
              f"{r['accuracy']:.3f} | {r['fd_real']:.0f} | {r['saturation']:.3f} |\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
