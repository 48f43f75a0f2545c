"""Both papers' central comparisons, with one command: runs the arms, writes report + figures.

  python -m mar.tools.replicate --suite=miniature --workdir=/tmp/mar_mini [--seeds=0,1,2,3,4] [--jobs=2]
  python -m mar.tools.replicate --suite=miniature --tiny --workdir=/tmp/t   # seconds, a check
  python -m mar.tools.replicate --suite=paper --workdir=/runs/paper         # commands + report

`miniature` trains every arm of configs/miniature.py (multi-attempt PPO, single-turn PPO,
GRPO, GRPO + extra rollouts, LTE) for each seed, each through `mar.train.train` in
`<workdir>/<arm>/seed_<s>` from the same cached warm start, `--jobs` runs at a time (worker
processes). A finished arm (eval rows at its last step) is skipped and an interrupted one
resumes from its checkpoint, so rerunning the command picks up where it stopped. `paper`
prints the `mar.main` commands of the paper configs for the same layout (they need
accelerators) and reports on whichever of those workdirs have finished.
Both write `<workdir>/report.json` (mar.evaluation.compare) and `<workdir>/figures/*.png`.
"""

from __future__ import annotations

import ast
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections

from mar.evaluation import compare, report
from mar.metrics import METRICS_FILE

