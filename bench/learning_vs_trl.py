"""Learning parity: the miniature GRPO arm trained by mar and by TRL's GRPOTrainer (CPU).

  python bench/learning_vs_trl.py                      # seeds 0,1,2, the config's steps and eval
  python bench/learning_vs_trl.py --steps=2 --seeds=0 --eval_problems=8 --eval_samples=4 \\
      --out=/tmp/lvt.json                              # a check of the whole path (minutes)

The arm is `configs/miniature.py:grpo`, read at run time. Both trainers start from the same
warm-start folder (`mar.demo.ensure_demo_model`, from the cache), take the same prompts in
the same order (`train.batch_indices`, seeded by config.seed), as the same chat texts, with
the same G, learning rate and schedule, no KL, the config's steps, temperature and token
budget, and the same reward (mar's `\\boxed{}` extraction and `answers_match`). The settings
both share and every remaining difference are written to the JSON (`matching`).

Metric of record: Pass@1 from eval.num_samples samples per problem on eval.synthetic at the
eval temperature, computed by mar's evaluator (`evaluate.passk_rows`, one PRNG key for every
model) on each trained model loaded from its HF folder: mar's from `export.at_end` (f32),
TRL's from `save_pretrained`; also Pass@k at the config's largest k, the teacher-forced
expected accuracy when eval.expected_accuracy is on (no sampling noise), and the warm
start's values once. Writes `--out` (default bench/results/learning_vs_trl.json); TRL is a
bench-only dependency (`pip install trl`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MAR_NO_PROGRESS", "1")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import grpo_vs_trl as gvt  # noqa: E402  (TRL's dataset, policy and reward on mar's work)
from configs import miniature  # noqa: E402
from mar import config_utils, demo, evaluate, export, metrics, models, parallel  # noqa: E402
from mar import setup, train  # noqa: E402
from mar.data import synthetic  # noqa: E402
from mar.lte import hints  # noqa: E402
from mar.rl import optim  # noqa: E402

ARM = "grpo"
METRIC = "pass@1"
EXPECTED = "expected_accuracy"  # eval.expected_accuracy's teacher-forced P(correct), k = 1
DEFAULT_OUT = os.path.join(_HERE, "results", "learning_vs_trl.json")


def log(msg: str) -> None:
  print(f"[learning_vs_trl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
  """CPU time of this process and its reaped children: with wall time, what a run would take
  on a quiet machine when other jobs share the cores (between cpu_s / cores and cpu_s)."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def load_avg(label: str) -> list:
  return [label, *(round(x, 2) for x in os.getloadavg())]


def arm_config(seed: int, steps: int, model_path: str):
  """The arm on `model_path` (the warm start, loaded as any model folder) for `steps` steps;
  no evaluation during training (the bench evaluates every model the same way after)."""
  config = miniature.get_config(ARM)
  config.seed = seed
  config.train.num_steps = steps
  config.model.demo.enabled = False
  config.model.path = model_path
  config.eval.update(dict(at_start=False, at_end=False, every_steps=0))
  config.export.update(dict(at_end=True, dtype="float32"))
  check_matchable(config)
  return config


def check_matchable(config) -> None:
  """Settings the TRL side reproduces; any other value would make the comparison unfair."""
  g, want = config.grpo, dict(estimator="grpo", agg="token_mean", kl_coef=0.0, entropy_coef=0.0,
                              mini_batches=1, dynamic_sampling=False, overlong_buffer=0,
                              mask_truncated=False, tis_cap=0.0)
  bad = {k: g[k] for k, v in want.items() if g[k] != v}
  odd = config.method != "grpo" or config.rollout.stop_at_box or config.model.dtype != "float32"
  if odd or bad:
    raise ValueError(f"learning_vs_trl: TRL is matched to plain f32 GRPO run to EOS "
                     f"({want}, rollout.stop_at_box=False); the config has method="
                     f"{config.method!r}, stop_at_box={config.rollout.stop_at_box}, "
                     f"model.dtype={config.model.dtype!r}, {bad}")


def warmup_steps(config) -> int:
  """mar's warm-up length (optim.lr_schedule): ceil(warmup_ratio * steps)."""
  return int(math.ceil(config.optim.warmup_ratio * config.train.num_steps))


