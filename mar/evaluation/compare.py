"""The papers' comparisons from finished runs: report.json and its figures.

Input: `runs[arm][seed] = workdir` of runs made by mar.train (eval.jsonl, metrics.jsonl).
Two comparisons, whichever arms are present:

* multi-attempt paper — arms "multi_attempt" and "single_turn": greedy accuracy with k
  attempts (the multi-attempt prompt stating k) at the last evaluated step; the effect is
  the gain from k = 1 to k = 2 being larger for the multi-attempt-trained model;
* LTE paper — arms "grpo", "grpo_extra", "lte": none-pass groups per training step
  (metrics.jsonl `none_pass`, counted on the plain-prompt samples, before any hint), and
  Pass@1 / Pass@k at each evaluated step; the effect is LTE ending with fewer none-pass
  groups (mean of the last `tail` steps) and a higher Pass@k than GRPO.

Every number is given per seed and as mean / std / min / max over seeds; the figures draw
the mean with the min-max range shaded.

The judged report (`arms`, `claims`; configs/miniature.py's design) uses each arm's metric of
record, the low-variance one where the runs computed it: sampled accuracy with k = 1
(`sampled_attempts` rows) for the PPO arms, Pass@1 for the group arms. Per arm: the warm
start's value, the mean at the last step and its 95 % t-interval over seeds. Per claim: the
per-seed figures and Welch's 95 % interval of each difference of means; a claim holds when
every interval it needs excludes 0 in the claimed direction.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from scipy import stats
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mar.evaluation import report
from mar.metrics import METRICS_FILE, read_jsonl

PPO_ARMS = ("multi_attempt", "single_turn")
GROUP_ARMS = ("grpo", "grpo_extra", "lte")
LABELS = {"multi_attempt": "multi-attempt PPO", "single_turn": "single-turn PPO",
          "grpo": "GRPO", "grpo_extra": "GRPO + extra rollouts", "lte": "LTE"}
COLORS = {"multi_attempt": "C3", "single_turn": "C0", "grpo": "C0", "grpo_extra": "C2",
          "lte": "C3"}
FIGURES = {"attempts": "attempts_vs_k.png", "none_pass": "none_pass.png",
           "passk": "passk_curves.png"}


def spread(values: Sequence[float]) -> dict:
  """mean, std (population), min, max and n of per-seed values."""
  v = np.asarray(values, np.float64)
  if not v.size:
    return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
          "max": float(v.max()), "n": int(v.size)}


def interval95(values: Sequence[float]) -> list[float]:
  """The 95 % t-interval of the mean of `values` (n >= 2; else [nan, nan])."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return [float("nan")] * 2
  half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
  return [float(v.mean() - half), float(v.mean() + half)]


def difference95(a: Sequence[float], b: Sequence[float]) -> dict:
  """mean(a) - mean(b) with Welch's 95 % interval (unequal variances, independent seeds)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  diff = float(a.mean() - b.mean())
  if min(a.size, b.size) < 2:
    return {"difference": diff, "ci95": [float("nan")] * 2, "df": float("nan")}
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  se = np.sqrt(va + vb)
  if not se > 0:
    return {"difference": diff, "ci95": [diff, diff], "df": float("inf")}
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  half = stats.t.ppf(0.975, df) * se
  return {"difference": diff, "ci95": [float(diff - half), float(diff + half)], "df": float(df)}


def metric_curve(rows: Sequence[dict], metric: str, k: int) -> dict[int, float]:
  """{step: value} of one metric row kind at `k` (mean over benchmarks) in a run's rows."""
  by_step: dict[int, list[float]] = {}
  for r in rows:
    if report.row_kind(r) == metric and r["k"] == k:
      by_step.setdefault(r["step"], []).append(r["value"])
  return {s: float(np.mean(v)) for s, v in sorted(by_step.items())}


def _eval_rows(workdir: str) -> list[dict]:
  path = report.eval_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no eval.jsonl (has the run finished?)")
  return report.read_eval_rows(path)


