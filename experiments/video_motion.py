"""The paper's motion claim on moving digits: does few-step distillation keep the teacher's motion?

Distils the shipped video DiT teacher (assets/video_teacher) with DMD2/SGTS (4 steps), Phased DMD
4-step 2-phase with SGTS inside phases (the paper's main setting) and Phased DMD 4-step 4-phase,
all with the same budget (generator updates, TTUR, batch, LoRA rank, optimizers, CFG) and over
several seeds. Every run is evaluated on the same noise and labels, so the teacher's many-step
reference is one clip set. Writes ``docs/results/video.md`` (the analogue of the paper's Tables 2
and 6: optical flow, dynamic degree, FD to the teacher, diversity; mean ± std over seeds),
``video.json`` (every run) and ``video_strips.gif`` / ``.png``: the same seeds side by side
(rows = teacher, then each method; columns = clips of classes 0..9).

  python experiments/video_motion.py            # 3 seeds x 3 methods, ~8 min per run

Then ``--by_phase`` attributes each row's motion loss to the high- and low-noise halves of its
sampler (``motion_by_phase``), on the first seed whose run is in ``--workroot``.

Runs are cached in ``--workroot`` per teacher (card fingerprint); ``--prior`` reuses the runs of
earlier ``video.json`` files (same row, seed, updates, batch, eval clips and teacher), so seeds run
on other machines or in parallel sweeps join one table:

  python experiments/video_motion.py --seeds=1 --steps=240 --batch=8 --workroot=/tmp/a --out=/tmp/a
  python experiments/video_motion.py --seeds=0,1,2 --steps=240 --batch=8 --cached_only \
      --prior=docs/results/video_long/video.json,/tmp/a/video.json --out=docs/results/video_long
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pdmd_jax import assets  # noqa: E402
from pdmd_jax import configs  # noqa: E402
from pdmd_jax import families  # noqa: E402
from pdmd_jax import sampling  # noqa: E402
from pdmd_jax import trainer  # noqa: E402
from pdmd_jax.evaluation import gmm_metrics  # noqa: E402
from pdmd_jax.evaluation import image_eval  # noqa: E402
from pdmd_jax.evaluation import motion_metrics  # noqa: E402
from pdmd_jax.evaluation import video_metrics  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (LoRA init, noise, t, labels).")
_STEPS = flags.DEFINE_integer("steps", 120, "Generator updates per run (all methods).")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "docs", "results"), "Output directory.")
_WORK = flags.DEFINE_string("workroot", "/tmp/pdmd_video_motion", "Scratch workdirs.")
_ONLY = flags.DEFINE_list("only", ["sgts", "phased_sgts", "phased"],
                         "Row ids to run: sgts, phased_sgts, phased (the default sweep); "
                         "ablations: phased_ms (2-phase without SGTS inside phases), phased_r8 "
                         "and phased_sgts_r32 (phase count at matched LoRA parameters), dmd_ms "
                         "(one phase, gradient through all 4 steps), phased_2step (2-phase's "
                         "boundaries, one step per expert), phased_sgts_1_3 and phased_sgts_3_1 "
                         "(2-phase's boundary at 0.9 or 0.5), phased_ms_1_3 (the 0.9 boundary "
                         "without SGTS), phased_sgts_112 and phased_sgts_121 (3-phase plans).")
_TEACHER = flags.DEFINE_string("teacher", "", "Teacher asset directory ('' = the shipped one).")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size of every run.")
_EVAL = flags.DEFINE_integer("eval_samples", 200, "Clips per evaluation (classes in turn).")
_BY_PHASE = flags.DEFINE_bool("by_phase", True, "Attribute the first seed's motion loss to the "
                               "high- and low-noise halves of the sampler (motion_by_phase).")
_CACHED = flags.DEFINE_bool("cached_only", False, "Only tabulate runs already in --workroot "
                            "(e.g. after an interrupted sweep); missing runs are skipped, and "
                            "so are missing --by_phase attributions (a run without --cached_only "
                            "reuses the cached runs and computes them).")
_SET = flags.DEFINE_list("set", [], "Config overrides of every row, e.g. generator.lr=1e-4 (each "
                         "value takes the type of the field it replaces; a tuple as "
                         "train.phase_steps=90:30); part of a run's key.")
_PRIOR = flags.DEFINE_list("prior", [], "video.json files of earlier sweeps: their runs (same row, "
                           "seed, --steps, --batch, --eval_samples and teacher) count as cached.")

# (row id, row name, config variant)
ROWS = [
    ("sgts", "DMD2 / SGTS (4 steps)", "method=dmd2_sgts,steps=4"),
    ("phased_sgts", "Phased DMD 4-step 2-phase (SGTS in phases)", "method=phased_dmd_sgts,steps=4,phases=2"),
    ("phased", "Phased DMD 4-step 4-phase", "method=phased_dmd,steps=4"),
    ("phased_ms", "Phased DMD 4-step 2-phase (gradient through both steps)",
     "method=phased_dmd_multistep,steps=4,phases=2"),
    # Phase count vs parameters: 4 rank-8 experts hold 2-phase's LoRA parameters, 2 rank-32
    # experts 4-phase's (alpha stays 16: with the LoRA output scale alpha / r, Adam's early
    # updates move the output about equally at every rank, so mainly capacity changes).
    ("phased_r8", "Phased DMD 4-step 4-phase, LoRA rank 8 (2-phase's parameters)",
     "method=phased_dmd,steps=4,generator.lora_rank=8"),
    ("phased_sgts_r32", "Phased DMD 4-step 2-phase, LoRA rank 32 (4-phase's parameters)",
     "method=phased_dmd_sgts,steps=4,phases=2,generator.lora_rank=32"),
    ("dmd_ms", "DMD 4 steps (gradient through all steps)", "method=dmd_multistep,steps=4"),
    # 2-phase's boundaries (grid 1, 0.75, 0 at shift 3) with one step per expert.
    ("phased_2step", "Phased DMD 2-step 2-phase (2-phase's boundaries, one step each)",
     "method=phased_dmd,steps=2"),
    # Which of 4-phase's added boundaries matters: 2-phase on the 4-step grid (1, .9, .75, .5, 0)
    # with its boundary at 0.9 (1 + 3 steps) or at 0.5 (3 + 1 steps) instead of 0.75.
    ("phased_sgts_1_3", "Phased DMD 4-step 2-phase, 1 + 3 steps (boundary 0.9)",
     "method=phased_dmd_sgts,steps=4,phases=2,steps_per_phase=1:3"),
    ("phased_sgts_3_1", "Phased DMD 4-step 2-phase, 3 + 1 steps (boundary 0.5)",
     "method=phased_dmd_sgts,steps=4,phases=2,steps_per_phase=3:1"),
    # Two of 4-phase's three inner boundaries: 3-phase plans on the same grid.
    ("phased_sgts_112", "Phased DMD 4-step 3-phase, 1 + 1 + 2 steps (boundaries 0.9, 0.75)",
     "method=phased_dmd_sgts,steps=4,phases=3,steps_per_phase=1:1:2"),
    ("phased_sgts_121", "Phased DMD 4-step 3-phase, 1 + 2 + 1 steps (boundaries 0.9, 0.5)",
     "method=phased_dmd_sgts,steps=4,phases=3,steps_per_phase=1:2:1"),
    # The boundary-0.9 plan with the gradient through phase 2's three steps instead of SGTS.
    ("phased_ms_1_3", "Phased DMD 4-step 2-phase, 1 + 3 steps, gradient through all steps",
     "method=phased_dmd_multistep,steps=4,phases=2,steps_per_phase=1:3"),
]
METRICS = [("mean_flow", "optical flow (px/frame)"), ("flow_ratio", "flow / teacher"),
           ("dynamic_degree", "dynamic degree"), ("dynamic_degree_fast", "dyn. degree > 1.5"),
           ("warp_error", "warp error"),
           ("accuracy", "frame class acc."), ("fd_reference", "FD teacher"), ("fd_real", "FD real"),
           ("feature_cosine", "feat. cosine"), ("pixel_l2", "pixel L2"), ("saturation", "saturation")]


# Items of a row variant that are configs/video.py's own arguments; every other item is a config
# field (generator.lora_rank=8, steps_per_phase=1:3), set after loading.
_CONFIG_ARGS = ("method", "steps", "phases", "seed", "runlocal", "teacher")


def _load_config(variant):
  """configs/video.py with ``variant``: its own items (method=..., steps=...) and config fields
  (generator.lora_rank=8, steps_per_phase=1:3), which are set after loading."""
  items = [i for i in variant.split(",") if i]
  own = lambda item: item.partition("=")[0] in _CONFIG_ARGS
  teacher = f",teacher={_TEACHER.value}" if _TEACHER.value else ""
  config = configs.load("configs/video.py:" + ",".join(i for i in items if own(i)) + teacher)
  for item in items:
    if not own(item):
      key, value = _parse_leaf(config, item, "row variant")
      configs.set_leaf(config, key, value)
  return config


def _parse_leaf(config, item, where):
  """'a.b=value' as (key, value) with the value cast to the type of the field it replaces."""
  key, sep, value = item.partition("=")
  try:
    old = functools.reduce(lambda node, k: node[k], key.split("."), config)
  except (KeyError, AttributeError):
    raise app.UsageError(f"{where} {item!r}: no config field {key!r}") from None
  if not sep or isinstance(old, (dict, type(config))):
    raise app.UsageError(f"{where} {item!r}: expected field=value for a leaf field")
  if isinstance(old, bool):
    return key, value in ("1", "true", "True")
  if isinstance(old, tuple):        # a tuple of ints as "90:30" (--set splits on commas)
    return key, tuple(int(v) for v in value.split(":") if v)
  return key, type(old)(value)


def _teacher_dir():
  return _TEACHER.value or assets.path("video_teacher")


def _root():
  """The scratch directory of this teacher's runs: a teacher retrained in place gets a new one."""
  return os.path.join(_WORK.value, f"teacher_{assets.fingerprint(_teacher_dir())}")


