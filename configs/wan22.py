r"""Phased DMD on Wan2.2 A14B (T2V or I2V): the paper's setting (spec §3.1, §3.7, §4).

4-step 2-phase Phased DMD with SGTS inside each phase, grid 1, .938, .833, .625, 0 (shift 5),
MoE teacher (high-noise expert at t >= 0.875 for T2V, 0.9 for I2V), phase 1 re-noise t clamped
to the boundary (the paper's torch.clamp), generator experts = LoRA (rank 64, alpha 8, lr 5e-5)
on the expert owning each phase (phase 1 -> high noise, phase 2 -> low noise), full-parameter
fake scores (lr 4e-7) started from the teacher at each phase, TTUR 5, AdamW betas (0, 0.999),
global batch 64, 81 frames at 480 x 832 (latent 16 x 21 x 60 x 104), bf16 compute, scanned
and rematerialised blocks.

Inputs (validated before anything compiles; a missing one stops the run with instructions):
  teacher.path     a diffusers Wan2.2 root: model_index.json, transformer/ (high noise) and
                   transformer_2/ (low noise), each config.json + *.safetensors:
                     huggingface-cli download Wan-AI/Wan2.2-T2V-A14B-Diffusers \
                       --local-dir weights/Wan2.2-T2V-A14B-Diffusers \
                       --include 'model_index.json' 'transformer/*' 'transformer_2/*'
  data.embeddings  prompt embeddings (umT5) written once, anywhere with torch:
                     python scripts/write_wan_embeddings.py --prompts prompts.txt \
                       --model Wan-AI/Wan2.2-T2V-A14B-Diffusers --out weights/wan22_prompts.safetensors

Variants (after the colon, comma-separated):
  task=t2v|i2v   T2V-A14B (boundary 0.875) or I2V-A14B (boundary 0.9, 36 input channels;
                 the embeddings file then also holds each prompt's image `condition` latent)
  res=480p|720p  480 x 832 or 720 x 1280, 81 frames
  tiny           the same code path on a random 2-layer Wan (written to a temp dir in the
                 diffusers layout and loaded back) with random stand-in embeddings: CPU, minutes

  python main.py --config=configs/wan22.py:tiny --workdir=/tmp/wan_tiny
  python main.py --config=configs/wan22.py:task=i2v,tiny --workdir=/tmp/wan_tiny_i2v

TPU pod slice (e.g. v5p-64: 32 chips, one process per host; --distributed calls
jax.distributed.initialize(), which finds the slice on its own). Copy the weights and the
embeddings to every host (or a shared disk), then:

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="\
    cd ~/pdmd_jax && python main.py --distributed --config=configs/wan22.py \
      --config.teacher.path=/mnt/disks/wan/Wan2.2-T2V-A14B-Diffusers \
      --config.data.embeddings=/mnt/disks/wan/wan22_prompts.safetensors \
      --workdir=gs://$BUCKET/pdmd/wan22_t2v"

GPU nodes (8 x 80 GB per node; one process per node with all its GPUs, batch 64 must be a
multiple of the device count). Under SLURM jax.distributed.initialize() reads the job; else
set its coordinator through the environment on every node (node rank 0..N-1):

  JAX_COORDINATOR_ADDRESS=$HEAD_NODE:1234 JAX_NUM_PROCESSES=$NNODES JAX_PROCESS_ID=$NODE_RANK \
  python main.py --distributed --config=configs/wan22.py \
    --config.teacher.path=/data/Wan2.2-T2V-A14B-Diffusers \
    --config.data.embeddings=/data/wan22_prompts.safetensors --workdir=/shared/pdmd/wan22_t2v

Memory (fp32 params, bf16 compute; pure FSDP over all devices by default): teacher 2 x 14B
(112 GB), per phase a fake pair 2 x 14B + AdamW moments (336 GB), LoRA experts ~0.3B each:
about 0.8 TB plus activations, i.e. >= 16 x 80 GB devices (the paper used 64 GPUs).
"""

import ml_collections
from ml_collections import config_dict

from pdmd_jax.config_util import parse_arg

RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}