def mar_lrs(config) -> list[float]:
  sched = optim.lr_schedule(config.grpo.lr, config.train.num_steps, config.optim.warmup_ratio,
                            config.optim.min_lr_ratio)
  return [float(sched(s)) for s in range(config.train.num_steps)]


# ----- the two trainers --------------------------------------------------------------------


def train_mar(config, workdir: str) -> dict:
  """mar.train.train (what replicate runs) in a fresh workdir; the policy exported to hf/."""
  shutil.rmtree(workdir, ignore_errors=True)  # train() would resume from a checkpoint
  t0, c0 = time.perf_counter(), cpu_seconds()
  train.train(config, workdir)
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  rows = sorted((r for r in metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
                 if "reward_mean" in r), key=lambda r: r["step"])
  return {"per_step_reward": [float(r["reward_mean"]) for r in rows],
          "per_step_response_length": [float(r["response_length"]) for r in rows],
          "per_step_lr": mar_lrs(config),
          "train_s": wall, "train_cpu_s": cpu,
          "s_per_step_median": float(np.median([r["time/step"] for r in rows])),
          "model": os.path.join(workdir, "hf")}


def trl_args(config, out_dir: str):
  import trl  # pylint: disable=g-import-not-at-top

  g, r, o = config.grpo, config.rollout, config.optim
  return trl.GRPOConfig(
      output_dir=out_dir, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
      seed=config.seed, shuffle_dataset=False, max_steps=config.train.num_steps,
      logging_steps=1,
      # One generation of P x G sequences per step and one optimizer step over all of them.
      per_device_train_batch_size=r.prompts_per_step * g.group_size,
      num_generations=g.group_size, steps_per_generation=1, gradient_accumulation_steps=1,
      num_iterations=1,
      max_completion_length=r.token_budget, temperature=r.temperature, top_p=r.top_p,
      top_k=r.top_k,
      # mar's loss: group-std advantages, PPO clip, token mean over the batch, no KL.
      beta=g.kl_coef, scale_rewards="group", loss_type="bnpo", epsilon=g.clip_low,
      epsilon_high=g.clip_high, mask_truncated_completions=g.mask_truncated,
      # mar's optimizer: AdamW, global-norm clip, linear warm-up + cosine to min_lr_ratio.
      learning_rate=g.lr, lr_scheduler_type="cosine_with_min_lr",
      lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio}, warmup_steps=warmup_steps(config),
      adam_beta1=o.b1, adam_beta2=o.b2, adam_epsilon=1e-8, weight_decay=o.weight_decay,
      max_grad_norm=o.grad_clip if o.grad_clip is not None else 0.0)


def train_trl(config, run, model_path: str, workdir: str) -> dict:
  import datasets  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  shutil.rmtree(workdir, ignore_errors=True)
  records = gvt.trl_records(config, run, config.train.num_steps)
  hf_tok, model = gvt.hf_policy(model_path)
  seen = []  # the prompts of each reward call: one per step

  def answer_reward(prompts, completions, answer, **_):
    seen.append(list(prompts))
    return gvt.answer_reward(completions, answer)

  trainer = trl.GRPOTrainer(model=model, reward_funcs=answer_reward,
                            args=trl_args(config, os.path.join(workdir, "trainer")),
                            train_dataset=datasets.Dataset.from_list(records),
                            processing_class=hf_tok)
  lrs, step_s = [], []

  class Recorder(transformers.TrainerCallback):
    """The learning rate each optimizer step uses (read before it), and the step's time."""

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
      lrs.append(float(optimizer.param_groups[0]["lr"]))
      self.t0 = time.perf_counter()

    def on_step_end(self, *a, **kw):
      step_s.append(time.perf_counter() - self.t0)

  trainer.add_callback(Recorder())
  t0, c0 = time.perf_counter(), cpu_seconds()
  with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs
    trainer.train()
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  logs = sorted((h for h in trainer.state.log_history if "reward" in h), key=lambda h: h["step"])
  # TRL must have seen mar's groups in mar's order: step s = prompts s*P.. each G times in a row.
  p, g = config.rollout.prompts_per_step, config.grpo.group_size
  want = [[rec["prompt"] for rec in records[s * p:(s + 1) * p] for _ in range(g)]
          for s in range(config.train.num_steps)]
  if seen != want:
    raise RuntimeError("learning_vs_trl: TRL's prompts differ from mar's data order")
  out = os.path.join(workdir, "hf")
  trainer.model.save_pretrained(out)
  export.write_side_files(model_path, out)  # the warm start's tokenizer files, as mar's export
  return {"per_step_reward": [float(h["reward"]) for h in logs],
          "per_step_response_length": [float(h.get("completions/mean_length", np.nan))
                                       for h in logs],
          "per_step_lr": lrs, "train_s": wall, "train_cpu_s": cpu,
          "s_per_step_median": float(np.median(step_s)),
          "model": out}


