"""The DiT, LoRA experts and the Phased DMD phase step written plainly in PyTorch (eager).

A reference for benchmarks/step_time.py: the same architecture as pdmd_jax/models/dit.py
(patchify-linear, sin-cos positions, time MLP on the sinusoidal embedding of 1000 t, class
embedding with a null class, adaLN-Zero blocks qkv/proj/fc1/fc2/ada, adaLN final layer and
linear), the same LoRA (W + alpha/r A B) and the same phase step as pdmd_jax/train_step.py
(TTUR fake updates, then one generator update; losses of pdmd_jax/losses.py). Parameters are
flat dicts {"blocks.0.qkv.kernel": Tensor [in, out], ...} in the JAX layout, so
``params_from_jax`` is a plain copy. Randomness is passed in (``Noise``) so the two
implementations can be compared on the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


# ============================================================================================
# Network
# ============================================================================================

@dataclasses.dataclass(frozen=True)
class DiTShape:
  image_size: int
  channels: int
  patch: int
  hidden: int
  depth: int
  heads: int
  num_classes: int
  time_dim: int = 256

  @classmethod
  def from_jax(cls, cfg) -> "DiTShape":
    return cls(cfg.image_size, cfg.channels, cfg.patch, cfg.hidden, cfg.depth, cfg.heads,
               cfg.num_classes, cfg.time_dim)


def params_from_jax(params) -> dict[str, torch.Tensor]:
  """Flat {'a.b.c': float32 Tensor} from a JAX pure-dict parameter tree (or a LoRA tree)."""
  out = {}

  def walk(tree, prefix):
    if isinstance(tree, dict):
      for k, v in tree.items():
        walk(v, f"{prefix}.{k}" if prefix else str(k))
    else:
      out[prefix] = torch.from_numpy(np.array(tree, dtype=np.float32))
  walk(params, "")
  return out


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
  """2-D sin-cos encoding [grid^2, dim]: half the channels per axis (row, then column)."""
  share = (dim // 2) // 2 * 2
  sizes = (share, dim - share)
  ii, jj = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                          torch.arange(grid, dtype=torch.float64), indexing="ij")
  parts = []
  for coord, d in zip((ii.reshape(-1), jj.reshape(-1)), sizes):
    omega = 1.0 / 10_000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
    out = coord[:, None] * omega[None]
    parts += [torch.sin(out), torch.cos(out)]
  return torch.cat(parts, -1).float()


def timestep_embedding(t, dim: int) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
  args = (1000.0 * t.float())[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], -1)


def _linear(p, name, x):
  return torch.addmm(p[f"{name}.bias"], x.reshape(-1, x.shape[-1]),
                     p[f"{name}.kernel"]).reshape(*x.shape[:-1], -1)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def _norm(x):
  return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def dit_apply(s: DiTShape, pos: torch.Tensor, p: dict, x, t, y):
  """velocity(x [B, H, W, C], t [B], y [B] int; y == num_classes is the null class)."""
  b, n_side, d = x.shape[0], s.image_size // s.patch, s.hidden
  c = _linear(p, "t2", F.silu(_linear(p, "t1", timestep_embedding(t, s.time_dim))))
  c = c + p["y_embed.embedding"][y]
  tokens = x.reshape(b, n_side, s.patch, n_side, s.patch, s.channels).permute(0, 1, 3, 2, 4, 5)
  h = _linear(p, "embed", tokens.reshape(b, n_side * n_side, -1)) + pos[None]
  sc = F.silu(c)
  for i in range(s.depth):
    blk = f"blocks.{i}"
    shift1, scale1, gate1, shift2, scale2, gate2 = _linear(p, f"{blk}.ada", sc).chunk(6, -1)
    qkv = _linear(p, f"{blk}.qkv", _modulate(_norm(h), shift1, scale1))
    q, k, v = qkv.reshape(b, -1, 3, s.heads, d // s.heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
    h = h + gate1[:, None] * _linear(p, f"{blk}.proj", a)
    m = _linear(p, f"{blk}.fc2", F.gelu(_linear(p, f"{blk}.fc1", _modulate(_norm(h), shift2,
                                                                          scale2)),
                                        approximate="tanh"))
    h = h + gate2[:, None] * m
  shift, scale = _linear(p, "ada_out", sc).chunk(2, -1)
  out = _linear(p, "out", _modulate(_norm(h), shift, scale))
  out = out.reshape(b, n_side, n_side, s.patch, s.patch, s.channels).permute(0, 1, 3, 2, 4, 5)
  return out.reshape(b, s.image_size, s.image_size, s.channels)


def lora_merge(p: dict, lora: dict, scale: float) -> dict:
  """W + scale A B for every kernel in ``lora`` ({path: {"a": [in, r], "b": [r, out]}})."""
  out = dict(p)
  for path, ab in lora.items():
    out[path] = p[path] + scale * ab["a"] @ ab["b"]
  return out


# ============================================================================================
# Schedule and losses (flow matching: alpha = 1 - t, sigma = t)
# ============================================================================================

def _b(v, x):
  v = torch.as_tensor(v, dtype=x.dtype)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def transition(t, s):
  a_t, s_t, a_s, s_s = 1 - t, t, 1 - s, s
  a_ts = a_t / a_s
  var = torch.clamp(s_t**2 - a_ts**2 * s_s**2, min=1e-8)
  return a_ts, torch.sqrt(var)


def grad_direction(x_s, s, t, x_t, v_teacher, v_fake, weighting, norm_floor):
  s = torch.as_tensor(s, dtype=torch.float32)
  a_t, s_t, a_s, s_s = 1 - t, t, 1 - s, s
  a_ts, s_ts = transition(t, s)
  if weighting == "exact":
    return _b(a_t * a_ts / (a_t * s_t + s_t**2), x_s) * (v_teacher - v_fake)
  x0_t = x_t - _b(s_t, x_t) * v_teacher        # (x_t - sigma v) / (alpha + sigma), alpha + sigma = 1
  x0_f = x_t - _b(s_t, x_t) * v_fake
  c_x0 = _b(a_s * s_ts**2 / s_t**2, x_s)
  c_xt = _b(s_s**2 * a_ts / s_t**2, x_s)
  xs_t = c_x0 * x0_t + c_xt * x_t
  norm = torch.clamp((x_s.detach() - xs_t).abs().reshape(x_s.shape[0], -1).mean(1), min=norm_floor)
  return c_x0 * (x0_f - x0_t) / _b(norm, x_s)


def fake_target(x_s, s, t, eps, kind):
  s = torch.as_tensor(s, dtype=torch.float32)
  a_t, s_t, a_s, s_s = 1 - t, t, 1 - s, s
  _, s_ts = transition(t, s)
  c = (a_s**2 * s_t + a_t * s_s**2) / a_s**2
  one = torch.ones(x_s.shape[0])
  if kind == "eq11":
    return one, _b(one, x_s), _b(c / s_ts, x_s) * eps - x_s / _b(a_s, x_s)
  if kind == "eq13":
    return (torch.clamp(1 / s_ts**2, 0, 10) * one, _b(s_ts * one, x_s),
            _b(c, x_s) * eps - _b(s_ts / a_s, x_s) * x_s)
  raise ValueError(kind)


# ============================================================================================
# Phase step
# ============================================================================================

@dataclasses.dataclass
class Noise:
  """The randomness of one fake or generator update: z, SGTS stop index, t, eps."""
  z: torch.Tensor
  stop: int
  t: torch.Tensor
  eps: torch.Tensor


@dataclasses.dataclass
class PhaseSpec:
  times: tuple[float, ...]
  boundary: float
  grad_mode: str


class PhasedDMD:
  """Teacher (frozen), LoRA experts (one per phase), full fake copies, AdamW per part."""

  def __init__(self, shape: DiTShape, teacher: dict, loras: Sequence[dict], fakes: Sequence[dict],
               phases: Sequence[PhaseSpec], *, lora_scale: float, guidance: float, ttur: int,
               weighting: str, fake_target_kind: Sequence[str], gen_lr: float, fake_lr: float,
               betas=(0.0, 0.999), grad_clip: float = 1.0, norm_floor: float = 1e-4):
    self.s, self.pos = shape, sincos_pos_embed(shape.image_size // shape.patch, shape.hidden)
    self.teacher = teacher
    self.loras = [{k: {n: v.clone().requires_grad_() for n, v in ab.items()} for k, ab in l.items()}
                  for l in loras]
    self.fakes = [{k: v.clone().requires_grad_() for k, v in f.items()} for f in fakes]
    self.phases, self.lora_scale, self.guidance, self.ttur = phases, lora_scale, guidance, ttur
    self.weighting, self.fake_target_kind = weighting, fake_target_kind
    self.grad_clip, self.norm_floor = grad_clip, norm_floor
    self.gen_opt = [torch.optim.AdamW(_leaves(l), lr=gen_lr, betas=betas, eps=1e-8,
                                      weight_decay=0.0) for l in self.loras]
    self.fake_opt = [torch.optim.AdamW(list(f.values()), lr=fake_lr, betas=betas, eps=1e-8,
                                       weight_decay=0.0) for f in self.fakes]

  def apply(self, p, x, t, y):
    t = torch.as_tensor(t, dtype=torch.float32)
    return dit_apply(self.s, self.pos, p, x, t.expand(x.shape[0]) if t.ndim == 0 else t, y)

  def expert(self, i):
    return lora_merge(self.teacher, self.loras[i], self.lora_scale)

  def phase_sample(self, k, z, y, stop, grad: bool):
    """Frozen phases 0..k-1, then phase k (SGTS: ``stop`` no-grad steps, one jump with grad)."""
    x = z
    with torch.no_grad():
      for ph_i in range(k):
        ph, p = self.phases[ph_i], self.expert(ph_i)
        for t, t_next in zip(ph.times, ph.times[1:] + (ph.boundary,)):
          x = x + (t_next - t) * self.apply(p, x, t, y)
    ph = self.phases[k]
    times = torch.tensor(ph.times + (ph.boundary,), dtype=torch.float32)
    if ph.grad_mode == "full" or len(ph.times) == 1:
      stop, n_free = 0, len(ph.times)
    else:
      n_free = 1
    with torch.no_grad():
      p_frozen = self.expert(k)
      for i in range(stop):
        x = x + (times[i + 1] - times[i]) * self.apply(p_frozen, x, times[i], y)
    with torch.set_grad_enabled(grad):
      p = self.expert(k)
      for i in range(stop, stop + n_free):
        nxt = times[-1] if n_free == 1 else times[i + 1]
        x = x + (nxt - times[i]) * self.apply(p, x, times[i], y)
    return x

  def fake_update(self, k, y, n: Noise):
    ph = self.phases[k]
    x_s = self.phase_sample(k, n.z, y, n.stop, grad=False)
    a_ts, s_ts = transition(n.t, torch.tensor(ph.boundary))
    x_t = _b(a_ts, x_s) * x_s + _b(s_ts, x_s) * n.eps
    w, scale, target = fake_target(x_s, ph.boundary, n.t, n.eps, self.fake_target_kind[k])
    psi = self.apply(self.fakes[k], x_t, n.t, y)
    loss = (w * ((scale * psi - target)**2).reshape(len(w), -1).mean(1)).mean()
    gnorm = self._step(loss, list(self.fakes[k].values()), self.fake_opt[k])
    return loss.detach(), gnorm

  def generator_update(self, k, y, n: Noise):
    ph = self.phases[k]
    x_s = self.phase_sample(k, n.z, y, n.stop, grad=True)
    a_ts, s_ts = transition(n.t, torch.tensor(ph.boundary))
    x_t = _b(a_ts, x_s) * x_s.detach() + _b(s_ts, x_s) * n.eps
    with torch.no_grad():
      v_c = self.apply(self.teacher, x_t, n.t, y)
      if self.guidance != 1.0:
        v_u = self.apply(self.teacher, x_t, n.t, torch.full_like(y, self.s.num_classes))
        v_c = v_u + self.guidance * (v_c - v_u)
      v_f = self.apply(self.fakes[k], x_t, n.t, y)
      g = grad_direction(x_s.detach(), ph.boundary, n.t, x_t, v_c, v_f, self.weighting,
                         self.norm_floor)
    loss = 0.5 * ((x_s - (x_s - g).detach())**2).sum() / x_s.shape[0]
    gnorm = self._step(loss, _leaves(self.loras[k]), self.gen_opt[k])
    dmd = g.reshape(g.shape[0], -1).norm(dim=1).mean()
    return loss.detach(), gnorm, dmd

  def _step(self, loss, params, opt):
    """Backward, optax-style clip_by_global_norm, AdamW; returns the pre-clip grad norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    if self.grad_clip > 0 and gnorm >= self.grad_clip:
      for p in params:
        p.grad.mul_(self.grad_clip / gnorm)
    opt.step()
    return gnorm.detach()

  def phase_step(self, k, ys, noises: Sequence[Noise]) -> dict:
    """``ttur`` fake updates then one generator update; ys [ttur + 1, B]."""
    fl = fg = 0.0
    for i in range(self.ttur):
      l, g = self.fake_update(k, ys[i], noises[i])
      fl, fg = fl + l / self.ttur, fg + g / self.ttur
    loss, gnorm, dmd = self.generator_update(k, ys[self.ttur], noises[self.ttur])
    return {"fake_loss": float(fl), "fake_grad_norm": float(fg), "gen_surrogate": float(loss),
            "gen_grad_norm": float(gnorm), "dmd_grad_norm": float(dmd)}


def _leaves(lora):
  return [v for ab in lora.values() for v in ab.values()]


def lora_targets(params: dict, pattern: str) -> list[str]:
  return sorted(k for k, v in params.items() if v.ndim >= 2 and re.fullmatch(pattern, k))