def attempt_accuracy(workdir: str) -> dict:
  """{"steps": [first, last], "first": {k: acc}, "last": {k: acc}} averaged over benchmarks."""
  rows = [r for r in _eval_rows(workdir) if report.row_kind(r) == "attempts"]
  if not rows:
    raise ValueError(f"{report.eval_path(workdir)}: no accuracy-vs-attempts rows")
  steps = report.steps_of(rows)

  def at(step):
    by_k: dict[int, list[float]] = {}
    for r in rows:
      if r["step"] == step:
        by_k.setdefault(r["attempts"], []).append(r["accuracy"])
    return {k: float(np.mean(v)) for k, v in sorted(by_k.items())}

  return {"steps": [steps[0], steps[-1]], "first": at(steps[0]), "last": at(steps[-1])}


def group_curves(workdir: str) -> dict:
  """none-pass groups per step and Pass@1 / Pass@k (largest k) per evaluated step."""
  metrics = read_jsonl(os.path.join(workdir, METRICS_FILE))
  none_pass = {int(m["step"]): float(m["none_pass"]) for m in metrics if "none_pass" in m}
  if not none_pass:
    raise ValueError(f"{os.path.join(workdir, METRICS_FILE)}: no 'none_pass' metric")
  rows = [r for r in _eval_rows(workdir) if report.row_kind(r) == report.PASSK_METRIC]
  if not rows:
    raise ValueError(f"{report.eval_path(workdir)}: no pass@k rows")
  k_max = max(r["k"] for r in rows)
  curves: dict[str, dict[int, list[float]]] = {"pass@1": {}, "pass@k": {}}
  for r in rows:
    for name, k in (("pass@1", 1), ("pass@k", k_max)):
      if r["k"] == k:
        curves[name].setdefault(r["step"], []).append(r["value"])
  out = {name: {s: float(np.mean(v)) for s, v in sorted(c.items())} for name, c in curves.items()}
  return {"k": k_max, "none_pass": dict(sorted(none_pass.items())), **out}


def _last(curve: Mapping[int, float]) -> float:
  return curve[max(curve)]


def _tail_mean(curve: Mapping[int, float], tail: int) -> float:
  steps = sorted(curve)[-tail:]
  return float(np.mean([curve[s] for s in steps]))


def multi_attempt_comparison(runs: Mapping[str, Mapping[int, str]]) -> dict:
  """Accuracy vs k per arm and seed, the k=1->2 gains and whether the paper's effect shows."""
  out: dict = {"arms": {}}
  for arm in PPO_ARMS:
    if arm not in runs:
      continue
    seeds = {}
    for seed, wd in sorted(runs[arm].items()):
      acc = attempt_accuracy(wd)
      last = acc["last"]
      seeds[str(seed)] = {**acc, "gain_1_to_2": last.get(2, np.nan) - last.get(1, np.nan)}
      rows = _eval_rows(wd)
      sampled = {k: metric_curve(rows, report.SAMPLED_ATTEMPTS, k) for k in (1, 2)}
      if all(sampled.values()):  # the low-variance twin, when the runs computed it
        seeds[str(seed)].update({
            "sampled_first": {k: c[min(c)] for k, c in sampled.items()},
            "sampled_last": {k: c[max(c)] for k, c in sampled.items()},
            "sampled_gain_1_to_2": sampled[2][max(sampled[2])] - sampled[1][max(sampled[1])]})
    ks = sorted({k for s in seeds.values() for k in s["last"]})
    out["arms"][arm] = {
        "seeds": seeds,
        "accuracy": {str(k): spread([s["last"][k] for s in seeds.values() if k in s["last"]])
                     for k in ks},
        "accuracy_before": {str(k): spread([s["first"][k] for s in seeds.values()
                                            if k in s["first"]]) for k in ks},
        "gain_1_to_2": spread([s["gain_1_to_2"] for s in seeds.values()]),
        "sampled_gain_1_to_2": spread([s["sampled_gain_1_to_2"] for s in seeds.values()
                                       if "sampled_gain_1_to_2" in s]),
    }
  arms = out["arms"]
  if all(a in arms for a in PPO_ARMS):
    ma, st = arms["multi_attempt"], arms["single_turn"]
    common = sorted(set(ma["seeds"]) & set(st["seeds"]))
    wins = [ma["seeds"][s]["gain_1_to_2"] > st["seeds"][s]["gain_1_to_2"] for s in common]
    out["effect"] = {
        "claim": "multi-attempt-trained gain k=1->2 exceeds single-turn-trained gain",
        "multi_attempt_gain": ma["gain_1_to_2"]["mean"],
        "single_turn_gain": st["gain_1_to_2"]["mean"],
        "seeds_where_it_holds": f"{sum(wins)}/{len(wins)}",
        "holds": bool(ma["gain_1_to_2"]["mean"] > st["gain_1_to_2"]["mean"]),
    }
  return out


