"""The on-device closed-\\boxed{} stop predicate against the host text reference."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from mar import sampling
from mar.models import init as init_lib
from mar.models.config import QwenConfig

PIECES = [
    "\\", "box", "ed", "{", "}", "boxed{", "x}", "{}", "a", "}}", " \\boxed{", "\\boxed{",
    "\\b", "oxed", "oxed{", "ed{", "{{", "}{", "\\\\", "b", "\\box", "ed{x}", "\\boxed{}",
    "2", " ", "{x", "\\boxed", "}\\", "\\boxed{1}}", "ox", "d{", "e", "\\bo", "xed{a}",
]


def device_fired(token_strings, seqs: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
  """[N, T] token ids -> [N, T] bool: fired after each token (sticky)."""
  pred = sampling.boxed_stop_predicate(token_strings)
  n, t = seqs.shape
  live = np.ones_like(seqs, bool) if live is None else live

  @jax.jit
  def run(seqs, live):
    def step(state, x):
      tok, lv = x
      state, fired = pred.update(state, tok, lv)
      return state, fired

    _, fired = jax.lax.scan(step, pred.init(n), (seqs.T, live.T))
    return fired.T

  return np.asarray(run(jnp.asarray(seqs, jnp.int32), jnp.asarray(live)))


class HostReferenceTest(parameterized.TestCase):

  @parameterized.parameters(
      ("\\boxed{}", True), ("\\boxed{x", False), ("\\boxed{{x}", False), ("\\boxed{{x}}", True),
      ("boxed{x}", False), ("\\boxed {x}", False), ("}}\\boxed{a}", True),
      ("\\boxed{ {\\boxed{x}", True), ("\\boxed{ {x}", False), ("\\\\boxed{x}", True),
      ("\\fbox{x} \\boxed{", False), ("", False),
  )
  def test_examples(self, text, want):
    self.assertEqual(sampling.host_has_closed_box(text), want)


class DevicePredicateTest(parameterized.TestCase):

  def test_random_sequences_match_host(self):
    rng = np.random.RandomState(0)
    n, t = 3000, 16
    # Fewer closing pieces, so some sequences stay open and the rest close at varied places.
    weights = np.array([0.4 if "}" in p else 1.0 for p in PIECES])
    seqs = rng.choice(len(PIECES), size=(n, t), p=weights / weights.sum())
    fired = device_fired(PIECES, seqs)
    closed = 0
    for i in range(n):
      text = ""
      for j in range(t):
        text += PIECES[seqs[i, j]]
        want = sampling.host_has_closed_box(text)
        if fired[i, j] != want:
          self.fail(f"sequence {i} token {j}: device {fired[i, j]} host {want} text {text!r}")
      closed += want
    self.assertGreater(closed, n // 10)
    self.assertLess(closed, n - n // 10)

  def test_rows_not_live_keep_state(self):
    pieces = ["\\boxed{", "x", "}"]
    seqs = np.array([[0, 1, 2, 2], [0, 1, 2, 1]])
    live = np.array([[1, 1, 0, 1], [1, 1, 1, 1]], bool)
    fired = device_fired(pieces, seqs, live)
    np.testing.assert_array_equal(fired, [[0, 0, 0, 1], [0, 0, 1, 1]])

  def test_many_braces_in_one_token(self):
    pieces = ["\\boxed{", "{" * 300, "}" * 300, "}", "a"]
    seqs = np.array([[0, 1, 4, 2, 4, 3]])
    np.testing.assert_array_equal(device_fired(pieces, seqs), [[0, 0, 0, 0, 0, 1]])

  def test_decode_stops_at_first_closed_box(self):
    """End to end: decode's FINISH_PREDICATE lands on the token where the text closes a box."""
    config = QwenConfig.tiny("qwen3", vocab_size=64)
    params = init_lib.init_params(config, jax.random.key(0), std=0.5)
    toks = np.array([[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]], np.int32)
    mask = np.ones_like(toks, bool)
    greedy = sampling.SamplingParams(0.0)
    st = sampling.prefill(config, params, toks, mask, 40)
    st = sampling.decode(config, params, st, max_new=30, sampling=greedy)
    free = np.asarray(st.tokens)[:, 4:34]
    # Give the ids the model emits brace-y strings, so some rows close a box.
    rng = np.random.RandomState(1)
    strings = [PIECES[i] for i in rng.randint(0, len(PIECES), 64)]
    for row, pieces in zip(free, (["\\boxed{", "a", "}"], ["\\", "boxed{", "}"], ["{", "x"])):
      for j, tok in enumerate(dict.fromkeys(row.tolist())):
        strings[tok] = pieces[j % len(pieces)]
    pred = sampling.boxed_stop_predicate(strings)
    st = sampling.prefill(config, params, toks, mask, 40)
    st = sampling.decode(config, params, st, max_new=30, sampling=greedy, stop_predicate=pred)
    num_new = np.asarray(st.num_new)
    fired_rows = 0
    for b in range(3):
      prefix_closed = [sampling.host_has_closed_box("".join(strings[t] for t in free[b, :k]))
                       for k in range(1, 31)]
      want = prefix_closed.index(True) + 1 if any(prefix_closed) else 30
      self.assertEqual(num_new[b], want, f"row {b}")
      self.assertEqual(int(st.finish[b]), sampling.FINISH_PREDICATE if any(prefix_closed)
                       else sampling.FINISH_LENGTH)
      np.testing.assert_array_equal(np.asarray(st.tokens)[b, 4:4 + want], free[b, :want])
      fired_rows += any(prefix_closed)
    self.assertGreater(fired_rows, 0)


if __name__ == "__main__":
  absltest.main()