_SUITE = flags.DEFINE_enum("suite", "miniature", ["miniature", "paper"], "Which comparison set.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root of the arms' workdirs and the report.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "RL seeds (config.seed) per arm.")
_ARMS = flags.DEFINE_list("arms", list(compare.PPO_ARMS + compare.GROUP_ARMS), "Arms to run.")
_TINY = flags.DEFINE_bool("tiny", False, "Seconds-long settings (configs/miniature.py ',tiny').")
_PPO_MODEL = flags.DEFINE_string(
    "ppo_model", "/ckpt/Qwen2.5-Math-1.5B", "--suite=paper: HF folder of the PPO arms' model.")
_LTE_MODEL = flags.DEFINE_string(
    "lte_model", "/ckpt/Qwen3-8B-Base", "--suite=paper: HF folder of the GRPO-family model.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Train nothing: report on the finished arms under --workdir.")
_COMPILE_CACHE = flags.DEFINE_bool(
    "compile_cache", True, "Persist XLA programs under the mar cache: the seeds and arms "
    "that share shapes compile once.")
_JOBS = flags.DEFINE_integer(
    "jobs", 2, "Runs trained at once, each in its own worker process (the miniature suite's "
    "design: 2 on a 2-core machine).")
_WORKER = flags.DEFINE_bool("worker", False, "Internal (set by --jobs): train the (arm, seed) "
                            "pairs this process claims first, then exit.")
_SET = flags.DEFINE_multi_string(
    "set", [], "Config override for every arm, KEY=VALUE (e.g. train.num_steps=10).")
flags.mark_flags_as_required(["workdir"])

REPORT_FILE = "report.json"
SUMMARY_FILE = "report.md"  # the tables of report.json beside the papers' numbers
FIGURES_DIR = "figures"
TIMINGS_FILE = "timings.json"
CLAIMS_DIR = "claims"  # --jobs: which worker trains which (arm, seed)
LOGS_DIR = "logs"
START_EVAL_DIR = "start_eval"  # the warm start's step-0 rows, per evaluation kind

# arm -> (config file, variant) of the paper-scale runs
PAPER_CONFIGS = {
    "multi_attempt": ("configs/multi_attempt_qwen.py", None),
    "single_turn": ("configs/ppo_qwen.py", None),
    "grpo": ("configs/grpo_qwen.py", None),
    "grpo_extra": ("configs/grpo_qwen.py", "extra"),
    "lte": ("configs/lte_qwen.py", None),
}


def arm_workdir(root: str, arm: str, seed: int) -> str:
  return os.path.join(root, arm, f"seed_{seed}")


def parse_override(text: str) -> tuple[str, object]:
  """'a.b=VALUE' -> ('a.b', literal VALUE, or the string when it is not a Python literal)."""
  key, sep, raw = text.partition("=")
  if not sep or not key:
    raise ValueError(f"--set {text!r}: expected KEY=VALUE")
  try:
    return key, ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return key, raw


def arm_config(arm: str, seed: int, tiny: bool = False, overrides=()):
  """configs/miniature.py's arm with `seed` and overrides, locked (typos stay errors)."""
  from configs import miniature

  config = miniature.get_config(arm + (",tiny" if tiny else ""))
  config.seed = int(seed)
  config.lock()
  for text in overrides:
    key, value = parse_override(text)
    *head, last = key.split(".")
    node = config
    for h in head:
      node = node[h]
    if last not in node:
      raise KeyError(f"--set {text!r}: no config key {key!r}")
    node[last] = type(node[last])(value) if isinstance(node[last], float) else value
  return config


def finished(config, workdir: str) -> bool:
  """True when the run's eval.jsonl has rows at its last training step."""
  path = report.eval_path(workdir)
  if not os.path.exists(path):
    return False
  return config.train.num_steps in report.steps_of(report.read_eval_rows(path))


def _cpu_seconds() -> float:
  """CPU time of this process and its reaped children (the verifier pool of a finished run)."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def run_arm(config, workdir: str) -> dict | None:
  """Trains one arm (resuming if interrupted); returns its wall and CPU seconds, None if done.

  CPU seconds bound what the arm would take on an unloaded machine when the wall clock is
  inflated by other jobs sharing the cores (between cpu_s / cores and cpu_s).
  """
  if finished(config, workdir):
    logging.info("replicate: %s already finished", workdir)
    return None
  from mar import train

  wall, cpu = time.perf_counter(), _cpu_seconds()
  train.train(config, workdir)
  return {"wall_s": time.perf_counter() - wall, "cpu_s": _cpu_seconds() - cpu,
          "steps": config.train.num_steps}


def run_miniature(root: str, arms, seeds, tiny: bool, overrides, jobs: int = 1) -> dict:
  """Every (arm, seed), `jobs` at a time; returns runs[arm][seed] = workdir.

  With jobs > 1 each of `jobs` worker processes claims the next unclaimed (arm, seed) in
  seed-major order (a claim file under `<root>/claims`), so the costlier arms balance
  themselves; this process shows the steps done over all runs and records the suite's wall
  time. Worker logs: `<root>/logs/`.
  """
  from mar import demo

  timings_path = os.path.join(root, TIMINGS_FILE)
  first = arm_config(arms[0], seeds[0], tiny, overrides)
  wall, cpu, load = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
  demo.ensure_demo_model(first, root)  # the shared warm start, built once into the cache
  if "warm_start" not in _read_json(timings_path):
    _record_timing(timings_path, "warm_start", {"wall_s": time.perf_counter() - wall,
                                                "cpu_s": _cpu_seconds() - cpu})
  tasks = [(arm, seed) for seed in seeds for arm in arms]
  pending = [t for t in tasks if not _finished_task(root, *t, tiny, overrides)]
  for arm, seed in sorted(set(tasks) - set(pending)):
    logging.info("replicate: %s already finished", arm_workdir(root, arm, seed))
  if jobs <= 1 or len(pending) <= 1:
    train_tasks(root, pending, tiny, overrides)
  elif pending:
    _run_workers(root, pending, tiny, overrides, jobs)
  _record_timing(timings_path, "suite", {"wall_s": time.perf_counter() - wall, "jobs": jobs,
                                         "load_avg_1m": [load, os.getloadavg()[0]],
                                         "runs": len(tasks)})
  runs: dict = {}
  for arm, seed in tasks:
    if _finished_task(root, arm, seed, tiny, overrides):
      runs.setdefault(arm, {})[seed] = arm_workdir(root, arm, seed)
  missing = [f"{a}/seed_{s}" for a, s in tasks if s not in runs.get(a, {})]
  if missing:
    raise RuntimeError(f"replicate: runs did not finish: {missing} (logs: "
                       f"{os.path.join(root, LOGS_DIR)}); rerun the command to resume them")
  return runs


def _finished_task(root: str, arm: str, seed: int, tiny: bool, overrides) -> bool:
  return finished(arm_config(arm, seed, tiny, overrides), arm_workdir(root, arm, seed))


def train_tasks(root: str, tasks, tiny: bool, overrides, claim: bool = False) -> None:
  """Trains each (arm, seed) in order (with `claim`, only those this process claims first),
  sharing the warm start's step-0 evaluation through `<root>/start_eval/`."""
  timings_path = os.path.join(root, TIMINGS_FILE)
  for arm, seed in tasks:
    if claim and not _claim(root, arm, seed):
      continue
    config = arm_config(arm, seed, tiny, overrides)
    wd = arm_workdir(root, arm, seed)
    _share_start_eval(config, wd, root)
    spent = run_arm(config, wd)
    _publish_start_eval(config, wd, root)
    if spent:
      _record_timing(timings_path, "arms", {f"{arm}/seed_{seed}": spent})


def _claim(root: str, arm: str, seed: int) -> bool:
  """True for the one process that creates the claim file of (arm, seed)."""
  path = os.path.join(root, CLAIMS_DIR, f"{arm}_seed_{seed}")
  try:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False


def _run_workers(root: str, tasks, tiny: bool, overrides, jobs: int) -> None:
  """`jobs` worker processes over `tasks`, with one progress bar of steps over all runs."""
  from mar.metrics import progress

  shutil.rmtree(os.path.join(root, CLAIMS_DIR), ignore_errors=True)  # claims of a killed suite
  os.makedirs(os.path.join(root, CLAIMS_DIR))
  os.makedirs(os.path.join(root, LOGS_DIR), exist_ok=True)
  argv = [sys.executable, "-m", "mar.tools.replicate", "--suite=miniature", f"--workdir={root}",
          "--worker", "--seeds=" + ",".join(str(s) for _, s in tasks),
          "--arms=" + ",".join(a for a, _ in tasks), f"--tiny={tiny}"]
  argv += [f"--set={o}" for o in overrides]
  procs = []
  for i in range(jobs):
    log = open(os.path.join(root, LOGS_DIR, f"worker_{i}.log"), "a", encoding="utf-8")
    procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
  total = {t: arm_config(*t, tiny, overrides).train.num_steps for t in tasks}
  bar = progress(sum(total.values()), desc=f"replicate[{jobs} jobs] steps", log_every=10)
  try:
    while any(p.poll() is None for p, _ in procs):
      time.sleep(5)
      bar.update(max(0, sum(_steps_done(arm_workdir(root, *t)) for t in tasks) - bar.n))
  finally:  # an interrupted suite stops its workers too (a rerun resumes them)
    for p, log in procs:
      if p.poll() is None:
        p.terminate()
        p.wait()
      log.close()
    bar.close()
  failed = [i for i, (p, _) in enumerate(procs) if p.returncode]
  if failed:
    raise RuntimeError(f"replicate: worker(s) {failed} failed; see "
                       f"{os.path.join(root, LOGS_DIR)}/worker_<i>.log")


def _steps_done(workdir: str) -> int:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if line.strip() and json.loads(line).get("step", 0) > 0)