def lte_comparison(runs: Mapping[str, Mapping[int, str]], tail: int = 5) -> dict:
  """none-pass / Pass@1 / Pass@k per arm and seed, and whether LTE beats GRPO on both."""
  out: dict = {"tail_steps": tail, "arms": {}}
  for arm in GROUP_ARMS:
    if arm not in runs:
      continue
    seeds = {}
    for seed, wd in sorted(runs[arm].items()):
      c = group_curves(wd)
      seeds[str(seed)] = {**c, "final_none_pass": _tail_mean(c["none_pass"], tail),
                          "final_pass@1": _last(c["pass@1"]), "final_pass@k": _last(c["pass@k"]),
                          "first_pass@1": c["pass@1"][min(c["pass@1"])],
                          "first_pass@k": c["pass@k"][min(c["pass@k"])]}
    out["arms"][arm] = {"seeds": seeds, **{
        key: spread([s[key] for s in seeds.values()])
        for key in ("final_none_pass", "final_pass@1", "final_pass@k", "first_pass@1",
                    "first_pass@k")}}
  arms = out["arms"]
  if "lte" in arms and "grpo" in arms:
    lte, grpo = arms["lte"], arms["grpo"]
    common = sorted(set(lte["seeds"]) & set(grpo["seeds"]))
    fewer = [lte["seeds"][s]["final_none_pass"] < grpo["seeds"][s]["final_none_pass"]
             for s in common]
    higher = [lte["seeds"][s]["final_pass@k"] > grpo["seeds"][s]["final_pass@k"] for s in common]
    out["effect"] = {
        "claim": "LTE ends with fewer none-pass groups and a higher Pass@k than GRPO",
        "none_pass": {a: arms[a]["final_none_pass"]["mean"] for a in arms},
        "pass@1": {a: arms[a]["final_pass@1"]["mean"] for a in arms},
        "pass@k": {a: arms[a]["final_pass@k"]["mean"] for a in arms},
        "seeds_fewer_none_pass": f"{sum(fewer)}/{len(fewer)}",
        "seeds_higher_pass@k": f"{sum(higher)}/{len(higher)}",
        "holds": bool(lte["final_none_pass"]["mean"] < grpo["final_none_pass"]["mean"]
                      and lte["final_pass@k"]["mean"] > grpo["final_pass@k"]["mean"]),
    }
  return out


def record_metric(arm: str, workdir: str) -> tuple[str, dict[int, float]]:
  """An arm's metric of record and its curve: sampled accuracy at k = 1 (else greedy) for
  the PPO arms, Pass@1 for the group arms."""
  rows = _eval_rows(workdir)
  if arm in GROUP_ARMS:
    return "pass@1", metric_curve(rows, report.PASSK_METRIC, 1)
  sampled = metric_curve(rows, report.SAMPLED_ATTEMPTS, 1)
  if sampled:
    return "sampled_att@1", sampled
  return "att@1", {r["step"]: r["accuracy"] for r in rows
                   if report.row_kind(r) == "attempts" and r["attempts"] == 1}