def _run_config(row_id, variant, steps, seed):
  """(config, workdir) of one run of the sweep."""
  config = _load_config(f"{variant},seed={seed}")
  config.train.num_steps = steps
  config.train.ckpt_every = steps
  config.train.batch_size = _BATCH.value
  config.eval.num_samples = _EVAL.value
  config.health.seeds = 2          # in-loop monitoring only (not in the table): 20 clips per check
  for key, value in _overrides().items():
    configs.set_leaf(config, key, value)
  tag = "".join(f"_{k}={_path_safe(v)}" for k, v in sorted(_overrides().items()))
  return config, os.path.join(_root(), f"{row_id}_x{steps}_b{_BATCH.value}{tag}_s{seed}")


def _path_safe(value) -> str:
  """A value as a file-name part: itself if it is one, else a short hash (e.g. a regex)."""
  text = str(value)
  if re.fullmatch(r"[\w.+-]+", text):
    return text
  return "h" + hashlib.sha1(text.encode()).hexdigest()[:8]


@functools.cache
def _overrides():
  """--set as {dotted key: value}, each value cast to the type of the field it replaces."""
  base = _load_config(ROWS[0][2])
  return dict(_parse_leaf(base, item, "--set") for item in _SET.value)


# Config fields added after sweeps were recorded, with their defaults (left out of the hash).
_ADDED_LATER = {"train.phase_steps": (), "eval.every_phase": True, "steps_per_phase": ()}