def _record_timing(path: str, key: str, entry: dict) -> None:
  """Merges `entry` into timings.json[key] under a file lock: workers share the file. The
  1-minute load average at the time says how far other jobs inflated the wall clock."""
  with open(path + ".lock", "a", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    timings = _read_json(path)
    if key == "arms":
      entry = {name: {**t, "load_avg_1m": os.getloadavg()[0]} for name, t in entry.items()}
      timings.setdefault(key, {}).update(entry)
    elif key == "suite":
      timings.setdefault("suite_runs", []).append(entry)  # one per invocation (resumes)
    else:
      timings[key] = entry
    _write_json(path, timings)


def _start_eval_path(config, root: str) -> str:
  kind = "_".join(tuple(config.eval.kinds) + tuple(config.eval.benchmarks))
  return os.path.join(root, START_EVAL_DIR, f"{kind}.jsonl")


def _start_rows(workdir: str) -> list[dict]:
  path = report.eval_path(workdir)
  return ([r for r in report.read_eval_rows(path) if r["step"] == 0]
          if os.path.exists(path) else [])


def _share_start_eval(config, workdir: str, root: str) -> None:
  """Step 0 is the shared warm start under the same evaluation for every arm of a kind
  (greedy attempt curves; sampled ones with the step-0 PRNG keys), so it is evaluated once
  and its rows are copied into the other arms' eval.jsonl instead of being recomputed."""
  path = _start_eval_path(config, root)
  if os.path.exists(path) and not os.path.exists(report.eval_path(workdir)):
    report.append_eval_rows(workdir, report.read_eval_rows(path))
  if _start_rows(workdir):
    config.eval.at_start = False


def _publish_start_eval(config, workdir: str, root: str) -> None:
  """The first run of a kind to finish its step-0 evaluation publishes it (atomically)."""
  path, rows = _start_eval_path(config, root), _start_rows(workdir)
  if rows and not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def paper_commands(root: str, arms, seeds, ppo_model: str = "/ckpt/Qwen2.5-Math-1.5B",
                   lte_model: str = "/ckpt/Qwen3-8B-Base") -> list[str]:
  """One `python -m mar.main` per (arm, seed) of the paper configs, in the suite's layout."""
  out = []
  for arm in arms:
    path, variant = PAPER_CONFIGS[arm]
    spec = path + (f":{variant}" if variant else "")
    model = ppo_model if arm in compare.PPO_ARMS else lte_model
    for seed in seeds:
      out.append(" ".join([sys.executable, "-m", "mar.main", f"--config={spec}",
                           f"--config.model.path={shlex.quote(model)}",
                           f"--workdir={shlex.quote(arm_workdir(root, arm, seed))}",
                           f"--config.seed={seed}"]))
  return out


def existing_runs(root: str, arms, seeds) -> dict:
  """The finished workdirs under `root` (eval rows at the config.json's last step)."""
  runs: dict = {}
  for arm in arms:
    for seed in seeds:
      wd = arm_workdir(root, arm, seed)
      config = _read_json(os.path.join(wd, "config.json"))
      if config and finished(ml_collections.ConfigDict(config), wd):
        runs.setdefault(arm, {})[seed] = wd
  return runs


def write_report(root: str, runs: dict, suite: str) -> dict:
  rep = compare.build_report(runs, suite)
  timings = _read_json(os.path.join(root, TIMINGS_FILE))
  if timings:
    rep["timings_s"] = timings
  rep["figures"] = [os.path.relpath(p, root)
                    for p in compare.write_figures(rep, os.path.join(root, FIGURES_DIR))]
  _write_json(os.path.join(root, REPORT_FILE), rep)
  with open(os.path.join(root, SUMMARY_FILE), "w", encoding="utf-8") as f:
    f.write(compare.markdown(rep) + "\n\n" + summary(rep) + "\n")
  return rep


def summary(rep: dict) -> str:
  """A few lines: each arm's metric of record against the warm start, each claim's verdict."""
  lines = []
  for arm, a in rep.get("arms", {}).items():
    lo, hi = a["end_ci95"]
    lines.append(f"{arm}: {a['metric']} {100 * a['start']:.1f} -> {100 * a['end_mean']:.1f} % "
                 f"(95 % CI {100 * lo:.1f}..{100 * hi:.1f}; n={len(a['end'])}) "
                 f"{'above' if a['above_start'] else 'NOT above'} the warm start")
  for c in rep.get("claims", []):
    figures = {k: v for k, v in c.items() if k not in ("claim", "holds")}
    lines.append(f"{c['claim']}: {'HOLDS' if c['holds'] else 'DOES NOT HOLD'} "
                 f"{json.dumps(figures)}")
  return "\n".join(lines) or "no complete comparison (missing arms)"


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"  # one per process: suites may share the workdir
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, allow_nan=True)
  os.replace(tmp, path)