# ----- the one evaluator -------------------------------------------------------------------


def plain_prompt(question: str) -> str:
  """The single-turn prompt passk_rows samples from."""
  return hints.chat_prompt(hints.plain_prompt(question))


class Evaluator:
  """mar's Pass@k (`evaluate.passk_rows`) of any model folder of the warm start's shape.

  One Run (built on the warm start) serves every model: its runner is compiled once and each
  folder's weights are loaded as `setup.build_run` loads `config.model.path`. Every model is
  scored with the same PRNG key (`key_step`), so the samples differ only by the weights.
  """

  def __init__(self, config, workdir: str, problems: int, samples: int, key_step: int):
    if samples:
      config.eval.num_samples = samples
    self.config, self.key_step = config, key_step
    self.run = setup.build_run(config, workdir)
    self.shape = models.QwenConfig.from_hf_dir(config.model.path)
    examples = synthetic.examples_from_config(config.eval.synthetic)
    self.examples = examples[:problems] if problems else examples

  def __call__(self, folder: str) -> dict:
    if models.QwenConfig.from_hf_dir(folder) != self.shape:
      raise ValueError(f"{folder}: config.json differs from the warm start's")
    t0, c0 = time.perf_counter(), cpu_seconds()
    _, params = models.load_hf(folder, dtype=jnp.float32, mesh=self.run.mesh,
                               rules=parallel.rules_from_config(self.config))
    rows = evaluate.passk_rows(self.config, self.run, params, self.examples, "synthetic",
                               self.key_step)
    out = {f"pass@{r['k']}": r["value"] for r in rows}
    if self.config.eval.expected_accuracy:  # the same quantity without sampling noise
      out[EXPECTED] = evaluate.expected_accuracy(self.config, self.run, params, self.examples,
                                                 plain_prompt)
    out["eval_s"], out["eval_cpu_s"] = time.perf_counter() - t0, cpu_seconds() - c0
    return out

  def close(self):
    self.run.close()


# ----- the bench ---------------------------------------------------------------------------


def summarize(side: dict, seeds, k_name: str) -> dict:
  final = {str(s): side["runs"][s]["eval"][METRIC] for s in seeds}
  final_k = {str(s): side["runs"][s]["eval"][k_name] for s in seeds}
  pick = lambda key: {str(s): side["runs"][s][key] for s in seeds}
  return {"per_step_reward": pick("per_step_reward"), "final": final,
          "final_mean": float(np.mean(list(final.values()))),
          "final_pass_at_k": final_k,
          "final_pass_at_k_mean": float(np.mean(list(final_k.values()))),
          "per_step_lr": pick("per_step_lr"),
          "per_step_response_length": pick("per_step_response_length"),
          "train_s": pick("train_s"), "train_cpu_s": pick("train_cpu_s"),
          "s_per_step_median": pick("s_per_step_median"),
          "eval_s": {str(s): side["runs"][s]["eval"]["eval_s"] for s in seeds},
          "eval_cpu_s": {str(s): side["runs"][s]["eval"]["eval_cpu_s"] for s in seeds},
          **_expected(side, seeds)}


def _expected(side: dict, seeds) -> dict:
  if EXPECTED not in side["runs"][seeds[0]]["eval"]:
    return {}
  final = {str(s): side["runs"][s]["eval"][EXPECTED] for s in seeds}
  return {"final_expected_accuracy": final,
          "final_expected_accuracy_mean": float(np.mean(list(final.values())))}


