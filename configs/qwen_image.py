r"""Phased DMD on Qwen-Image (20B MMDiT, text-to-image): the paper's setting (spec §3.7, §4).

4-step 2-phase Phased DMD with SGTS inside each phase, fixed shift 3 (the paper's Table 1 grid
x1000: 1000 900 750 500, i.e. t = 1, .9, .75, .5, 0): phase 1 takes steps {1000, 900} to x_750
and re-noises t in (0.75, 1]; phase 2 takes {750, 500} to x_0 and re-noises t in (0.02, 1]
(DMD's lower margin). Teacher: diffusers' true CFG 4.0 against a negative-prompt embedding,
then the pipeline's per-token norm rescale (teacher.cfg_norm = "token"). Qwen-Image is not an
MoE: the two generator experts are LoRAs (rank 64, alpha 8, lr 5e-5), one per phase, on ONE
shared backbone, the frozen teacher; full-parameter fake scores (lr 4e-7) re-initialised
from the teacher at each phase, TTUR 5, AdamW betas (0, 0.999); data-free (no GAN, no
regression term). bf16 compute with the frozen teacher's blocks in bf16, scanned and
rematerialised blocks, blockwise attention. One resolution per run (static shapes): 1328 x
1328 (Qwen's native 1:1; the paper's mix of aspect ratios is one run per bucket here).

Inputs (validated before anything compiles; a missing one stops the run with instructions):
  teacher.path     a diffusers Qwen-Image root with transformer/ (config.json + shards):
                     huggingface-cli download Qwen/Qwen-Image --local-dir weights/Qwen-Image \
                       --include 'transformer/*' 'vae/*'
  data.embeddings  Qwen2.5-VL prompt embeddings + masks, written once with torch:
                     python scripts/write_qwen_image_embeddings.py --prompts prompts.txt \
                       --model Qwen/Qwen-Image --out weights/qwen_image_prompts.safetensors

Variants (after the colon, comma-separated):
  tiny   the same code path on a random 2-layer Qwen-Image (written to a temp dir in the
         diffusers layout and loaded back) with random stand-in embeddings: CPU, about a minute

  python main.py --config=configs/qwen_image.py:tiny --workdir=/tmp/qwen_tiny

TPU pod slice (one process per host; --distributed calls jax.distributed.initialize()). Copy
the weights and the embeddings to every host (or a shared disk), then:

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="\
    cd ~/pdmd_jax && python main.py --distributed --config=configs/qwen_image.py \
      --config.teacher.path=/mnt/disks/qwen/Qwen-Image \
      --config.data.embeddings=/mnt/disks/qwen/qwen_image_prompts.safetensors \
      --workdir=gs://$BUCKET/pdmd/qwen_image"

GPU nodes (8 x 80 GB per node, one process per node; the batch must divide over data x fsdp):

  JAX_COORDINATOR_ADDRESS=$HEAD_NODE:1234 JAX_NUM_PROCESSES=$NNODES JAX_PROCESS_ID=$NODE_RANK \
  python main.py --distributed --config=configs/qwen_image.py \
    --config.teacher.path=/data/Qwen-Image \
    --config.data.embeddings=/data/qwen_image_prompts.safetensors --workdir=/shared/pdmd/qwen

Memory (docs/qwen_image.md): teacher 20.4B with its block weights in bf16 (41 GB), the active
phase's fp32 fake + AdamW moments (245 GB), LoRA experts ~0.4B each: about 0.3 TB plus
activations; FSDP over all devices by default.
"""

import ml_collections

from pdmd_jax import configs as blocks

# Attention (both streams) and both MLPs of every block; the modulation linears stay frozen.
LORA_TARGETS = (r"transformer_blocks\.(\d+\.)?(attn\.(to_q|to_k|to_v|to_out|add_q_proj|"
                r"add_k_proj|add_v_proj|to_add_out)|(img_mlp|txt_mlp)\.(fc1|fc2))\.kernel")