def main(argv):
  del argv
  root, seeds = _WORKDIR.value, [int(s) for s in _SEEDS.value]
  arms = list(_ARMS.value)
  known = compare.PPO_ARMS + compare.GROUP_ARMS
  bad = [a for a in arms if a not in known]
  if bad:
    raise app.UsageError(f"--arms: unknown {bad}; expected some of {known}")
  os.makedirs(root, exist_ok=True)
  if _COMPILE_CACHE.value:
    from mar import config_utils  # imports jax: after the flags are parsed

    config_utils.enable_compilation_cache()
  if _WORKER.value:
    train_tasks(root, list(zip(arms, seeds)), _TINY.value, _SET.value, claim=True)
    return
  if _SUITE.value == "miniature" and not _REPORT_ONLY.value:
    runs = run_miniature(root, arms, seeds, _TINY.value, _SET.value, _JOBS.value)
  else:
    if _SUITE.value == "paper":
      print("# paper-scale runs (accelerators; see launch/README.md), one per arm and seed:")
      print("\n".join(paper_commands(root, arms, seeds, _PPO_MODEL.value, _LTE_MODEL.value)))
    runs = existing_runs(root, arms, seeds)
    if not runs:
      print(f"# no finished runs under {root} yet; rerun this command when they are")
      return
  rep = write_report(root, runs, _SUITE.value)
  print(summary(rep))
  print(f"report: {os.path.join(root, REPORT_FILE)}; figures: {rep['figures']}")


if __name__ == "__main__":
  app.run(main)
