"""The embedded demo's model: a tiny Qwen3 + tokenizer, warm-started on synthetic dialogues.

`ensure_demo_model` builds an HF-format folder with a byte-level BPE tokenizer and a 2-layer
Qwen3, trained briefly with supervised learning on arithmetic dialogues in the exact
METHODS.md format. Styles (`model.demo.style`): "multi_attempt" / "single_turn" / "lte" teach
a "careless first guess" habit that RL must unlearn (configs/demo.py); "neutral"
(configs/miniature.py) only ever targets the correct answer, under every prompt the suite's
arms use, so it favours no method. Everything after it (rollout, verifier, PPO/GRPO,
checkpoints, evaluation) is the real pipeline, loading this folder like any checkpoint.

The folder is built once per (warm-start config, seed) into a cache shared by runs, tests and
mar.tools.replicate: `$MAR_CACHE/demo_models/<key>` (default `~/.cache/mar`), written to a
temporary directory and renamed into place, with a sha256 manifest checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mar import config_utils
from mar import models
from mar.data import prompts, synthetic
from mar.data.tiny_tokenizer import build_tiny_tokenizer
from mar.data.tokenizer import Tokenizer
from mar.lte import hints
from mar.metrics import progress
from mar.rl import optim, scoring
from mar.rl.update import make_update_step


def demo_model_config(vocab_size: int) -> models.QwenConfig:
  return models.QwenConfig(
      model_type="qwen3", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0,
      tie_word_embeddings=True, max_position_embeddings=512)


def _attempt(answer) -> str:
  return f"\\boxed{{{answer}}}"


def _wrong(answer: int, rng: np.random.Generator, deltas) -> int:
  return answer + int(rng.choice(list(deltas)))


def _neutral_dialogue(tok: Tokenizer, ex, n_attempts: int, show_wrong: bool, rng, deltas):
  """A dialogue whose only target is the correct answer, under one of the suite's prompts.

  The prompt is drawn uniformly from: multi-attempt (stating `n_attempts`), single-turn,
  LTE plain, LTE hint. With `show_wrong`, a wrong answer appears as context only (never a
  target): as a failed first attempt plus the feedback turn (multi-attempt, n >= 2) or in
  the hint's list (LTE hint), so the model learns to read either signal as an instruction
  ("not this one") without being taught to make errors or how to fix them.
  """
  # The answer closes the turn, so rollouts that run to EOS (GRPO / LTE) end there too.
  wrong, answer = str(_wrong(int(ex.answer), rng, deltas)), _attempt(ex.answer) + prompts.IM_END
  kind = int(rng.integers(4))
  if kind == 0:
    pieces = [(tok.encode(prompts.multi_attempt_prompt(ex.question, n_attempts)), False)]
    if show_wrong and n_attempts > 1:
      pieces += [(tok.encode(_attempt(wrong)), False),
                 (tok.encode(prompts.feedback_text(n_attempts - 1)), False)]
  elif kind == 1:
    pieces = [(tok.encode(prompts.single_turn_prompt(ex.question)), False)]
  elif kind == 2 or not show_wrong:
    pieces = [(tok.encode(hints.chat_prompt(hints.plain_prompt(ex.question))), False)]
  else:
    user = hints.hint_prompt(ex.question, [wrong], [False])
    pieces = [(tok.encode(hints.chat_prompt(user)), False)]
  return pieces + [(tok.encode(answer), True)]


def sft_dialogue(tok: Tokenizer, ex, n_attempts: int, first_wrong: bool, rng, style: str,
                 deltas=(1,)):
  """Token ids and loss mask of one warm-start dialogue."""
  if style == "neutral":
    return _neutral_dialogue(tok, ex, n_attempts, first_wrong, rng, deltas)
  if style == "lte":
    # Half the dialogues show a hint naming the habitual wrong answer, answered correctly:
    # the rule LTE's hinted re-sampling can then discover and distil into the plain prompt.
    wrong = _wrong(int(ex.answer), rng, deltas)
    if rng.random() < 0.5:
      user, answer = hints.hint_prompt(ex.question, [str(wrong)], [False]), ex.answer
    else:
      user, answer = hints.plain_prompt(ex.question), wrong if first_wrong else ex.answer
    # The response ends with a trained EOS: LTE rollouts run to it (rollout.stop_at_box=False).
    return [(tok.encode(hints.chat_prompt(user)), False),
            (tok.encode(_attempt(answer) + prompts.IM_END), True)]
  prompt = (prompts.multi_attempt_prompt(ex.question, n_attempts) if style == "multi_attempt"
            else prompts.single_turn_prompt(ex.question))
  pieces = [(tok.encode(prompt), False)]
  if first_wrong:
    pieces.append((tok.encode(_attempt(_wrong(int(ex.answer), rng, deltas))), True))
    if n_attempts == 1:
      return pieces
    pieces.append((tok.encode(prompts.feedback_text(n_attempts - 1)), False))
  pieces.append((tok.encode(_attempt(ex.answer)), True))
  return pieces


def _pack(dialogues, length: int, pad_id: int):
  n = len(dialogues)
  tokens = np.full((n, length), pad_id, np.int32)
  valid = np.zeros((n, length), bool)
  target = np.zeros((n, length), bool)
  for i, pieces in enumerate(dialogues):
    at = 0
    for ids, is_target in pieces:
      ids = ids[: max(0, length - at)]
      tokens[i, at:at + len(ids)] = ids
      valid[i, at:at + len(ids)] = True
      target[i, at:at + len(ids)] = is_target
      at += len(ids)
  return tokens, valid, target


def sft_batch(tok, examples, max_attempts, p_wrong, seed, length, style, deltas=(1,)):
  rng = np.random.default_rng(seed)
  dialogues = [
      sft_dialogue(tok, ex, int(rng.integers(1, max_attempts + 1)), rng.random() < p_wrong,
                   rng, style, deltas) for ex in examples]
  return _pack(dialogues, length, tok.pad_id)


# The warm start's loss is read back every this many steps: in between, the host builds the
# next batch while the device runs the current step.
_LOSS_EVERY = 20


def warm_start(cfg, params, tok, config, seed: int):
  """A few hundred supervised steps (Adam) on freshly generated dialogues."""
  d = config.model.demo
  loss_fn = lambda p, mb: _sft_loss(cfg, p, mb)
  opt = optim.make_optimizer(d.sft_lr, d.sft_steps, warmup_ratio=0.05, b2=0.98)
  update = jax.jit(make_update_step(loss_fn, opt), donate_argnums=(0, 1))
  opt_state = opt.init(params)
  bar = progress(d.sft_steps, desc="demo warm start")
  for step in range(d.sft_steps):
    exs = synthetic.examples_from_config(config.data.synthetic, d.sft_batch, seed + 1000 + step)
    tokens, valid, target = sft_batch(tok, exs, _sft_attempts(config), d.p_wrong,
                                      seed + step, d.sft_len, d.style, tuple(d.wrong_deltas))
    params, opt_state, m = update(params, opt_state,
                                  {"tokens": tokens, "valid": valid, "target": target})
    bar.update(1)
    if step % _LOSS_EVERY == _LOSS_EVERY - 1:  # reading it waits for the step
      bar.set_postfix(loss=float(m["loss"]))
  bar.close()
  return params


def _sft_loss(cfg, params, mb):
  logp = scoring.token_logprobs(cfg, params, mb["tokens"], mb["valid"])
  mask = mb["target"].astype(jnp.float32)
  loss = -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, {"loss": loss}


def _sft_attempts(config) -> int:
  """Most attempts a warm-start dialogue states: `model.demo.sft_attempts`, else M."""
  return config.model.demo.get("sft_attempts", config.rollout.max_attempts)


def _warm_start_seed(config) -> int:
  """`model.demo.seed` pins the warm start when the RL seed (`config.seed`) varies."""
  return config.model.demo.get("seed", config.seed)


def warm_start_key(config) -> str:
  """Hash of everything the demo folder depends on: warm-start config, task, M, seed, and
  the numerics that build it (`numerics_key`)."""
  d = config.model.demo.to_dict() if hasattr(config.model.demo, "to_dict") else dict(config.model.demo)
  s = config.data.synthetic
  spec = {"version": _CACHE_VERSION, "demo": d, "attempts": _sft_attempts(config),
          "seed": _warm_start_seed(config), "numerics": numerics_key(),
          "task": {k: s.get(k) for k in ("min_digits", "max_digits", "num_operands", "ops")}}
  return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def numerics_key() -> dict:
  """What changes the warm start's floats for a fixed config: a build is bit-for-bit
  repeatable on the same backend, jax version, XLA flags and CPU thread count, but XLA:CPU
  splits its matmuls' sums by the threads it has, so 200 SFT steps on 1 thread and on 2
  end on different weights (a different step-0 accuracy). The cache key covers them all."""
  import jaxlib

  key = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
         "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if key["backend"] == "cpu":
    key["cpu_threads"] = len(os.sched_getaffinity(0))
  return key


_CACHE_VERSION = 1  # bump when the warm start's code changes what it builds
_MANIFEST = "manifest.json"


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _write_manifest(path: str, key: str) -> None:
  files = {n: _sha256(os.path.join(path, n)) for n in sorted(os.listdir(path)) if n != _MANIFEST}
  with open(os.path.join(path, _MANIFEST), "w", encoding="utf-8") as f:
    json.dump({"key": key, "files": files}, f, indent=1)


def verify_cached(path: str, key: str) -> bool:
  """True when `path` holds the manifest of `key` and every file matches its hash."""
  try:
    with open(os.path.join(path, _MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
    files = manifest["files"]
    return (manifest["key"] == key and "model.safetensors" in files
            and all(_sha256(os.path.join(path, n)) == h for n, h in files.items()))
  except (OSError, ValueError, KeyError, TypeError):
    return False


def build_demo_model(config, path: str) -> None:
  """Tokenizer + warm-started tiny Qwen3 written to `path` (an existing empty folder)."""
  s = config.data.synthetic
  corpus = [prompts.multi_attempt_prompt(ex.question, 2) + _attempt(ex.answer)
            for ex in synthetic.examples_from_config(s, 2000, 7)]
  corpus += [prompts.feedback_text(n) for n in range(1, 6)]
  corpus += [hints.hint_prompt("1+1", ["3"], [False]), prompts.single_turn_prompt("1+1")]
  build_tiny_tokenizer(path, corpus_texts=corpus, vocab_size=config.model.demo.vocab_size)
  tok = Tokenizer.from_dir(path)
  cfg = demo_model_config(tok.vocab_size)
  seed = _warm_start_seed(config)
  params = models.init_params(cfg, jax.random.PRNGKey(seed))
  logging.info("demo: warm start of a %d-layer Qwen3 (vocab %d)", cfg.num_layers, tok.vocab_size)
  params = warm_start(cfg, params, tok, config, seed)
  models.save_hf(path, cfg, params)


def ensure_demo_model(config, workdir: str) -> str:
  """The demo model folder for `config`: built once into the cache, verified on every load.

  A run that already has `<workdir>/demo_model` (made before the cache existed) keeps it.
  A cached folder that fails its manifest is rebuilt. Concurrent builders each write a
  temporary folder; the first rename wins and the others discard theirs.
  """
  legacy = os.path.join(workdir, "demo_model")
  if os.path.isfile(os.path.join(legacy, "model.safetensors")):
    return legacy
  key = warm_start_key(config)
  root = os.path.join(config_utils.cache_root(), "demo_models")
  path = os.path.join(root, key)
  if verify_cached(path, key):
    logging.info("demo: warm-started model from the cache %s", path)
    return path
  if os.path.exists(path):
    logging.warning("demo: cached model %s fails its manifest; rebuilding it", path)
    shutil.rmtree(path, ignore_errors=True)
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
  try:
    build_demo_model(config, tmp)
    _write_manifest(tmp, key)
    try:
      os.rename(tmp, path)
    except OSError:  # another process renamed its copy first
      if not verify_cached(path, key):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path
