"""Distil the shipped moving-digits video DiT (assets/video_teacher) into a few-step generator.

The paper's main video setting on a problem that runs on a CPU: Phased DMD, 4-step 2-phase with
SGTS inside each phase, LoRA experts on the frozen teacher, per-phase full fake scores, teacher
CFG 3, TTUR 5, AdamW beta1 = 0. Evaluation adds optical flow, dynamic degree and warp error to
the per-frame digit metrics (pdmd_jax/evaluation/video_metrics.py); in-loop health logs motion
against the teacher's.

  python main.py --config=configs/video.py --workdir=/tmp/pdmd_video

The teacher is read from assets/video_teacher (where configs/video_teacher.py writes it; pass
``:teacher=DIR`` for another).

Variants (experiments/video_motion.py runs them on the same budget):

  python main.py --config=configs/video.py:method=phased_dmd,steps=4 ...   # 4-step 4-phase
  python main.py --config=configs/video.py:method=dmd2_sgts ...             # DMD2 / SGTS
  python main.py --config=configs/video.py:runlocal,teacher=/tmp/vt ...     # seconds (tests)
"""

import os

from pdmd_jax import assets
from pdmd_jax import configs


def _mnist_config(arg):
  """configs/mnist.py: the same method, optimisers, LoRA and schedule settings."""
  here = os.path.dirname(os.path.abspath(__file__))
  return configs.load(os.path.join(here, "mnist.py") + (f":{arg}" if arg else ""))


def get_config(arg=None):
  items = [i for i in (arg or "").split(",") if i]
  teacher = [i.partition("=")[2] for i in items if i.startswith("teacher=")]
  c = _mnist_config(",".join(i for i in items if not i.startswith("teacher=")))
  runlocal = "runlocal" in items
  c.teacher.path = (teacher[0] if teacher else "") or assets.path("video_teacher")
  c.train.batch_size = 8                          # 512-token clips: ~5.5 s per phase step
  c.train.num_steps = 4 if runlocal else 200      # generator updates over all phases
  c.health.seeds = 2 if runlocal else 3          # noises per class; health also logs motion
  c.eval.num_samples = 20 if runlocal else 300   # classes in turn: 30 clips per class
  return c
