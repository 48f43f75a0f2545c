"""Scripted policies for the rollout engine: token choosers (`choose_fn`) that emit fixed
tokens. The engine still runs the model, writes the cache, slots and masks and applies its
stop rules; only the choice of tokens is scripted, so tests drive the real rollout
deterministically."""

import jax.numpy as jnp


def script_chooser(script, lengths):
  """choose_fn emitting script[q, t, :lengths[q, t]] as attempt t of episode q (log-prob -0.25)."""
  sc, ln = jnp.asarray(script), jnp.asarray(lengths)

  def choose(logits, keys, ctl):
    del logits, keys
    q = jnp.minimum(ctl.seq, sc.shape[0] - 1)
    t = jnp.minimum(ctl.attempt, sc.shape[1] - 1)
    tok = sc[q, t, jnp.minimum(ctl.num_new, sc.shape[2] - 1)]
    return tok, jnp.full(tok.shape, -0.25), ctl.num_new + 1 >= ln[q, t]

  return choose


def text_chooser(tok, text: str):
  """choose_fn emitting `text` as every episode's (single) attempt."""
  ids = tok.encode(text)
  return script_chooser([[ids]], [[len(ids)]])
