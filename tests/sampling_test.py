"""Sampler: greedy parity with HF generate, state semantics, and sampling statistics."""

import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from mar import sampling
import testutil
from mar.models import model as qwen
from mar.sampling import sampler


def chi_square_pvalue(observed, expected) -> float:
  """Pearson chi-square goodness-of-fit p-value (df = bins - 1)."""
  stat = float(np.sum((observed - expected) ** 2 / expected))
  return float(jax.scipy.special.gammaincc((len(observed) - 1) / 2, stat / 2))


class GreedyParityTest(parameterized.TestCase):

  @parameterized.parameters("qwen2", "qwen3")
  def test_generate_matches_hf(self, model_type):
    model, config, params = testutil.hf_tiny(model_type)
    prompts = testutil.prompts_for()
    ref = testutil.hf_greedy(model, prompts, 40)
    res = sampling.generate(config, params, prompts, 40)
    self.assertEqual(res.tokens, ref)
    self.assertEqual(res.finish_reason, ["length"] * len(prompts))
    self.assertGreater(len({t for r in ref for t in r}), 20)  # not a degenerate repeat
    # Greedy log-probs are those of the argmax under the untempered distribution.
    for lp in res.logprobs:
      self.assertTrue(np.all(lp <= 0) and np.all(np.isfinite(lp)))

  def test_scan_and_unrolled_layers_agree(self):
    _, config, params = testutil.hf_tiny("qwen2")
    toks, mask = sampling.pad_prompts(testutil.prompts_for(), 32, 4)
    outs = []
    for unroll in (False, True):
      p = qwen.unstack_layers(params) if unroll else params
      st = sampling.prefill(config, p, toks, mask, 64, per_layer=unroll)
      st = sampling.decode(config, p, st, max_new=24, sampling=sampling.SamplingParams(0.0),
                           unroll=unroll)
      outs.append((np.asarray(st.tokens), np.asarray(st.logprobs)))
      self.assertEqual(qwen.is_unstacked(st.cache.k), unroll)
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-5)

  def test_prefill_makes_the_decode_layout(self):
    """Stacked params: the cache is per layer already, so unrolled decode converts none."""
    _, config, params = testutil.hf_tiny("qwen2")
    toks, mask = sampling.pad_prompts(testutil.prompts_for(), 32, 4)
    st = sampling.prefill(config, params, toks, mask, 64)
    self.assertTrue(qwen.is_unstacked(st.cache.k))
    hlo = sampler._decode.lower(  # pylint: disable=protected-access
        config, params, st, jnp.full((4,), 8, jnp.int32), None,
        sampling=sampling.SamplingParams(0.0), stop_ids=(), check_every=1,
        unroll=True).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    kv = {"f32[4,%d,%d,64]" % (config.num_kv_heads, config.head_dim),  # keys [B, K, Dh, S]
          "f32[4,%d,64,%d]" % (config.num_kv_heads, config.head_dim)}  # values [B, K, S, Dh]
    ops = re.findall(r"= (f32\[[\d,]+\])\{[\d,]*\} ([\w-]+)\(", entry)
    # Outside the loop a layer's cache is only passed in and out: never copied or transposed.
    self.assertTrue({op for shape, op in ops if shape in kv} <= {"parameter", "get-tuple-element",
                                                                  "bitcast"}, ops)

  def test_stop_ids_match_hf_eos(self):
    model, config, params = testutil.hf_tiny("qwen3")
    prompts = testutil.prompts_for(seed=3)
    free = sampling.generate(config, params, prompts, 24).tokens
    eos = free[0][5]  # a token row 0 emits, so at least that row stops early
    ref = testutil.hf_greedy(model, prompts, 24, eos=eos)
    res = sampling.generate(config, params, prompts, 24, stop_ids=(eos,))
    self.assertEqual(res.tokens, ref)
    for toks, why in zip(res.tokens, res.finish_reason):
      self.assertEqual(why, "stop" if toks[-1] == eos else "length")
    self.assertEqual(res.finish_reason[0], "stop")


class StateTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    _, cls.config, cls.params = testutil.hf_tiny("qwen2", seed=1)

  def _prefill(self, prompts, p=16, s=64, **kw):
    toks, mask = sampling.pad_prompts(prompts, p, len(prompts))
    return sampling.prefill(self.config, self.params, toks, mask, s, **kw)

  def _logits_of(self, seqs, width=32):
    """Reference next-token logits after each sequence (one uncached, left-padded forward)."""
    toks, mask = sampling.pad_prompts(seqs, width, len(seqs))
    fwd = jax.jit(qwen.forward, static_argnums=0)
    return np.asarray(fwd(self.config, self.params, toks, attention_mask=mask)[:, -1])

  def test_prefill_layout(self):
    prompts = testutil.prompts_for(lens=(3, 16))
    st = self._prefill(prompts)
    np.testing.assert_array_equal(st.pos, [16, 16])
    np.testing.assert_array_equal(st.rope_pos, [3, 16])
    valid = np.asarray(st.cache.valid)
    self.assertEqual(valid.shape, (2, 64))
    np.testing.assert_array_equal(valid[0, :16], np.arange(16) >= 13)
    self.assertFalse(valid[:, 16:].any())
    np.testing.assert_array_equal(np.asarray(st.tokens)[0, 13:16], prompts[0])
    np.testing.assert_allclose(st.logits, self._logits_of(prompts), atol=2e-5)

  def test_decode_rewind_append_continue(self):
    """A dialogue grown by decode, rewind and append equals a fresh forward over it."""
    prompts = testutil.prompts_for(lens=(4, 11, 7))
    st = self._prefill(prompts)
    greedy = sampling.SamplingParams(0.0)
    st = sampling.decode(self.config, self.params, st, max_new=jnp.array([6, 3, 0]),
                         sampling=greedy)
    np.testing.assert_array_equal(st.num_new[:2], [6, 3])
    np.testing.assert_array_equal(st.pos, [22, 19, 16])
    np.testing.assert_array_equal(st.finish[:2], [sampling.FINISH_LENGTH] * 2)
    st = sampling.rewind(st, jnp.array([2, 0, 0]))
    np.testing.assert_array_equal(st.pos, [20, 19, 16])
    np.testing.assert_array_equal(np.asarray(st.cache.valid)[0, 16:22], [1, 1, 1, 1, 0, 0])
    turn = np.array([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0], [12, 0, 0, 0, 0]], np.int32)
    lengths = np.array([5, 2, 0], np.int32)
    st = sampling.append(self.config, self.params, st, turn, lengths)
    np.testing.assert_array_equal(st.pos, [25, 21, 16])
    tokens, valid = np.asarray(st.tokens), np.asarray(st.cache.valid)
    seqs = [tokens[b][valid[b]].tolist() for b in range(3)]
    np.testing.assert_array_equal(st.rope_pos, [len(s) for s in seqs])
    self.assertEqual(seqs[2], prompts[2])  # length-0 append changed nothing
    self.assertEqual(seqs[0][-5:], [5, 6, 7, 8, 9])
    self.assertEqual(len(seqs[0]), 4 + 6 - 2 + 5)
    self.assertTrue(valid[0, 20:25].all())  # the append reused the rewound slots
    self.assertFalse(valid[1, 21:].any())  # append padding never becomes valid
    np.testing.assert_allclose(st.logits, self._logits_of(seqs), atol=3e-5)
    # Keep decoding: identical to greedy continuation of the compacted dialogue.
    st = sampling.decode(self.config, self.params, st, max_new=5, sampling=greedy)
    got = np.asarray(st.tokens)
    ids = [list(s) for s in seqs]
    for _ in range(5):
      for row, nxt in zip(ids, np.argmax(self._logits_of(ids), axis=-1)):
        row.append(int(nxt))
    for b in range(3):
      start = int(np.asarray(st.pos)[b]) - 5
      self.assertEqual(got[b, start:start + 5].tolist(), ids[b][-5:])
    lp = np.asarray(st.logprobs)
    self.assertTrue(np.all(lp[valid & ~np.asarray(st.cache.valid)] == 0))

  def test_done_rows_untouched_and_capacity(self):
    prompts = testutil.prompts_for(lens=(16, 5))
    st = self._prefill(prompts, p=16, s=20)
    host = lambda st: st._replace(key=None, cache=st.cache._replace(k=None, v=None))
    before = jax.tree.map(np.asarray, host(st))
    st = sampling.decode(self.config, self.params, st, max_new=jnp.array([0, 50]),
                         sampling=sampling.SamplingParams(0.0))
    after = jax.tree.map(np.asarray, host(st))
    for name in ("tokens", "logprobs", "logits"):
      np.testing.assert_array_equal(getattr(after, name)[0], getattr(before, name)[0])
    np.testing.assert_array_equal(after.cache.valid[0], before.cache.valid[0])
    # Row 1 fills every slot up to S and stops with FINISH_LENGTH.
    self.assertEqual(after.pos[1], 20)
    self.assertEqual(after.num_new[1], 4)
    self.assertEqual(after.finish[1], sampling.FINISH_LENGTH)
    self.assertTrue(after.cache.valid[1, 16:].all())
    # A full row asked for more finishes at once and changes nothing.
    st2 = sampling.decode(self.config, self.params, st, max_new=jnp.array([0, 3]),
                          sampling=sampling.SamplingParams(0.0))
    self.assertEqual(int(st2.num_new[1]), 0)
    self.assertEqual(int(st2.finish[1]), sampling.FINISH_LENGTH)

  @parameterized.parameters((1, 8, 2, sampling.FINISH_PREDICATE),
                            (4, 10, 4, sampling.FINISH_PREDICATE),
                            (4, 3, 3, sampling.FINISH_PREDICATE),  # checked on the last token
                            (4, 1, 1, sampling.FINISH_LENGTH))
  def test_predicate_check_every(self, check_every, max_new, expect_new, expect_finish):
    # Fires once the call has generated 2 tokens; checked every `check_every` and at the end.
    def init(tables, b):
      del tables
      return {"n": jnp.zeros((b,), jnp.int32)}

    def update(tables, state, tok, live):
      del tables, tok
      n = state["n"] + live.astype(jnp.int32)
      return {"n": n}, n >= 2

    pred = sampling.StopPredicate({}, init, update, "two")
    st = self._prefill(testutil.prompts_for(lens=(6, 9)), stop_predicate=pred)
    for _ in range(2):  # the predicate state restarts at every decode call
      st = sampling.decode(self.config, self.params, st, max_new=max_new,
                           sampling=sampling.SamplingParams(0.0), stop_predicate=pred,
                           check_every=check_every)
      np.testing.assert_array_equal(st.num_new, [expect_new] * 2)
      np.testing.assert_array_equal(st.finish, [expect_finish] * 2)
      np.testing.assert_array_equal(st.stop_state["n"], [expect_new] * 2)

  def test_stop_token_priority_and_reproducible_sampling(self):
    prompts = testutil.prompts_for(lens=(6, 9, 12, 3))
    sp = sampling.SamplingParams(temperature=1.0)
    runs = []
    for _ in range(2):
      st = self._prefill(prompts, key=jax.random.key(7))
      st = sampling.decode(self.config, self.params, st, max_new=30, sampling=sp)
      runs.append(np.asarray(st.tokens))
    np.testing.assert_array_equal(runs[0], runs[1])
    st = self._prefill(prompts, key=jax.random.key(8))
    st = sampling.decode(self.config, self.params, st, max_new=30, sampling=sp)
    self.assertFalse(np.array_equal(runs[0], np.asarray(st.tokens)))
    # Logprobs are those of the sampled tokens under softmax(logits / T).
    first = runs[0][:, 16]
    st = self._prefill(prompts)
    ref = jax.nn.log_softmax(st.logits, axis=-1)[np.arange(4), first]
    st = self._prefill(prompts, key=jax.random.key(7))
    st = sampling.decode(self.config, self.params, st, max_new=1, sampling=sp)
    np.testing.assert_allclose(np.asarray(st.logprobs)[:, 16], ref, atol=1e-5)
    # Stop ids: the stop token is written and ends the row.
    stop = int(runs[0][0, 20])
    st = self._prefill(prompts, key=jax.random.key(7))
    st = sampling.decode(self.config, self.params, st, max_new=30, sampling=sp,
                         stop_ids=(stop,))
    row = np.asarray(st.tokens)[0, 16:16 + int(st.num_new[0])]
    self.assertEqual(row[-1], stop)
    self.assertEqual(int(st.finish[0]), sampling.FINISH_STOP_TOKEN)
    self.assertNotIn(stop, row[:-1].tolist())