def _run_key(config, steps, seed):
  """What makes two runs of a row the same run (stored in each run's record as "run"): the
  budget, the teacher's card and a hash of the whole run config (so a changed default, e.g. the
  LoRA targets, is a different run; ``--prior`` records written before the hash match on the
  other fields)."""
  key = {"seed": seed, "steps": steps, "batch": _BATCH.value, "eval_samples": _EVAL.value,
         "teacher": assets.fingerprint(_teacher_dir())}
  config = copy.deepcopy(config)
  config.teacher.path = ""                         # machine-dependent; the fingerprint is above
  for dotted, default in _ADDED_LATER.items():     # at its default, a field added after runs
    *parent, leaf = dotted.split(".")              #   were recorded keeps their hash
    node = functools.reduce(lambda n, k: n[k], parent, config)
    if leaf in node and node[leaf] == default:
      del node[leaf]
  key["config"] = hashlib.sha1(config.to_json(sort_keys=True).encode()).hexdigest()[:12]
  return {**key, "set": _overrides()} if _overrides() else key


@functools.cache
def _prior_runs():
  runs = {}
  for path in _PRIOR.value:
    for name, records in json.load(open(path)).items():
      runs.setdefault(name, []).extend(records)
  return runs


def run_one(row_id, name, variant, steps, seed):
  """(record, workdir) of one run: from --workroot, else from --prior (workdir None), else trained
  (record None if --cached_only)."""
  config, workdir = _run_config(row_id, variant, steps, seed)
  key = _run_key(config, steps, seed)
  if os.path.exists(os.path.join(workdir, "metrics.json")):
    out = _backfill(json.load(open(os.path.join(workdir, "metrics.json"))), workdir)
    by_phase = os.path.join(workdir, "by_phase.json")      # motion_by_phase's cache, if it ran
    if os.path.exists(by_phase):
      out["by_phase"] = json.load(open(by_phase))
    return {**out, "run": key}, workdir
  for out in _prior_runs().get(name, []):
    run = out.get("run") or {}
    if run == key or ("config" not in run and run == {k: v for k, v in key.items()
                                                       if k != "config"}):
      return out, None       # (records written before the config hash match without it)
  if _CACHED.value:
    return None, workdir
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  ref = os.path.join(_root(), "teacher_reference")   # the teacher's clips, shared
  if os.path.isdir(ref):
    for f in os.listdir(ref):
      shutil.copy(os.path.join(ref, f), workdir)
  t0 = time.time()
  out = trainer.train_and_evaluate(config, workdir, evaluate_phases=False, verbose=False)
  if "stopped_at_step" in out:       # preempted (SIGTERM) or stopped early: not a result
    sys.exit(f"{row_id} seed {seed}: stopped at step {out['stopped_at_step']} "
             f"({out.get('preempted') or out.get('stopped_early')}); rerun")
  out["wall_s"] = time.time() - t0
  os.makedirs(ref, exist_ok=True)
  for f in os.listdir(workdir):
    if f.startswith("teacher_samples"):
      shutil.copy(os.path.join(workdir, f), ref)
  json.dump(out, open(os.path.join(workdir, "metrics.json"), "w"), indent=1, default=float)
  return {**out, "run": key}, workdir


