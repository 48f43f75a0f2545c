"""Evaluation: accuracy vs number of attempts, Pass@1 / Pass@k, and rollout metrics.

Protocols (METHODS.md):
* attempts: for k = 1..K a SEPARATE greedy run whose prompt states k attempts (not a
  cumulative pass@k, so not monotone in k); accuracy = share of problems solved. Every
  model, the single-turn baseline included, is evaluated with the multi-attempt prompt.
* passk: n samples per problem (LTE: n = 16, T = 0.6, top-p 0.95) with the single-turn
  user prompt; Pass@1 = mean accuracy, Pass@k by the unbiased estimator.
Rows go to `<workdir>/eval.jsonl`; a per-benchmark table is logged and plots are redrawn.
"""

from __future__ import annotations

from absl import logging
import jax

from mar import plots
from mar.data import datasets, prompts
from mar.evaluation import passk, report
from mar.lte import hints


def episode_metrics(episodes, n: int) -> dict:
  """Per-step rollout metrics of a multi-attempt batch (first n real rows)."""
  ep = jax.device_get(episodes)
  correct_t = ep.correct_turn[:, :n]
  attempted_t = ep.attempted_turn[:, :n]
  resp = ep.action_mask[:n].sum(1)
  m = {
      "reward_mean": float(ep.reward[:n].mean()),
      "accuracy": float(correct_t.any(0).mean()),
      "attempts_used": float(ep.attempts_used[:n].mean()),
      "n_attempts": float(ep.n_attempts[:n].mean()),
      "boxed_frac": float(ep.boxed_turn[:, :n].any(0).mean()),
      "truncated_frac": float(ep.truncated[:n].mean()),
      "response_length": float(resp.mean()),
      "response_tokens_total": float(resp.sum()),
  }
  for t in range(correct_t.shape[0]):
    made = attempted_t[t].sum()
    m[f"success_at_attempt/{t + 1}"] = float(correct_t[t].sum() / made) if made else 0.0
  return m


def _benchmark(config, name: str):
  data = datasets.load_benchmark(name, config.data.dir)
  limit = config.eval.max_problems
  return data[:limit] if limit else data


def _fitting(runner, examples, prompt_of, benchmark: str):
  """Examples whose prompt fits the bucket; the rest are reported, not silently dropped."""
  keep = [ex for ex in examples if runner.fits(prompt_of(ex.question))]
  if len(keep) < len(examples):
    logging.warning("%s: %d of %d problems exceed rollout.prompt_len=%d tokens and are "
                    "not scored (raise config.rollout.prompt_len)", benchmark,
                    len(examples) - len(keep), len(examples), runner.prompt_len)
  return keep


def attempt_curve(config, run, params, examples, benchmark: str, step: int) -> list[dict]:
  """Greedy accuracy with k attempts for k = 1..K (one run per k, the prompt stating k).

  The prompt is the multi-attempt one whatever the model was trained with (METHODS.md §1:
  the single-turn baseline's curve uses it too).
  """
  runner = run.eval_runner(config, "attempts")
  examples = _fitting(runner, examples,
                      lambda q: prompts.multi_attempt_prompt(q, config.eval.max_attempts),
                      benchmark)
  rows = []
  questions = [ex.question for ex in examples]
  answers = [ex.answer for ex in examples]
  for k in range(1, config.eval.max_attempts + 1):
    texts = [prompts.multi_attempt_prompt(q, k) for q in questions]
    out = runner.run_host(params, texts, answers, jax.random.PRNGKey(0),
                          n_attempts=[k] * len(texts))
    rows.append(report.attempt_row(step, benchmark, k, float(out.correct.mean()), len(examples)))
  return rows


def passk_rows(config, run, params, examples, benchmark: str, step: int) -> list[dict]:
  """n samples per problem with the single-turn prompt -> Pass@k rows for config.eval.ks."""
  runner = run.eval_runner(config, "passk")
  examples = _fitting(runner, examples, lambda q: hints.chat_prompt(hints.plain_prompt(q)),
                      benchmark)
  n = config.eval.num_samples
  prompts = [hints.chat_prompt(hints.plain_prompt(ex.question)) for ex in examples for _ in range(n)]
  answers = [ex.answer for ex in examples for _ in range(n)]
  out = runner.run_host(params, prompts, answers, jax.random.PRNGKey(step))
  correct = out.correct.reshape(len(examples), n)
  return [report.passk_row(step, benchmark, k, passk.mean_pass_at_k(correct, k), len(examples))
          for k in config.eval.ks if k <= n]


def run_eval(config, run, params, workdir: str, step: int) -> list[dict]:
  """All configured evaluations at `step`; appends rows, logs the table, redraws plots."""
  rows = []
  for name in config.eval.benchmarks:
    examples = _eval_examples(config, run, name)
    if "attempts" in config.eval.kinds:
      rows += attempt_curve(config, run, params, examples, name, step)
    if "passk" in config.eval.kinds:
      rows += passk_rows(config, run, params, examples, name, step)
  report.append_eval_rows(workdir, rows)
  logging.info("evaluation at step %d:\n%s", step,
               report.format_table(report.read_eval_rows(workdir), step))
  plots.plot_all(workdir)
  return rows


def _eval_examples(config, run, name: str):
  if name == "synthetic":
    from mar.data import synthetic

    s = config.eval.synthetic
    return synthetic.make_arithmetic_examples(s.num_examples, s.seed, min_digits=s.min_digits,
                                              max_digits=s.max_digits)
  return _benchmark(config, name)