def get_config(arg=None):
  a = blocks.parse_arg(arg, tiny=False, seed=0)
  # 4-step 2-phase with SGTS inside each phase; shift 3 (ComfyUI's Qwen-Image workflow, the
  # paper's App. B); phase 2 trains after phase 1 is frozen.
  c = blocks.method(ml_collections.ConfigDict(), "phased_dmd_sgts", 4, 2, shift=3.0,
                    seed=a.seed, grid_times=(1.0, 0.9, 0.75, 0.5, 0.0))

  c.teacher = ml_collections.ConfigDict()
  c.teacher.type = "qwen_image"            # pdmd_jax/families/qwen_image
  c.teacher.path = "weights/Qwen-Image"    # diffusers root (transformer/)
  c.teacher.random = a.tiny                # random tiny model instead of teacher.path
  c.teacher.seed = 0                       # of the random model
  c.teacher.guidance_scale = 4.0           # diffusers' true_cfg_scale (against the negative)
  c.teacher.cfg_norm = "token"             # none | sample | token: QwenImagePipeline's rescale

  c.model = ml_collections.ConfigDict()    # numerics of every copy (architecture: the files)
  c.model.dtype = "float32" if a.tiny else "bfloat16"   # compute
  c.model.param_dtype = "float32"          # fakes at lr 4e-7 need fp32 weights
  c.model.teacher_dtype = ""               # frozen teacher: "" = model.dtype | float32
  c.model.scan_layers = True
  c.model.remat = "full"                   # none | full | dots
  c.model.attention = "blockwise"          # no [L, L] logits (1328^2: 6,889 + text) | dense | auto
  c.model.num_layers = 0                   # 0 = the weights'; fewer only for AOT planning

  # LoRA experts (rank 64, alpha 8, lr 5e-5), one per phase on the shared frozen teacher;
  # weight decay not reported, clip 1.0 as ModelTC's trainer.
  c.generator = blocks.lora(blocks.generator(5e-5, grad_clip=1.0), rank=8 if a.tiny else 64,
                            alpha=8.0, targets=LORA_TARGETS)
  # Full-parameter fake per phase (lr 4e-7), started from the teacher; lora_rank > 0: shared
  # backbone, a LoRA on the frozen teacher (then raise fake.lr, e.g. 5e-5).
  c.fake = blocks.lora(blocks.fake(4e-7, grad_clip=1.0, ttur=1 if a.tiny else 5), rank=0,
                       alpha=8.0, targets=LORA_TARGETS)
  c.anchor = blocks.anchor()                      # the ODE anchor term (off: data-free DMD)
  c.gan = blocks.gan()                            # DMD2's GAN term (off; DiT families only)
  c.t_sampler = blocks.t_sampler(0.02, 1.0)       # T(t_k, 1), DMD's lower margin

  c.data = ml_collections.ConfigDict()
  c.data.height = 32 if a.tiny else 1328   # pixels (multiples of 16); latent / 8
  c.data.width = 48 if a.tiny else 1328
  c.data.embeddings = "" if a.tiny else "weights/qwen_image_prompts.safetensors"  # "" = random
  c.data.text_len = 8 if a.tiny else 1024  # most tokens of a prompt (pipeline: 1024; planning)
  c.data.random_prompts = 16               # the random stand-in (data.embeddings == "")
  c.data.random_length = 8
  c.data.max_table_gb = 8.0                # the in-memory table sits on every device
  c.data.stream = False                    # True: read each batch's rows from the .safetensors
  c.data.eval_prompts = 64                 #   file instead; evaluation draws from its first rows

  c.train = blocks.train(2 if a.tiny else 64, 2 if a.tiny else 800,   # 800: not reported
                         log_every=1 if a.tiny else 10, ckpt_every=2 if a.tiny else 50)
  c.mesh = blocks.mesh(data=1, fsdp=-1)    # all devices shard parameters and batch
  c.eval = blocks.evaluation(2 if a.tiny else 16,
                             1 if a.tiny else 10,   # 4 x 10 = 40 Euler steps, true CFG 4
                             batch_size=2 if a.tiny else 8,
                             vae_path="",   # diffusers AutoencoderKLQwenImage (<root>/vae)
                             decode=0)      # how many samples to decode to RGB (needs vae_path)
  return c
