"""Helpers shared by the test suites (the one place they live: no test imports another test).

Run configs on a once-built demo model (`tiny_config`), tiny model configs, HF reference
models and greedy decodes, an in-process verifier, fixed episode / group batches for the
learners, and the continuous engine driven directly on token lists. Scripted policies live
in `scripted.py`.
"""
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from configs import demo as demo_config
from mar import demo
from mar import models
from mar import sampling
from mar.data import prompts
from mar.data.tiny_tokenizer import build_tiny_tokenizer
from mar.data.tokenizer import Tokenizer, feedback_table
from mar.rollout import continuous
from mar.rollout import spec as spec_lib
from mar.rollout.host import AttemptVerifier
from mar.episodes import Episodes

# The benchmark and training data live outside the repo (see ../shared/data/SOURCE.md);
# tests find it through MAR_DATA_DIR, defaulting to the checkout's sibling folder.
DATA_DIR = os.environ.get(
    "MAR_DATA_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"),
)


def subprocess_env(**extra) -> dict:
  """Environment for a `python -m mar.main` subprocess: one CPU device, no progress bars."""
  env = dict(os.environ, MAR_NO_PROGRESS="1", JAX_PLATFORMS="cpu", **extra)
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
  return env


# ------------------------------------------------------------ run configs

_SHARED_MODEL: dict = {}


def tiny_config(method="ppo", **over):
  """The demo config shrunk for tests, using a once-built demo model folder."""
  c = demo_config.get_config({"ppo": None, "lte": "lte", "grpo": "lte"}[method])
  if method == "grpo":
    c.method = "grpo"
  c.model.demo.enabled = False
  c.model.path = shared_model()
  c.train.num_steps = 3
  c.rollout.prompts_per_step = 8
  c.train.pack_len = -1  # rows of the rollout's width: the demo's 256 suits 64 prompts a step
  c.ppo.mini_batches = 2
  c.eval.update(dict(at_start=False, at_end=False))
  c.data.synthetic.num_examples = 64
  c.checkpoint.update(dict(every_steps=1, keep=2, async_save=False))
  c.verify.workers = 1
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))  # one device (the suite simulates 8)
  if method != "ppo":
    c.rollout.prompts_per_step = 2
    c.grpo.group_size = 4
  return apply_overrides(c, over)


def apply_overrides(config, overrides: dict):
  """Sets dotted keys ("rollout.batch_size") of a config, as --config.* flags do."""
  for key, value in overrides.items():
    node = config
    *head, last = key.split(".")
    for h in head:
      node = node[h]
    node[last] = value
  return config


def shared_model() -> str:
  """Builds one warm-started demo model per test process (a few SFT steps only)."""
  if "path" not in _SHARED_MODEL:
    c = demo_config.get_config()
    c.model.demo.sft_steps = 30
    work = tempfile.mkdtemp()
    _SHARED_MODEL["path"] = demo.ensure_demo_model(c, work)
  return _SHARED_MODEL["path"]


def replayable_metrics(row: dict) -> dict:
  """Metrics that must replay exactly (wall-clock figures excluded)."""
  clock = lambda k: k.startswith("time/") or k.endswith(("_s", "_seconds"))
  return {k: v for k, v in row.items() if not clock(k)}


# ------------------------------------------------- models and HF references


def tiny_tokenizer() -> Tokenizer:
  """The tiny byte-level BPE tokenizer (`mar.data.tiny_tokenizer`), built in a temp folder."""
  d = tempfile.mkdtemp()
  build_tiny_tokenizer(d)
  return Tokenizer.from_dir(d)