class SampleTest(parameterized.TestCase):

  def test_argmax_first_occurrence(self):
    rng = np.random.RandomState(0)
    for v in (7, 300, 1000, 8192, 151936 // 8):
      x = rng.randint(0, 5, (6, v)).astype(np.float32)  # many ties
      np.testing.assert_array_equal(sampling.argmax(jnp.asarray(x)), np.argmax(x, -1))
      x = rng.randn(6, v).astype(np.float32)
      x[0, :] = -np.inf
      x[0, v // 2] = 3.0
      np.testing.assert_array_equal(sampling.argmax(jnp.asarray(x)), np.argmax(x, -1))

  def _draw(self, logits, sp, n=40000, seed=0):
    v = logits.shape[0]
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, v))
    tok, lp = jax.jit(sampling.sample, static_argnums=2)(batch, jax.random.key(seed), sp)
    return np.asarray(tok), np.asarray(lp)

  def _target(self, logits, sp):
    s = logits / sp.temperature
    p = np.exp(s - s.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.ones_like(p, bool)
    if sp.top_k:
      keep[order[sp.top_k:]] = False
    if sp.top_p < 1:
      q = np.where(keep, p, 0)
      q /= q.sum()
      before = np.cumsum(q[order]) - q[order]
      keep[order[before >= sp.top_p]] = False
    t = np.where(keep, p, 0)
    return t / t.sum(), keep, np.log(p)

  @parameterized.named_parameters(
      ("temperature", sampling.SamplingParams(temperature=0.7)),
      ("hot", sampling.SamplingParams(temperature=1.5)),
      ("top_k", sampling.SamplingParams(temperature=1.0, top_k=5)),
      ("top_p", sampling.SamplingParams(temperature=0.8, top_p=0.6)),
      ("top_k_top_p", sampling.SamplingParams(temperature=1.2, top_k=8, top_p=0.7)),
  )
  def test_frequencies_match_target(self, sp):
    rng = np.random.RandomState(1)
    logits = (rng.randn(40) * 1.5).astype(np.float32)  # V=40: 5 chunks of 8 plus padding
    tok, lp = self._draw(logits, sp)
    target, keep, logp = self._target(logits.astype(np.float64), sp)
    self.assertTrue(keep[tok].all(), "an excluded token was emitted")
    np.testing.assert_allclose(lp, logp[tok], atol=1e-5)
    counts = np.bincount(tok, minlength=len(logits))
    kept = np.flatnonzero(target * len(tok) >= 5)  # chi-square needs expected >= 5
    rest = np.setdiff1d(np.flatnonzero(keep), kept)
    obs = np.append(counts[kept], counts[rest].sum())
    exp = np.append(target[kept], target[rest].sum()) * len(tok)
    if exp[-1] == 0:
      obs, exp = obs[:-1], exp[:-1]
    pval = chi_square_pvalue(obs, exp)
    self.assertGreater(pval, 1e-4)

  def test_large_vocab_top_p_excludes(self):
    rng = np.random.RandomState(2)
    logits = (rng.randn(5000) * 3).astype(np.float32)
    sp = sampling.SamplingParams(temperature=1.0, top_p=0.5)
    tok, _ = self._draw(logits, sp, n=4000)
    _, keep, _ = self._target(logits.astype(np.float64), sp)
    self.assertTrue(keep[tok].all())
    self.assertGreater(len(set(tok.tolist())), 1)

  def test_same_key_same_draws(self):
    logits = np.random.RandomState(3).randn(300).astype(np.float32)
    a, _ = self._draw(logits, sampling.SamplingParams(1.0), n=64, seed=5)
    b, _ = self._draw(logits, sampling.SamplingParams(1.0), n=64, seed=5)
    c, _ = self._draw(logits, sampling.SamplingParams(1.0), n=64, seed=6)
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))

  def test_bad_params(self):
    with self.assertRaisesRegex(ValueError, "temperature"):
      sampling.SamplingParams(temperature=-1)
    with self.assertRaisesRegex(ValueError, "top_p"):
      sampling.SamplingParams(top_p=0.0)
    with self.assertRaisesRegex(ValueError, "prompts\\[1\\]"):
      sampling.generate(qwen_config(), {}, [[1], []], 4)


def qwen_config():
  from mar.models.config import QwenConfig  # pylint: disable=g-import-not-at-top
  return QwenConfig.tiny()


if __name__ == "__main__":
  absltest.main()