def matching(config) -> dict:
  g, r, o, e = config.grpo, config.rollout, config.optim, config.eval
  return {
      "same": [
          "warm start: one HF folder (mar.demo.ensure_demo_model), loaded by both",
          f"prompts: {r.prompts_per_step} per step in mar's data order (train.batch_indices, "
          "config.seed), the same chat texts (hints.chat_prompt(plain_prompt)); TRL's order is "
          "checked at run time against the prompts its reward function receives",
          f"G = {g.group_size}, one generation and one optimizer step per RL step over all "
          f"{r.prompts_per_step * g.group_size} sequences (TRL: num_iterations=1, "
          "steps_per_generation=1, no gradient accumulation): on-policy, ratio 1",
          f"sampling: temperature {r.temperature}, top_p {r.top_p}, top_k {r.top_k}, "
          f"{r.token_budget} new tokens, stop at <|im_end|> or <|endoftext|> (kept in the "
          "loss), truncated responses kept",
          "reward: 1 when the last \\boxed{} answer matches (mar's extract_boxed + "
          "answers_match), else 0; no length penalty",
          "advantage: (r - group mean) / (group std, ddof = 1, + eps); TRL scale_rewards=group",
          f"loss: clipped surrogate (eps {g.clip_low} / {g.clip_high}), token mean over all "
          "response tokens of the batch (mar agg=token_mean, TRL loss_type=bnpo), no KL "
          "(beta 0), no entropy term",
          f"optimizer: AdamW lr {g.lr}, b1 {o.b1}, b2 {o.b2}, eps 1e-8, weight decay "
          f"{o.weight_decay}, global-norm clip {o.grad_clip}; schedule: linear warm-up over "
          f"ceil({o.warmup_ratio} x steps) = {warmup_steps(config)} steps from 0, cosine to "
          f"{o.min_lr_ratio} x lr at the last step (TRL cosine_with_min_lr, the same formula; "
          "per_step_lr records both)",
          "precision: f32 weights and compute on the CPU",
          f"evaluation: mar's passk_rows on the same problems, {e.num_samples} samples, "
          f"T {e.temperature}, top_p {e.top_p}, one PRNG key for every model",
      ],
      "differences": [
          "samplers: mar's JAX engine vs transformers generate (torch RNG), so a seed number "
          "selects independent samples on the two sides, not the same ones",
          "advantage eps: mar 1e-6, TRL 1e-4 (only matters for near-zero group std, which "
          "binary rewards never give: the std is 0 or >= 0.35)",
          "mar skips an optimizer step whose gradient is non-finite; TRL does not",
          "grad clip: torch divides by (norm + 1e-6), optax by norm",
          "kernels: XLA (mar packs sequences into rows with segment ids) vs torch eager; "
          "the same math up to float rounding",
      ],
  }


