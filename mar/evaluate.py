"""Evaluation: accuracy vs number of attempts, Pass@1 / Pass@k, and rollout metrics.

Protocols (METHODS.md):
* attempts: for k = 1..K a SEPARATE greedy run whose prompt states k attempts (not a
  cumulative pass@k, so not monotone in k); accuracy = share of problems solved. Every
  model, the single-turn baseline included, is evaluated with the multi-attempt prompt.
  With `eval.attempt_samples` = m > 0 the same runs are also sampled m times per problem
  at the eval temperature ("sampled_attempts" rows: the mean over episodes, whose variance
  is m times smaller than one greedy decode's coin flips near a decision boundary).
* passk: n samples per problem (LTE: n = 16, T = 0.6, top-p 0.95) with the single-turn
  user prompt; Pass@1 = mean accuracy, Pass@k by the unbiased estimator.
* `eval.expected_accuracy`: the probability, by teacher forcing, that a response opens
  with the canonical correct answer `\boxed{answer}` (under each kind's prompt; k = 1):
  no sampling noise at all. It is the exact expected accuracy at the eval temperature
  (top-p 1) on a task whose only correct response is that one, as the synthetic tasks'
  warm start writes it; on free-form math it is a lower bound.
Rows go to `<workdir>/eval.jsonl`; a per-benchmark table is logged and plots are redrawn.
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mar.data import prompts, sources
from mar.evaluation import passk, report
from mar.lte import hints
from mar.rl import scoring


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
  data = sources.load_benchmark_from_config(name, config.data)
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
  """Greedy accuracy with k attempts for k = 1..K (one run per k, the prompt stating k),
  and its sampled twin when `eval.attempt_samples` > 0.

  The prompt is the multi-attempt one whatever the model was trained with (METHODS.md §1:
  the single-turn baseline's curve uses it too).
  """
  greedy = run.eval_runner(config, "attempts")
  # The longest prompt (stating K attempts) decides which problems fit.
  examples = _fitting(greedy, examples, _attempt_prompt(config.eval.max_attempts), benchmark)
  rows = []
  for k in range(1, config.eval.max_attempts + 1):
    acc = _attempt_accuracy(greedy, params, examples, k, 1, 0)
    rows.append(report.attempt_row(step, benchmark, k, acc, len(examples)))
  m = config.eval.attempt_samples
  for k in range(1, config.eval.max_attempts + 1) if m else ():
    acc = _attempt_accuracy(run.eval_runner(config, "sampled_attempts"), params, examples, k, m,
                            step)
    rows.append(report.metric_row(step, benchmark, report.SAMPLED_ATTEMPTS, k, acc,
                                  len(examples)))
  return rows


def _attempt_prompt(k: int):
  return lambda q: prompts.multi_attempt_prompt(q, k)


def _attempt_accuracy(runner, params, examples, k: int, copies: int, step: int) -> float:
  """Share of correct episodes over `copies` episodes per problem, the prompt stating k."""
  texts = [prompts.multi_attempt_prompt(ex.question, k) for ex in examples for _ in range(copies)]
  answers = [ex.answer for ex in examples for _ in range(copies)]
  # Greedy runs take key 0 (as before); sampled ones a key per (step, k).
  key = jax.random.fold_in(jax.random.PRNGKey(step), k) if copies > 1 else jax.random.PRNGKey(0)
  out = runner.run_host(params, texts, answers, key, n_attempts=[k] * len(texts))
  return float(out.correct.mean())


def passk_rows(config, run, params, examples, benchmark: str, step: int) -> list[dict]:
  """n samples per problem with the single-turn prompt -> Pass@k rows for config.eval.ks."""
  runner = run.eval_runner(config, "passk")
  examples = _fitting(runner, examples, _plain_prompt, benchmark)
  n = config.eval.num_samples
  texts = [_plain_prompt(ex.question) for ex in examples for _ in range(n)]
  answers = [ex.answer for ex in examples for _ in range(n)]
  out = runner.run_host(params, texts, answers, jax.random.PRNGKey(step))
  correct = out.correct.reshape(len(examples), n)
  return [report.passk_row(step, benchmark, k, passk.mean_pass_at_k(correct, k), len(examples))
          for k in config.eval.ks if k <= n]


def _plain_prompt(question: str) -> str:
  return hints.chat_prompt(hints.plain_prompt(question))


def expected_accuracy(config, run, params, examples, prompt_of) -> float:
  """Mean over problems of P(response opens with `\\boxed{answer}` | prompt), teacher
  forced at the eval temperature; fixed shapes (prompt_len + the longest answer, padded to
  8; eval.batch_size rows), so one program serves every step."""
  tok, rows = run.tokenizer, config.eval.batch_size
  seqs = [(tok.encode(prompt_of(ex.question)), tok.encode(f"\\boxed{{{ex.answer}}}"))
          for ex in examples]
  width = config.rollout.prompt_len + -(-max(len(a) for _, a in seqs) // 8) * 8
  score = _answer_logprob_fn(run.model_config, float(config.eval.temperature))
  total = []
  for lo in range(0, len(seqs), rows):
    tokens = np.full((rows, width), tok.pad_id, np.int32)
    valid = np.zeros((rows, width), bool)
    answer = np.zeros((rows, width), bool)
    for i, (p, a) in enumerate(seqs[lo:lo + rows]):
      tokens[i, :len(p) + len(a)] = p + a
      valid[i, :len(p) + len(a)] = True
      answer[i, len(p):len(p) + len(a)] = True
    logp = np.asarray(score(params, tokens, valid, answer))
    total += list(np.exp(logp[:len(seqs[lo:lo + rows])]))
  return float(np.mean(total))


@functools.lru_cache(maxsize=None)
def _answer_logprob_fn(model_config, temperature: float):
  @jax.jit
  def score(params, tokens, valid, answer):
    logp = scoring.token_logprobs(model_config, params, tokens, valid, temperature=temperature)
    return jnp.sum(jnp.where(answer, logp, 0.0), axis=1)

  return score


def expected_rows(config, run, params, examples, benchmark: str, step: int) -> list[dict]:
  """The expected accuracy under each configured kind's prompt (k = 1)."""
  rows = []
  for kind, prompt_of in (("attempts", _attempt_prompt(1)), ("passk", _plain_prompt)):
    if kind in config.eval.kinds:
      runner = run.eval_runner(config, kind)
      fit = _fitting(runner, examples, prompt_of, benchmark)
      value = expected_accuracy(config, run, params, fit, prompt_of)
      rows.append(report.metric_row(step, benchmark, report.EXPECTED_ACCURACY, 1, value,
                                    len(fit)))
  return rows


def scalars(rows) -> dict:
  """The evaluation's scalars for metrics.jsonl: `eval/expected_accuracy` (mean over its
  rows) when it was computed."""
  exp = [r["value"] for r in rows if report.row_kind(r) == report.EXPECTED_ACCURACY]
  return {"eval/expected_accuracy": float(np.mean(exp))} if exp else {}


def run_eval(config, run, params, workdir: str, step: int) -> list[dict]:
  """All configured evaluations at `step`; appends rows and logs the table (callers redraw
  the plots, after the step's metrics row)."""
  rows = []
  for name in config.eval.benchmarks:
    examples = _eval_examples(config, run, name)
    if "attempts" in config.eval.kinds:
      rows += attempt_curve(config, run, params, examples, name, step)
    if "passk" in config.eval.kinds:
      rows += passk_rows(config, run, params, examples, name, step)
    if config.eval.expected_accuracy:
      rows += expected_rows(config, run, params, examples, name, step)
  report.append_eval_rows(workdir, rows)
  logging.info("evaluation at step %d:\n%s", step,
               report.format_table(report.read_eval_rows(workdir), step))
  return rows


def _eval_examples(config, run, name: str):
  if name == "synthetic":
    from mar.data import synthetic

    return synthetic.examples_from_config(config.eval.synthetic)
  return _benchmark(config, name)
