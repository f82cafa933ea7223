"""Train the small DiT teacher on the 4,500 real MNIST training digits by flow matching.

The result ships in assets/mnist_teacher (EMA weights as safetensors + card.json with the
settings, wall time and the metrics of its guided samples). To retrain (about 40 minutes on
2 CPU cores; resumes from the workdir):

  python main.py --config=configs/mnist_teacher.py --workdir=/tmp/mnist_teacher

  python main.py --config=configs/mnist_teacher.py:runlocal --workdir=/tmp/t   # seconds (tests)
"""

import ml_collections

from pdmd_jax.configs import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, runlocal=False, steps=0)
  c = ml_collections.ConfigDict()
  c.job = "teacher"                      # main.py: train a teacher instead of distilling
  c.seed = 0
  c.out_dir = "/tmp/mnist_teacher_out" if a.runlocal else "assets/mnist_teacher"

  c.model = ml_collections.ConfigDict()
  c.model.variant = "tiny" if a.runlocal else "small"   # DiT size (models/dit.py VARIANTS)
  c.model.patch = 4                      # 32x32 -> 8x8 = 64 tokens
  c.model.num_classes = 10               # + 1 null class for CFG

  c.data = ml_collections.ConfigDict()
  c.data.source = "mnist"                # the offline digits; "tfds:NAME": a prepared tfds dataset
  c.data.tfds_dir = ""                   #   (pdmd_jax/data/tfds_data.py) in this --data_dir
  c.data.split = "train"                 #   and split

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16 if a.runlocal else 64
  c.train.num_steps = a.steps or (4 if a.runlocal else 4800)
  c.train.lr = 1e-3                      # AdamW peak learning rate (warm-up, cosine to 5%)
  c.train.warmup_steps = 1 if a.runlocal else 200
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.999              # the shipped weights are the EMA
  c.train.p_uncond = 0.1                 # label dropout (CFG)
  c.train.t_shift = 3.0                  # half the t's are shifted with this (the grid's shift)
  c.train.log_every = 1 if a.runlocal else 50
  c.train.ckpt_every = 2 if a.runlocal else 400

  c.eval = ml_collections.ConfigDict()   # guided many-step Euler samples, classifier metrics
  c.eval.num_samples = 20 if a.runlocal else 1000
  c.eval.steps = 4 if a.runlocal else 32
  c.eval.shift = 3.0
  c.eval.guidance_scale = 3.0            # CFG used for distillation
  c.eval.seed = 1234
  return c