# The METRICS computed from clips alone: back-filled into older runs, reported for real clips.
_MOTION_KEYS = ("mean_flow", "dynamic_degree", "dynamic_degree_fast", "warp_error")


def _backfill(out, workdir):
  """Adds motion metrics introduced after a run finished, from its saved clips (the eval set and
  the teacher's reference on the same noise), and re-saves its metrics.json."""
  keys = [k for k in _MOTION_KEYS if f"student/{k}" not in out]
  if keys:
    for who, f in (("student", "samples_final.npy"), ("teacher", _teacher_file(workdir))):
      rep = motion_metrics.motion_report(np.clip(np.load(os.path.join(workdir, f)).astype(
          np.float32), -1.0, 1.0))
      out.update({f"{who}/{k}": rep[k] for k in keys})
    json.dump(out, open(os.path.join(workdir, "metrics.json"), "w"), indent=1, default=float)
  return out


@functools.cache
def _real_row():
  """Motion of held-out real clips with the teacher card's data settings (the data's reference)."""
  clips, _ = video_metrics.real_clips(assets.load_card(_teacher_dir())["data"], _EVAL.value)
  rep = motion_metrics.motion_report(clips)
  return {"method": f"real held-out clips ({_EVAL.value})", "steps": "", "seeds": 1,
          **{label: [rep[k]] for k, label in METRICS if k in _MOTION_KEYS}}