def judged_arms(runs: Mapping[str, Mapping[int, str]]) -> dict:
  """{arm: {"metric", "start", "end_mean", "end_ci95", "end", "above_start"}}: the last
  evaluated step's metric of record per seed against the warm start's (step 0)."""
  out = {}
  for arm, seeds in runs.items():
    curves = {str(s): record_metric(arm, wd) for s, wd in sorted(seeds.items())}
    name = next(iter(curves.values()))[0]
    ends = {s: c[max(c)] for s, (_, c) in curves.items()}
    starts = [c[min(c)] for _, c in curves.values() if min(c) == 0]
    ci = interval95(list(ends.values()))
    start = float(np.mean(starts)) if starts else float("nan")
    out[arm] = {"metric": name, "start": start, "end_mean": float(np.mean(list(ends.values()))),
                "end_ci95": ci, "end": ends, "above_start": bool(ci[0] > start)}
  return out


def _per_seed(arm: dict, key: str) -> list:
  return [s[key] for s in arm["seeds"].values()]


def judged_claims(ma: dict, lte: dict) -> list[dict]:
  """The papers' two claims, each tested across seeds (module docstring)."""
  claims = []
  arms = ma.get("arms", {})
  if all(a in arms for a in PPO_ARMS):
    sampled = all("sampled_gain_1_to_2" in s for a in PPO_ARMS for s in arms[a]["seeds"].values())
    key = "sampled_gain_1_to_2" if sampled else "gain_1_to_2"
    gains = {a: _per_seed(arms[a], key) for a in PPO_ARMS}
    d = difference95(gains["multi_attempt"], gains["single_turn"])
    claims.append({
        "claim": "(a) multi-attempt PPO's gain from k = 1 to k = 2 exceeds single-turn PPO's",
        "metric": f"{'sampled' if sampled else 'greedy'} accuracy gain k=1->2",
        "gains": gains, **d, "holds": bool(d["ci95"][0] > 0)})
  arms = lte.get("arms", {})
  if all(a in arms for a in GROUP_ARMS):
    tests = {f"{name}: lte - {other}": difference95(_per_seed(arms["lte"], key),
                                                    _per_seed(arms[other], key))
             for other in ("grpo", "grpo_extra")
             for name, key in (("none_pass", "final_none_pass"), ("pass@k", "final_pass@k"))}
    holds = {name: (t["ci95"][1] < 0 if name.startswith("none_pass") else t["ci95"][0] > 0)
             for name, t in tests.items()}
    k = next(iter(arms["lte"]["seeds"].values()))["k"]
    claims.append({
        "claim": f"(b) LTE leaves fewer none-pass groups, and reaches a higher Pass@{k}, than "
                 "GRPO and than GRPO + extra rollouts",
        "none_pass_tail_steps": lte["tail_steps"], "tests": tests, "each_holds": holds,
        "holds": bool(all(holds.values()))})
  return claims