def hf_tiny(model_type: str, seed: int = 0):
  """A random tiny HF model (f32) and the same weights loaded into mar."""
  import torch  # pylint: disable=g-import-not-at-top  (torch only where a test compares with HF)
  import transformers  # pylint: disable=g-import-not-at-top
  from mar.models import hf_io  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                max_position_embeddings=512)
  if model_type == "qwen2":
    hc = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(hc)
  else:
    hc = transformers.Qwen3Config(**common, head_dim=24, rope_theta=1e6, tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(hc)
  model = model.float().eval()
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    config, params = hf_io.load_hf(tmp)
  return model, config, params


PROMPT_LENS = (5, 17, 1, 9)


def prompts_for(seed=0, lens=PROMPT_LENS, vocab=300):
  rng = np.random.RandomState(seed)
  return [rng.randint(1, vocab, n).tolist() for n in lens]


def hf_greedy(model, prompts, new, eos=None):
  """HF `generate`'s greedy continuation of left-padded `prompts` (cut after `eos`)."""
  import torch  # pylint: disable=g-import-not-at-top
  p = max(map(len, prompts))
  x = np.zeros((len(prompts), p), np.int64)
  m = np.zeros_like(x)
  for i, pr in enumerate(prompts):
    x[i, p - len(pr):] = pr
    m[i, p - len(pr):] = 1
  kw = dict(min_new_tokens=new) if eos is None else dict(eos_token_id=eos)
  with torch.no_grad():
    out = model.generate(torch.tensor(x), attention_mask=torch.tensor(m), max_new_tokens=new,
                         do_sample=False, pad_token_id=0, **kw)
  rows = []
  for r in out[:, p:].numpy().tolist():
    if eos is not None and eos in r:
      r = r[:r.index(eos) + 1]
    rows.append(r)
  return rows


# ------------------------------------------------------------- verifiers

class ListVerifier:
  """In-process stand-in for BatchVerifier: exact match of the last box."""

  def verify(self, responses, golds):
    from mar import verify

    return [verify.extract_boxed(r) == g for r, g in zip(responses, golds)]


# ------------------------------------------- fixed learner batches [B, S]

B, S = 16, 24  # rows, slots


def tiny_model_config() -> models.QwenConfig:
  """Every sharded dimension divisible by 2, so each rule really splits on a 2x2x2 mesh."""
  return models.QwenConfig.tiny("qwen3", vocab_size=64).replace(
      tie_word_embeddings=False, hidden_size=32, intermediate_size=48, num_heads=4,
      num_kv_heads=2, head_dim=16, num_layers=2)


def fixture_masks(rng):
  """Left-padded prompts (4..7 tokens), responses right after them, one feedback span."""
  valid = np.zeros((B, S), bool)
  action = np.zeros((B, S), bool)
  feedback = np.zeros((B, S), bool)
  last = np.zeros(B, np.int32)
  for b in range(B):
    p, r = 4 + b % 4, 10 + (3 * b) % 8
    start = 8 - p
    valid[b, start:8 + r] = True
    action[b, 8:8 + r] = True
    if b % 2:  # an attempt, a 3-token feedback span, a second attempt
      feedback[b, 12:15] = True
      action[b, 12:15] = False
    last[b] = 8 + r - 1
  return valid, action, feedback, last


def episodes() -> Episodes:
  rng = np.random.RandomState(0)
  valid, action, feedback, last = fixture_masks(rng)
  tokens = np.where(valid, rng.randint(1, 64, (B, S)), 0).astype(np.int32)
  zeros_bs = np.zeros((B, S), np.int32)
  flags = np.zeros((2, B), bool)
  return Episodes(
      tokens=tokens, valid=valid, action_mask=action, feedback_mask=feedback,
      attempt_id=zeros_bs, logprobs=np.zeros((B, S), np.float32),
      reward=rng.choice([1.0, -0.5, -1.0], B).astype(np.float32), last_action=last,
      n_attempts=np.full(B, 2, np.int32), attempts_used=np.ones(B, np.int32),
      correct_turn=flags, attempted_turn=flags, boxed_turn=flags,
      truncated=np.zeros(B, bool))


def group_batch() -> dict:
  rng = np.random.RandomState(1)
  valid, action, _, _ = fixture_masks(rng)
  tokens = np.where(valid, rng.randint(1, 64, (B, S)), 0).astype(np.int32)
  hinted = np.arange(B) % 4 == 3
  return {
      "tokens": tokens, "valid": valid, "action_mask": action, "hinted": hinted,
      "old_logp_hinted": np.where(hinted[:, None] & action,
                                  -rng.uniform(0.5, 4.0, (B, S)), 0).astype(np.float32),
      "advantages": rng.normal(size=B).astype(np.float32),
  }


# ------------------------------------------- the continuous engine, driven directly

ENGINE_PROMPT_LENS = (5, 17, 1, 9, 12, 3, 7, 14)


def engine_single_turn(config, params, prompts_, *, rows, budget, temperature=0.0, stop_ids=(),
                refill_rows=2, refill_wait=3, key=0, mesh=None, widths=()):
  """Runs prompts (token lists) as one queue of single-turn episodes; numpy results."""
  p = max(map(len, prompts_))
  toks, mask = sampling.pad_prompts(prompts_, p, len(prompts_))
  spec = continuous.EngineSpec(
      rollout=spec_lib.RolloutSpec(max_attempts=1, token_budget=budget, cache_len=p + budget,
                             sampling=sampling.SamplingParams(temperature=temperature),
                             stop_ids=tuple(stop_ids)),
      rows=rows, refill_rows=refill_rows, refill_wait=refill_wait, prompt_widths=widths)
  fb = np.zeros((1, 1), np.int32), np.zeros((1,), np.int32)
  fn = jax.jit(lambda params, t, m, k: continuous.rollout(
      config, params, spec, None, None, t, m, jnp.ones(len(prompts_), jnp.int32), *fb, k,
      mesh=mesh))
  return jax.device_get(fn(params, toks, mask, jax.random.key(key)))


def engine_multi_attempt_sampled(config, params, tok, *, rows, n=6, budget=40, key=3, mesh=None):
  """Sampled multi-attempt episodes of a random model: many stop ids end attempts early."""
  texts = [prompts.multi_attempt_prompt(f"{i}*{i}", 3) for i in range(n)]
  ids = [tok.encode(t) for t in texts]
  p = max(map(len, ids))
  toks, mask = sampling.pad_prompts(ids, p, n, tok.pad_id)
  fb_t, fb_l = feedback_table(tok, 3)
  stop_ids = (tok.im_end_id, tok.eos_id) + tuple(range(40, tok.vocab_size, 23))
  spec = spec_lib.RolloutSpec(3, budget, spec_lib.cache_len_for(p, budget, 3, fb_t.shape[1]),
                        sampling.SamplingParams(temperature=1.0), stop_ids)
  espec = continuous.EngineSpec(spec, rows=rows, refill_rows=2, refill_wait=2, verify_every=3)
  verifier = AttemptVerifier(tok, ListVerifier(), ["1"] * n)
  n_attempts = jnp.asarray([3, 1, 2, 3, 2, 3][:n] + [3] * (n - 6), jnp.int32)
  fn = jax.jit(lambda params, t, m, k: continuous.rollout(
      config, params, espec, None, verifier, t, m, n_attempts, fb_t, fb_l, k, mesh=mesh))
  return jax.device_get(fn(params, toks, mask, jax.random.key(key)))