def main(argv):
  del argv
  jax.config.update("jax_compilation_cache_dir", os.path.join(_WORK.value, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  unknown = sorted(set(_ONLY.value) - {r[0] for r in ROWS})
  if unknown:
    raise app.UsageError(f"--only={unknown} unknown; allowed: {[r[0] for r in ROWS]}")
  os.makedirs(_OUT.value, exist_ok=True)
  rows = [r for r in ROWS if r[0] in _ONLY.value]
  old_strips = _old_strips_line()      # read before write_table rewrites video.md
  results, workdirs = {}, {}
  for seed in map(int, _SEEDS.value):     # seed-major: every row has a run before any has two
    for row_id, name, variant in rows:
      out, workdir = run_one(row_id, name, variant, _STEPS.value, seed)
      if out is None:
        continue
      results.setdefault(name, []).append(out)
      if workdir:
        workdirs.setdefault(name, (seed, workdir))     # the first seed run here
      print(f"{name} seed {seed}: flow {out['student/mean_flow']:.3f} (teacher "
            f"{out['teacher/mean_flow']:.3f}) dynamic {out['student/dynamic_degree']:.3f} "
            f"acc {out['student/accuracy']:.3f}" + (f" ({out['wall_s']:.0f}s)" if workdir else
                                                    " (--prior)"), flush=True)
      write_table(results)
  if not results:
    sys.exit("no finished runs to tabulate (--cached_only, --workroot, --prior)")
  extra = ""
  seeds = {s for s, _ in workdirs.values()}
  if old_strips and set(workdirs) != set(results):
    extra += old_strips      # a partial re-tabulation keeps the strips of every row it has
  elif len(seeds) == 1:      # side by side only on one seed's noise (the teacher row is shared)
    (seed,) = seeds
    strips = {"teacher": _teacher_clips(next(iter(workdirs.values()))[1])}
    strips.update({n: np.load(os.path.join(w, "samples_final.npy"))[:10]
                   for n, (_, w) in workdirs.items()})
    order = ["teacher"] + [n for _, n, _ in ROWS if n in strips]
    motion_metrics.save_video_strip(np.concatenate([strips[n] for n in order]).astype(np.float32),
                                    os.path.join(_OUT.value, "video_strips"), ncols=10, scale=3,
                                    mp4=False)
    extra += (f"\nSame noise and labels side by side (seed {seed}): [video_strips.gif](video_strips.gif) "
              "(rows: " + ", ".join(order) + "; columns: classes 0-9); "
              "[video_strips.png](video_strips.png) has each clip's frames along a row.\n")
  if _BY_PHASE.value and results:
    for row_id, name, variant in rows:   # each row's first seed run here, unless a record has it
      if (name in workdirs and not _CACHED.value
          and not any("by_phase" in r for r in results[name])):
        seed = workdirs[name][0]
        by_phase = motion_by_phase(row_id, variant, _STEPS.value, seed)
        next(r for r in results[name] if r["run"]["seed"] == seed)["by_phase"] = by_phase
    table = [{"method": name, "seed ids": ", ".join(str(r["run"]["seed"]) for r in runs
                                                 if "by_phase" in r),
              **{label: [r["by_phase"][k] for r in runs if "by_phase" in r]
                 for k, label in _BY_PHASE_COLS.items()}}
             for name, runs in results.items() if any("by_phase" in r for r in runs)]
    if table:     # none when --cached_only finds no attribution
      extra += ("\n## Where the motion goes\n\nflow / teacher of the same clips "
                "when the run's experts take only part of the 4-step grid and the teacher's fine "
                "Euler the rest (`sampling.mixed_sample`): high-noise half = the experts from t = 1 "
                "to 0.75 (phase 0 of the 2-phase plan), then the teacher; low-noise half = the "
                "teacher to t = 0.75, then the experts. fast quarter: the same ratio on the clips "
                "where the teacher moves fastest (top 25% of its flow).\n\n"
                + gmm_metrics.markdown_table(table, ["method", "seed ids"]
                                             + list(_BY_PHASE_COLS.values())))
  write_table(results, extra + paired_section(results))


def paired_section(results) -> str:
  """Markdown: each row's flow / teacher against the first row's (the baseline) on the seeds
  both ran. The runs of one seed share the teacher's clips, noise and labels, so the per-seed
  difference is the paired comparison; the gap of the means over the larger seed std is issue
  17's separation figure (> 2: apart by more than twice the larger seed std)."""
  if len(results) < 2:
    return ""
  base_name, base = next(iter(results.items()))
  ratio = lambda runs: {r["run"]["seed"]: r["student/flow_ratio"] for r in runs}
  b = ratio(base)
  table = []
  for name, runs in list(results.items())[1:]:
    a = ratio(runs)
    seeds, diff = gmm_metrics.paired_by_seed(b, a)
    if not seeds:
      continue
    diff = diff.tolist()
    sd = max(np.std([a[s] for s in seeds]), np.std([b[s] for s in seeds]))
    table.append({"method": name, "seed ids": ", ".join(map(str, seeds)),
                  "difference (paired)": diff, "ahead on": f"{sum(d > 0 for d in diff)} / "
                  f"{len(seeds)}", "min difference": f"{min(diff):+.3f}",
                  "gap / larger std": f"{np.mean(diff) / sd:.2f}" if sd > 0 else ""})
  if not table:
    return ""
  return (f"\n## Paired against {base_name}\n\nflow / teacher minus {base_name}'s on the same "
          "seed (same teacher clips, noise and labels), over the seeds both rows ran; gap / "
          "larger std: the difference of the two rows' means over these seeds divided by the "
          "larger of their seed stds (> 2: apart by more than twice it).\n\n"
          + gmm_metrics.markdown_table(table, ["method", "seed ids", "difference (paired)",
                                               "ahead on", "min difference",
                                               "gap / larger std"]) + "\n")


_BY_PHASE_COLS = {"all": "all 4 steps distilled", "high": "high-noise half only",
                  "low": "low-noise half only", "all_fast": "all 4, fast quarter",
                  "high_fast": "high half, fast quarter", "low_fast": "low half, fast quarter"}


def motion_by_phase(row_id, variant, steps, seed):
  """Where a finished run loses motion: flow / teacher when only part of its sampler is distilled.

  The eval noise and labels are sampled with the run's experts on every grid step ("all"), on
  the high-noise half of the grid only (t = 1 -> 0.75, phase 0 of the 2-phase plan; the teacher's
  fine Euler below) and on the low-noise half only (the teacher's fine Euler above). Also the
  ratio on the teacher's fastest quarter of clips. Cached as ``by_phase.json`` in the workdir.
  """
  config, workdir = _run_config(row_id, variant, steps, seed)
  path = os.path.join(workdir, "by_phase.json")
  if os.path.exists(path):
    return json.load(open(path))
  run, state = trainer.restore_latest(config, workdir)
  z, labels = image_eval.inputs(run)
  teacher_flow = motion_metrics.clip_motion(np.load(os.path.join(workdir, _teacher_file(workdir))))["flow"]
  fast = teacher_flow >= np.quantile(teacher_flow, 0.75)
  n, half = run.plan.num_steps, run.plan.num_steps // 2
  out = {}
  for key, use in (("all", (False,) * n), ("high", (False,) * half + (True,) * (n - half)),
                   ("low", (True,) * half + (False,) * (n - half))):
    fn = jax.jit(lambda e, tp, z, y, use=use: families.decode(run.family, sampling.mixed_sample(
        run.plan, run.step_cfg.experts_apply(tp), e, run.teacher, tp, z, y, use_teacher=use,
        substeps=config.eval.teacher_substeps, shift_value=config.shift)[-1]))
    x = image_eval._batches(lambda zb, yb, fn=fn: fn(run.experts(state), run.teacher_params, zb, yb),  # pylint: disable=protected-access
                            z, labels, 50)
    flow = motion_metrics.clip_motion(x)["flow"]
    out[key] = float(flow.mean() / teacher_flow.mean())
    out[key + "_fast"] = float(flow[fast].mean() / teacher_flow[fast].mean())
  json.dump(out, open(path, "w"), indent=1)
  return out


def _old_strips_line():
  """The strips line of an existing video.md in --out (with its rows and seed), or ""."""
  path = os.path.join(_OUT.value, "video.md")
  lines = open(path).read().splitlines() if os.path.exists(path) else []
  return next(("\n" + l + "\n" for l in lines if l.startswith("Same noise and labels side by side")
               and os.path.exists(os.path.join(_OUT.value, "video_strips.gif"))), "")


def _teacher_file(workdir):
  """The teacher's reference clips in a run's workdir: with several (the shared references are
  copied into every run, one per student grid), the finest grid's, i.e. the table's 32-step row."""
  return max((f for f in os.listdir(workdir) if f.startswith("teacher_samples_n")
              and f.endswith(".npy")), key=lambda f: (f.count("-"), f))


def _teacher_clips(workdir):
  return np.load(os.path.join(workdir, _teacher_file(workdir)))[:10].astype(np.float16)


def write_table(results, extra=""):
  """Writes video.md (keeping its hand-written "## Reading" section, if any) and video.json."""
  first = next(iter(results.values()))[0]
  c, _ = _run_config(*ROWS[0][::2], _STEPS.value, 0)
  teacher = {"method": f"teacher (32-step Euler, CFG {c.teacher.guidance_scale:g}; reference)",
             "steps": 32, "seeds": 1, **{label: [first[f"teacher/{k}"]]
                            for k, label in METRICS if k not in ("fd_reference", "flow_ratio")}}
  rows = [_real_row(), teacher]
  for name, runs in results.items():
    row = {"method": name, "steps": 4, "seeds": len(runs)}
    row.update({label: [r[f"student/{k}"] for r in runs] for k, label in METRICS})
    row["ms / step"] = [r["time_per_step_ms"] for r in runs]
    rows.append(row)
  cols = ["method", "steps", "seeds"] + [label for _, label in METRICS] + ["ms / step"]
  header = (f"# Moving digits (video DiT teacher): motion after distillation, {_STEPS.value} "
            f"generator updates per run (TTUR {c.fake.ttur}, batch {_BATCH.value}, LoRA rank "
            f"{c.generator.lora_rank}, generator lr {c.generator.lr:g}, fake lr {c.fake.lr:g}, "
            f"CFG {c.teacher.guidance_scale:g})\n\n"
            "Command: `python experiments/video_motion.py --seeds=" + ",".join(_SEEDS.value) +
            f" --steps={_STEPS.value} --batch={_BATCH.value} --eval_samples={_EVAL.value}"
            + ("" if _ONLY.value == _ONLY.default else f" --only={','.join(_ONLY.value)}")
            + (f" --set={','.join(_SET.value)}" if _SET.value else "")
            + ("" if _OUT.value == _OUT.default else
               f" --out={os.path.relpath(_OUT.value, ROOT)}") + "`"
            + (" (tabulated from cached runs with --cached_only: the seeds column counts the "
               "runs that finished)" if _CACHED.value else "") + ". mean ± std "
            f"over seeds; each run draws the same {_EVAL.value} clips ({_EVAL.value // 10} per class, "
            "8 frames of 32x32) from the same noise and labels as the teacher's "
            "32-step reference. optical flow: ink-weighted mean Farneback flow magnitude between "
            "consecutive frames (px/frame; the paper's optical-flow score); flow / teacher: its "
            "ratio to the teacher's clips (< 1 = slowed motion); dynamic degree: share of clips "
            f"with flow > {motion_metrics.DYNAMIC_THRESHOLD} px/frame (static vs moving); dyn. "
            f"degree > {motion_metrics.FAST_THRESHOLD}: share with flow > "
            f"{motion_metrics.FAST_THRESHOLD} px/frame, about the real clips' median "
            "(`motion_metrics.FAST_THRESHOLD`); warp error: mean |frame_t - "
            "warp(frame_t+1)| (temporal inconsistency); frame class acc.: per-frame digit accuracy "
            "of the project's classifier on centroid crops; FD teacher / FD real: Frechet distance "
            "of clip features (classifier features averaged over frames) to the teacher's clips / "
            f"to {_EVAL.value} real held-out clips; feat. cosine: same-class pairwise cosine of clip features "
            "(higher = less diverse); pixel L2: same-class pairwise clip distance; ms / step: "
            "median phase step (TTUR fake updates + generator update), 2 CPU cores. Teacher: "
            f"{_teacher_dir().replace(ROOT + os.sep, '')} (card fingerprint "
            f"{assets.fingerprint(_teacher_dir())}).\n\n")
  path = os.path.join(_OUT.value, "video.md")
  old = open(path).read() if os.path.exists(path) else ""
  reading = old[old.index("\n## Reading") + 1:] if "\n## Reading" in old else ""
  body = header + gmm_metrics.markdown_table(rows, cols) + extra
  with open(path + ".tmp", "w") as f:
    f.write(body.rstrip("\n") + "\n\n" + reading if reading else body)
  os.replace(path + ".tmp", path)
  with open(os.path.join(_OUT.value, "video.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
  app.run(main)