def get_config(arg=None):
  a = parse_arg(arg, task="t2v", res="480p", tiny=False, seed=0)
  if a.task not in ("t2v", "i2v"):
    raise ValueError(f"config variant task={a.task!r} is unknown; allowed: ['t2v', 'i2v']")
  if a.res not in RESOLUTIONS:
    raise ValueError(f"config variant res={a.res!r} is unknown; allowed: {sorted(RESOLUTIONS)}")
  boundary = {"t2v": 0.875, "i2v": 0.9}[a.task]
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.method = "phased_dmd_sgts"             # 4-step 2-phase with SGTS inside each phase
  c.num_steps = 4
  c.num_phases = 2
  c.shift = 5.0                            # Wan (following Self-Forcing)
  c.grid_times = (1.0, 0.938, 0.833, 0.625, 0.0)   # the paper's Table 1 (x1000: 1000 938 833 625)
  c.phase_order = "progressive"            # phase 2 trains after phase 1 is frozen
  c.schedule = "flow_matching"

  c.teacher = ml_collections.ConfigDict()
  c.teacher.type = "wan"
  c.teacher.task = a.task                  # t2v | i2v
  c.teacher.path = f"weights/Wan2.2-{a.task.upper()}-A14B-Diffusers"   # diffusers root
  c.teacher.random = a.tiny                # random tiny experts instead of teacher.path
  c.teacher.seed = 0                       # of the random experts
  c.teacher.boundary = boundary            # high-noise expert at t >= boundary (model_index.json)
  # CFG in the DMD gradient and the reference sampler: not reported by the paper; Wan2.2's
  # own defaults (T2V: 4.0 high / 3.0 low, I2V: 3.5 / 3.5). The fakes are unguided.
  c.teacher.guidance_scale = {"t2v": 4.0, "i2v": 3.5}[a.task]
  c.teacher.guidance_scale_low = config_dict.placeholder(float)   # None: guidance_scale
  c.teacher.guidance_scale_low = {"t2v": 3.0, "i2v": 3.5}[a.task]
  c.teacher.route = "switch"               # switch: one expert when the batch is on one side

  c.model = ml_collections.ConfigDict()    # numerics of every Wan copy (architecture: the files)
  c.model.dtype = "float32" if a.tiny else "bfloat16"   # compute
  c.model.param_dtype = "float32"          # fakes at lr 4e-7 need fp32 weights
  c.model.scan_layers = True
  c.model.remat = "full"                   # none | full | dots

  c.generator = ml_collections.ConfigDict()   # LoRA experts on the frozen teacher experts
  c.generator.lora_rank = 8 if a.tiny else 64
  c.generator.lora_alpha = 8.0
  c.generator.lora_targets = (r"blocks\.(\d+\.)?(attn1\.(to_q|to_k|to_v|to_out)|"
                              r"attn2\.(to_q|to_k|to_v|to_out)|ffn\.(fc1|fc2))\.kernel")
  c.generator.lr = 5e-5
  c.generator.b1 = 0.0
  c.generator.b2 = 0.999
  c.generator.weight_decay = 0.0           # not reported
  c.generator.grad_clip = 1.0              # not reported (ModelTC's trainer: 1.0)
  c.generator.weighting = "dmd_normalized"
  c.generator.norm_floor = 1e-4

  c.fake = ml_collections.ConfigDict()     # full-parameter fake MoE pair per phase
  c.fake.lora_rank = 0                     # > 0: shared backbone, a LoRA pair on the frozen
  c.fake.lora_alpha = 8.0                  #   teacher experts (then raise fake.lr, e.g. 5e-5)
  c.fake.lora_targets = c.generator.lora_targets
  c.fake.lr = 4e-7
  c.fake.b1 = 0.0
  c.fake.b2 = 0.999
  c.fake.weight_decay = 0.0
  c.fake.grad_clip = 1.0
  c.fake.target = "eq13"
  c.fake.clamp_final_phase = False
  c.fake.ttur = 2 if a.tiny else 5

  c.t_sampler = ml_collections.ConfigDict()
  c.t_sampler.t_min = 0.02                 # DMD's lower margin (last phase: s = 0)
  c.t_sampler.t_max = 1.0                  # T(t_k, 1): the paper's re-noise range
  c.t_sampler.shift = config_dict.placeholder(float)   # None = the grid's shift (5)
  c.t_sampler.phase1_floor = boundary      # Wan2.2 phase 1: t = max(t, boundary)
  c.t_sampler.floor_mode = "clamp"         # clamp (paper: a 1/6 point mass at 0.875) | resample

  c.data = ml_collections.ConfigDict()
  height, width = (64, 64) if a.tiny else RESOLUTIONS[a.res]
  c.data.height = height
  c.data.width = width
  c.data.num_frames = 5 if a.tiny else 81  # latent frames (n - 1) / 4 + 1
  c.data.embeddings = "" if a.tiny else "weights/wan22_prompts.safetensors"   # "" = random
  c.data.text_len = 16 if a.tiny else 512  # umT5 states zero-padded to this (diffusers: 512)
  c.data.random_prompts = 16               # the random stand-in (data.embeddings == "")
  c.data.random_length = 8
  c.data.max_table_gb = 8.0                # the embedding table sits on every device

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 2 if a.tiny else 64   # global
  c.train.num_steps = 2 if a.tiny else 800   # generator updates over both phases (not reported)
  c.train.log_every = 1 if a.tiny else 10
  c.train.ckpt_every = 2 if a.tiny else 50
  c.train.max_to_keep = 2

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1                         # all devices shard parameters and batch

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 2 if a.tiny else 16
  c.eval.batch_size = 2 if a.tiny else 8
  c.eval.teacher_substeps = 2 if a.tiny else 10   # 4 x 10 = 40 Euler steps (paper: 40, CFG 4)
  c.eval.seed = 1234
  c.eval.vae_path = ""                     # diffusers Wan VAE (e.g. <root>/vae) to decode videos
  c.eval.decode = 0                        # how many samples to decode (needs eval.vae_path)
  return c