def build_report(runs: Mapping[str, Mapping[int, str]], suite: str,
                 tail: int | None = None) -> dict:
  """The whole report (JSON-ready): both comparisons, the judged arms and claims, and the
  runs they were read from. `tail`: none-pass steps averaged (default: the last quarter)."""
  if tail is None:
    tail = max(5, _steps_trained(runs) // 4)
  ma, lte = multi_attempt_comparison(runs), lte_comparison(runs, tail)
  return {"suite": suite,
          "runs": {a: {str(s): wd for s, wd in sorted(r.items())} for a, r in runs.items()},
          "arms": judged_arms(runs), "claims": judged_claims(ma, lte),
          "multi_attempt": ma, "lte": lte}


def _steps_trained(runs) -> int:
  """The last evaluated step of any run (0 if none)."""
  steps = [report.steps_of(_eval_rows(wd))[-1] for seeds in runs.values() for wd in
           seeds.values()]
  return max(steps, default=0)


# ----- figures -------------------------------------------------------------------------------


def _figure(ncols: int):
  fig = Figure(figsize=(max(6.0, 4.6 * ncols), 3.8), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _band(ax, xs, per_seed: list[list[float]], label: str, color: str, scale: float = 100.0,
          **style):
  """Mean over seeds as a line, min-max over seeds shaded (fractions drawn as percent)."""
  y = scale * np.asarray(per_seed, np.float64)
  ax.plot(xs, y.mean(0), color=color, label=f"{label} (n={len(per_seed)})", **style)
  if len(per_seed) > 1:
    ax.fill_between(xs, y.min(0), y.max(0), color=color, alpha=0.18, linewidth=0)


def plot_attempts(comparison: dict, out_path: str) -> str | None:
  """Accuracy vs k after training per arm, the warm start dashed: the sampled curve (the
  metric of record) beside the greedy one when the runs computed it."""
  arms = comparison.get("arms", {})
  if not arms:
    return None
  panels = [("", "greedy accuracy (%)")]
  if all("sampled_last" in s for a in arms.values() for s in a["seeds"].values()):
    panels.insert(0, ("sampled_", "sampled accuracy (%), 16 episodes per problem"))
  fig, axes = _figure(len(panels))
  for ax, (prefix, ylabel) in zip(axes, panels):
    for i, (arm, a) in enumerate(arms.items()):
      seeds = list(a["seeds"].values())
      ks = sorted(seeds[0][prefix + "last"])
      _band(ax, ks, [[s[prefix + "last"][k] for k in ks] for s in seeds],
            f"{LABELS[arm]}, trained", COLORS[arm], marker="o", linewidth=2.2)
      if i == 0:  # the shared starting model, once
        _band(ax, ks, [[s[prefix + "first"][k] for k in ks] for s in seeds],
              "warm start (step 0)", "0.45", marker="o", linestyle="--", linewidth=1.3)
    ax.set_xlabel("attempts allowed k (prompt states k)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.suptitle("Accuracy vs attempts: mean over seeds, min-max shaded")
  return _save(fig, out_path)


def _aligned(seeds: list[dict], key: str):
  steps = sorted(set.intersection(*[set(s[key]) for s in seeds]))
  return steps, [[s[key][t] for t in steps] for s in seeds]


def plot_none_pass(comparison: dict, out_path: str) -> str | None:
  arms = comparison.get("arms", {})
  if not arms:
    return None
  fig, (ax,) = _figure(1)
  for arm, a in arms.items():
    steps, ys = _aligned(list(a["seeds"].values()), "none_pass")
    _band(ax, steps, ys, LABELS[arm], COLORS[arm], scale=1.0, linewidth=1.8)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("training step")
  ax.set_ylabel("none-pass groups (plain prompt)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.suptitle("None-pass groups per step: mean over seeds, min-max shaded")
  return _save(fig, out_path)


def plot_passk_curves(comparison: dict, out_path: str) -> str | None:
  arms = comparison.get("arms", {})
  if not arms:
    return None
  fig, axes = _figure(2)
  k = next(iter(next(iter(arms.values()))["seeds"].values()))["k"]
  for ax, key, title in zip(axes, ("pass@1", "pass@k"), ("Pass@1", f"Pass@{k}")):
    for arm, a in arms.items():
      steps, ys = _aligned(list(a["seeds"].values()), key)
      _band(ax, steps, ys, LABELS[arm], COLORS[arm], marker="o", linewidth=1.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{title} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.suptitle("Pass@1 / Pass@k during training: mean over seeds, min-max shaded")
  return _save(fig, out_path)


def _save(fig: Figure, out_path: str) -> str:
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  fig.savefig(out_path, format="png", dpi=110)
  return out_path


def write_figures(rep: dict, out_dir: str) -> list[str]:
  """The three PNGs (those whose arms are present) under `out_dir`; returns their paths."""
  written = [plot_attempts(rep["multi_attempt"], os.path.join(out_dir, FIGURES["attempts"])),
             plot_none_pass(rep["lte"], os.path.join(out_dir, FIGURES["none_pass"])),
             plot_passk_curves(rep["lte"], os.path.join(out_dir, FIGURES["passk"]))]
  return [p for p in written if p]


# ----- a markdown summary beside the papers' numbers -----------------------------------------

# METHODS.md: greedy accuracy (%) with k attempts, mean of 5 benchmarks; Pass@1 / Pass@k (%)
# of Qwen3-8B-Base, mean of 6 benchmarks.
PAPER_ATTEMPTS = {"multi_attempt": {1: 45.6, 2: 52.5, 4: 53.8}, "single_turn": {1: 42.3, 2: 43.2}}
PAPER_PASS = {"grpo": (43.99, 56.82), "grpo_extra": (41.72, None), "lte": (49.01, 66.78)}


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
  if not s or s.get("mean") is None:
    return "-"
  return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def judged_markdown(rep: dict) -> str:
  """The metric of record per arm (warm start -> end, 95 % interval) and each claim."""
  arms = rep.get("arms", {})
  if not arms:
    return ""
  out = ["| arm | metric of record | warm start | end: mean over seeds (95 % CI) | seeds "
         "| above the warm start |", "|---|---|---|---|---|---|"]
  for arm, a in arms.items():
    lo, hi = a["end_ci95"]
    out.append(f"| {LABELS[arm]} | {a['metric']} | {100 * a['start']:.1f} | "
               f"{100 * a['end_mean']:.1f} ({100 * lo:.1f} .. {100 * hi:.1f}) | {len(a['end'])}"
               f" | {'yes' if a['above_start'] else 'no'} |")
  for c in rep.get("claims", []):
    out += ["", f"**{c['claim']}: {'holds' if c['holds'] else 'does not hold'}.**"]
    tests = c.get("tests") or {c["metric"]: c}
    for name, t in tests.items():
      lo, hi = t["ci95"]
      out.append(f"- {name}: difference {t['difference']:+.4f} (95 % CI {lo:+.4f} .. {hi:+.4f})")
  return "\n".join(out)


def markdown(rep: dict) -> str:
  """Both comparisons as markdown tables (mean ± std over seeds), the papers' rows beside."""
  out = [judged_markdown(rep), ""] if rep.get("arms") else []
  ma = rep["multi_attempt"].get("arms", {})
  if ma:
    ks = sorted({int(k) for a in ma.values() for k in a["accuracy"]})
    out.append("| accuracy (%) with k attempts | seeds | " + " | ".join(f"k={k}" for k in ks)
               + " | gain k=1→2 |")
    out.append("|---" * (len(ks) + 3) + "|")
    first = next(iter(ma.values()))
    out.append("| warm start (step 0) | - | " + " | ".join(
        _pm(first["accuracy_before"].get(str(k))) for k in ks) + " | - |")
    for arm, a in ma.items():
      out.append(f"| {LABELS[arm]}, trained | {a['gain_1_to_2']['n']} | " + " | ".join(
          _pm(a["accuracy"].get(str(k))) for k in ks) + f" | {_pm(a['gain_1_to_2'])} |")
    for arm, paper in PAPER_ATTEMPTS.items():
      gain = f"{paper[2] - paper[1]:+.1f}"
      out.append(f"| paper: {LABELS[arm]} | - | " + " | ".join(
          f"{paper[k]}" if k in paper else "-" for k in ks) + f" | {gain} |")
  lte = rep["lte"].get("arms", {})
  if lte:
    k = next(iter(next(iter(lte.values()))["seeds"].values()))["k"]
    tail = rep["lte"]["tail_steps"]
    out += ["", f"| method | seeds | none-pass groups (last {tail} steps) | Pass@1 (%) "
            f"| Pass@{k} (%) | Pass@1 / Pass@{k} at step 0 |", "|---|---|---|---|---|---|"]
    for arm, a in lte.items():
      out.append(f"| {LABELS[arm]} | {a['final_pass@1']['n']} | "
                 f"{_pm(a['final_none_pass'], 1.0)} | {_pm(a['final_pass@1'])} | "
                 f"{_pm(a['final_pass@k'])} | {_pm(a['first_pass@1'])} / {_pm(a['first_pass@k'])} |")
    for arm, (p1, pk) in PAPER_PASS.items():
      out.append(f"| paper: {LABELS[arm]} | - | - | {p1} | {f'{pk} (k=16)' if pk else '-'} | - |")
  return "\n".join(out)