def versions() -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  try:
    commit = subprocess.run(["git", "-C", _HERE, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = ""
  return {"python": platform.python_version(), "jax": jax.__version__, "trl": trl.__version__,
          "torch": torch.__version__, "transformers": transformers.__version__,
          "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
          "mar_commit": commit}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", default="0,1,2", help="RL seeds: config.seed (mar), seed (TRL)")
  ap.add_argument("--steps", type=int, default=0, help="RL steps (0: train.num_steps)")
  ap.add_argument("--eval_problems", type=int, default=0,
                  help="score the first N eval problems (0: all of eval.synthetic)")
  ap.add_argument("--eval_samples", type=int, default=0,
                  help="samples per problem (0: eval.num_samples)")
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mar_learning_vs_trl"))
  ap.add_argument("--out", default=DEFAULT_OUT)
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  t_start = time.perf_counter()
  loads = [load_avg("start")]
  config_utils.enable_compilation_cache()  # the seeds share every program

  base = miniature.get_config(ARM)
  steps = args.steps or base.train.num_steps
  warm = demo.ensure_demo_model(base, args.workdir)
  log(f"warm start {warm}; {len(seeds)} seeds x {steps} steps per trainer")

  # One Run on the warm start: the data order for TRL and the evaluator for every model.
  evaluator = Evaluator(arm_config(seeds[0], steps, warm), os.path.join(args.workdir, "eval"),
                        args.eval_problems, args.eval_samples, key_step=steps)
  ecfg = evaluator.config
  ks = [k for k in ecfg.eval.ks if k <= ecfg.eval.num_samples]
  k_name = f"pass@{max(ks)}"
  start = evaluator(warm)
  loads.append(load_avg("after start eval"))
  log(f"warm start: {METRIC} {start[METRIC]:.4f}, {k_name} {start[k_name]:.4f}, "
      f"{EXPECTED} {start.get(EXPECTED, float('nan')):.4f} "
      f"({len(evaluator.examples)} problems x {ecfg.eval.num_samples}, "
      f"eval {start['eval_s']:.1f} s)")

  sides = {"mar": {"runs": {}}, "trl": {"runs": {}}}
  for seed in seeds:
    config = arm_config(seed, steps, warm)
    for name in ("mar", "trl"):
      wd = os.path.join(args.workdir, name, f"seed_{seed}")
      if name == "mar":
        res = train_mar(config, wd)
      else:
        res = train_trl(config, evaluator.run, warm, wd)
      res["eval"] = evaluator(res["model"])
      sides[name]["runs"][seed] = res
      loads.append(load_avg(f"after {name} seed {seed}"))
      ev = res["eval"]
      log(f"{name} seed {seed}: {steps} steps in {res['train_s']:.1f} s, CPU "
          f"{res['train_cpu_s']:.1f} s (median {res['s_per_step_median']:.3f} s/step), reward "
          f"{res['per_step_reward'][0]:.3f} -> {res['per_step_reward'][-1]:.3f}; {METRIC} "
          f"{ev[METRIC]:.4f}, {k_name} {ev[k_name]:.4f}, {EXPECTED} "
          f"{ev.get(EXPECTED, float('nan')):.4f} (eval {ev['eval_s']:.1f} s, CPU "
          f"{ev['eval_cpu_s']:.1f} s); load {loads[-1][1]}")
  evaluator.close()

  result = {
      "config": {"name": f"configs/miniature.py:{ARM}", "steps": steps,
                 "prompts_per_step": ecfg.rollout.prompts_per_step,
                 "group_size": ecfg.grpo.group_size, "lr": ecfg.grpo.lr,
                 "warmup_steps": warmup_steps(ecfg),
                 "min_lr_ratio": ecfg.optim.min_lr_ratio, "grad_clip": ecfg.optim.grad_clip,
                 "temperature": ecfg.rollout.temperature, "token_budget": ecfg.rollout.token_budget,
                 "warm_start": warm,
                 "eval": {"problems": len(evaluator.examples), "num_samples": ecfg.eval.num_samples,
                          "temperature": ecfg.eval.temperature, "top_p": ecfg.eval.top_p,
                          "ks": ks, "key_step": steps, "synthetic": ecfg.eval.synthetic.to_dict()}},
      "seeds": seeds,
      "metric": METRIC,
      "k_metric": k_name,
      "start": start[METRIC],
      "start_pass_at_k": start[k_name],
      "start_expected_accuracy": start.get(EXPECTED),
      # The first evaluation compiles the evaluator's programs; the others reuse them.
      "start_eval_s": start["eval_s"], "start_eval_cpu_s": start["eval_cpu_s"],
      "mar": summarize(sides["mar"], seeds, k_name),
      "trl": summarize(sides["trl"], seeds, k_name),
  }
  trl_finals = list(result["trl"]["final"].values())
  result["trl"]["final_min"], result["trl"]["final_max"] = min(trl_finals), max(trl_finals)
  # "Within TRL's seed spread or above": mar's mean at least TRL's lowest seed.
  result["mar_within_or_above_trl"] = bool(result["mar"]["final_mean"] >= min(trl_finals))
  result["matching"] = matching(ecfg)
  loads.append(load_avg("end"))
  result["load_avg"] = loads
  result["wall_s"] = time.perf_counter() - t_start
  result["versions"] = versions()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(config_utils.to_jsonable(result), f, indent=1)
  log(f"mar {METRIC} mean {result['mar']['final_mean']:.4f} vs TRL "
      f"{[round(x, 4) for x in trl_finals]}: mar_within_or_above_trl="
      f"{result['mar_within_or_above_trl']}; {result['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
  main()
