"""Shared by the benchmarks: the docs/benchmarks.md section writer and small timing helpers."""

from __future__ import annotations

import os
import platform
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # no TPU/GPU probing (and its log lines)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
HEADER = """# Benchmarks

Measured on the development box (2 CPU cores, AVX-512, 24 GiB) while other jobs shared it
(load average 1.5-2 during the timed runs), so absolute times are noisy; ratios come from
alternating runs in one process.
Each section is written by its script; rerun the command to refresh it.
"""


def write_section(name: str, markdown: str, path: str = DOC):
  """Replaces (or appends) the section between <!-- begin:name --> and <!-- end:name -->."""
  text = open(path).read() if os.path.exists(path) else HEADER
  block = f"<!-- begin:{name} -->\n{markdown.strip()}\n<!-- end:{name} -->"
  pattern = re.compile(rf"<!-- begin:{re.escape(name)} -->.*?<!-- end:{re.escape(name)} -->",
                       re.S)
  text = pattern.sub(lambda _: block, text) if pattern.search(text) else \
      text.rstrip() + "\n\n" + block + "\n"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def machine() -> str:
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - t0


def dit_assembly(arch, *, method: str, steps: int, phases: int, lora_rank: int = 16,
                 ttur: int = 1, batch: int = 32, fake_lora_rank: int = 0,
                 abstract: bool = True):
  """The trainer's assembly of a random DiT teacher of ``arch`` (configs/mnist.py settings:
  CFG 3, shift 3, AdamW (0, 0.999), clip 1, dmd_normalized) on one device."""
  import jax  # pylint: disable=import-outside-toplevel
  from pdmd_jax import assembly  # pylint: disable=import-outside-toplevel
  from pdmd_jax.families import dit as dit_family  # pylint: disable=import-outside-toplevel
  c = dit_family.random_config(arch, f"method={method},steps={steps},phases={phases}", {
      "generator.lora_rank": lora_rank, "generator.lora_alpha": float(lora_rank),
      "fake.lora_rank": fake_lora_rank, "fake.lora_alpha": float(max(fake_lora_rank, 1)),
      "fake.ttur": ttur, "train.batch_size": batch, "mesh.data": 1,
      "train.num_steps": 840})   # a multiple of every phase count up to 8
  return assembly.build(c, devices=jax.devices()[:1], abstract=abstract)
