"""Sampler throughput: mar's jitted KV-cache decode vs HF `generate`, same weights, same process.

  python bench/sampler.py                      # tiny and medium, f32 and bf16 weights
  python bench/sampler.py --configs=medium --weights=bf16 --idle_wait_s=60
  python bench/sampler.py --configs= --compile_1p5b   # compile time, Qwen2.5-1.5B shapes
  python bench/sampler.py --configs= --live_length=tiny   # decode at S = 8,192 vs 512

Prints one JSON object. Per config: steady-state tokens/s of both (whole call, and decode
only), mar's compile time (separately), and the share of the machine's limits measured in
this process: achieved GFLOP/s vs a jitted 1024^2 f32 matmul, and decode bytes read per
step (matmul weights + the KV cache the step attends over) vs the read bandwidth of a
jitted sum over a 256 MB array; and XLA's own floor, the decode steps' weight matmuls
alone on the same weights (`matmul_floor`), with the speedup over HF that a sampler
costing nothing but those matmuls would reach. HF is forced to generate exactly max_new
tokens (min_new_tokens), and torch uses the same thread count as XLA's CPU client is given.
Timings are best-of-N wall clock with the contenders run round-robin; on a shared machine
pass --idle_wait_s to start each timed run only once other processes leave the CPUs idle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mar import sampling  # noqa: E402
from mar.models import hf_io  # noqa: E402
from mar.models import init as init_lib  # noqa: E402
from mar.models import model as qwen  # noqa: E402
from mar.models.config import QwenConfig  # noqa: E402
from mar.sampling import sampler as sampler_lib  # noqa: E402

CONFIGS = {
    # hidden, layers, heads, kv heads, intermediate, vocab, batch, prompt, new tokens
    "tiny": dict(hidden=256, layers=4, heads=4, kv=2, inter=704, vocab=1024, batch=8,
                 prompt=32, new=128),
    "medium": dict(hidden=768, layers=8, heads=12, kv=4, inter=2048, vocab=8192, batch=16,
                   prompt=64, new=64),
}


def _cpu_idle_fraction(window: float = 0.25) -> float:
  """Share of all cores idle over `window` seconds (from /proc/stat; 1.0 where unavailable)."""
  def snap():
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)  # idle + iowait, total

  try:
    i0, t0 = snap()
    time.sleep(window)
    i1, t1 = snap()
  except OSError:
    return 1.0
  return (i1 - i0) / max(t1 - t0, 1)


def wait_for_idle(max_wait_s: float, threshold: float = 0.9) -> None:
  """On a shared machine, waits (up to max_wait_s) until other processes leave the CPUs idle."""
  deadline = time.time() + max_wait_s
  while time.time() < deadline and _cpu_idle_fraction() < threshold:
    time.sleep(0.5)


def interleaved_best(fns: dict, repeats: int, idle_wait_s: float = 0.0) -> dict:
  """Best wall time of each fn, running them round-robin so load drifts hit all alike."""
  best = {k: float("inf") for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      if idle_wait_s:
        wait_for_idle(idle_wait_s)
      best[k] = min(best[k], fn())
  return best


def host_cpu() -> dict:
  """The host's CPU model and the vector ISAs its kernels can use (from /proc/cpuinfo): the
  sampler's ratios move with them, so a result names the CPU it was taken on."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return {}
  field = lambda key: next((l.split(":", 1)[1].strip() for l in info.splitlines()
                            if l.startswith(key)), "")
  flags = set(field("flags").split())
  return {"cpu_model": field("model name"),
          "isa": [i for i in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if i in flags]}


def machine_limits(repeats: int = 5, idle_wait_s: float = 0.0) -> dict:
  """Measured compute roofline (f32 matmul) and read bandwidth (sum over 256 MB)."""
  a = jnp.asarray(np.random.RandomState(0).randn(1024, 1024).astype(np.float32))
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  big = jnp.ones((64 * 1024 * 1024,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(big).block_until_ready()

  def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

  best = interleaved_best({
      "mm": lambda: timed(lambda: [mm(a) for _ in range(10)][-1].block_until_ready()) / 10,
      "sum": lambda: timed(lambda: total(big).block_until_ready()),
  }, repeats, idle_wait_s)
  t, tb = best["mm"], best["sum"]
  return {"matmul_gflops": 2 * 1024**3 / t / 1e9, "read_gb_s": big.nbytes / tb / 1e9}


def hf_model(c: dict, seed: int = 0):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Qwen2Config, Qwen2ForCausalLM  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  hc = Qwen2Config(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                   num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                   num_key_value_heads=c["kv"], max_position_embeddings=4096)
  return Qwen2ForCausalLM(hc).float().eval()


def hf_runner(model, tokens: np.ndarray, new: int):
  """(timed runs {name: fn -> seconds}, generated tokens) of HF generate, greedy, no early stop."""
  import torch  # pylint: disable=g-import-not-at-top

  device = next(model.parameters()).device  # CPU here; bench/accelerator.py passes a GPU model
  x = torch.tensor(tokens, dtype=torch.long, device=device)
  mask = torch.ones_like(x)

  def run(n):
    with torch.no_grad():
      return model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)

  def timed(n):
    t0 = time.perf_counter()
    run(n)
    if device.type == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - t0

  out = run(new)
  assert out.shape[1] == tokens.shape[1] + new
  return ({"hf_all": lambda: timed(new), "hf_one": lambda: timed(1)},
          out[:, tokens.shape[1]:].cpu().numpy())


def hf_matmul_floor_runner(model, b: int, new: int):
  """Timed run of HF's side of the floor: `new` steps of only the decode step's weight matmuls
  through the model's own Linear modules (q, k, v, o, gate, up, down, lm head), b rows.

  The torch counterpart of `matmul_floor_program`: how fast the host's torch kernels read the
  same weights, so that mar's floor can be set against HF's and not only against HF's step.
  """
  import torch  # pylint: disable=g-import-not-at-top

  d = model.config.hidden_size
  layers = [(l.self_attn, l.mlp) for l in model.model.layers]

  def step(x):
    for attn, mlp in layers:
      qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
      x = x + attn.o_proj(qkv[:, :attn.o_proj.in_features])
      x = x + mlp.down_proj(mlp.gate_proj(x) * mlp.up_proj(x))
    return x + model.lm_head(x)[:, :d] * 1e-6

  def timed():
    x = torch.ones(b, d)
    t0 = time.perf_counter()
    with torch.no_grad():
      for _ in range(new):
        x = step(x)
    return time.perf_counter() - t0

  return {"hf_floor": timed}


def hf_summary(t: dict, b: int, new: int) -> dict:
  return {
      "total_s": t["hf_all"],
      "tokens_per_s": b * new / t["hf_all"],
      "decode_tokens_per_s": b * (new - 1) / max(t["hf_all"] - t["hf_one"], 1e-9),
      "matmul_floor_step_ms": t["hf_floor"] / new * 1e3,
  }


def matmul_params(cfg: QwenConfig) -> int:
  """Parameters read by matmuls in one decode step (layers + lm head)."""
  d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  qkv = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  o = cfg.num_heads * cfg.head_dim * d
  return l * (qkv + o + 3 * d * f) + d * cfg.vocab_size


def mar_runner(cfg: QwenConfig, params, tokens: np.ndarray, new: int, unroll: bool | None,
               tag: str):
  """(timed runs, compile seconds, generated tokens) of mar's prefill + greedy decode."""
  b, p = tokens.shape
  cache_len = p + new
  mask = np.ones_like(tokens, bool)
  max_new = jnp.full((b,), new, jnp.int32)
  toks = jnp.asarray(tokens, jnp.int32)
  greedy = sampling.SamplingParams(temperature=0.0)

  def prefill():
    return sampling.prefill(cfg, params, toks, mask, cache_len)

  def decode(state):
    return sampling.decode(cfg, params, state, max_new=max_new, unroll=unroll, sampling=greedy)

  def timed_prefill():
    t0 = time.perf_counter()
    jax.block_until_ready(prefill())
    return time.perf_counter() - t0

  def timed_decode():
    state = jax.block_until_ready(prefill())
    t0 = time.perf_counter()
    jax.block_until_ready(decode(state).tokens)
    return time.perf_counter() - t0

  first_prefill = timed_prefill()
  first_decode = timed_decode()  # both first calls include compilation
  state = decode(prefill())
  out = np.asarray(state.tokens[:, p:p + new])
  compile_s = {"prefill": first_prefill - timed_prefill(), "decode": first_decode - timed_decode()}
  return {f"{tag}_prefill": timed_prefill, f"{tag}_decode": timed_decode}, compile_s, out


def matmul_floor_program(cfg: QwenConfig, b: int, new: int):
  """jitted (params, x0 [b, D]) -> x: `new` steps of only the decode step's weight matmuls.

  Each step runs [b, D] rows through every layer's qkv, o, gate_up and down, then the lm
  head, on unstacked params passed as arguments (not baked in as constants), and chains
  them so that XLA can neither drop nor slice any of them. No attention, norms, cache or
  sampling: the step time a sampler could reach if everything but its matmuls were free,
  with the dot kernels XLA has for b-row operands.
  """
  d, f = cfg.hidden_size, cfg.intermediate_size

  def dot(x, w):
    return qwen._dot("bd,de->be", x, w)  # pylint: disable=protected-access

  def narrow(y, n):  # y's first n columns, with every other column folded in
    return y[:, :n] + y[:, n:].sum(-1, keepdims=True) * 1e-6

  def step(params, x):
    for lp in params["layers"]:
      qkv = dot(x, lp["qkv"].reshape(d, -1))
      x = x + dot(narrow(qkv, lp["o"].size // d), lp["o"].reshape(-1, d))
      g = dot(x, lp["gate_up"].reshape(d, -1))
      x = x + dot(g[:, :f] * g[:, f:], lp["down"])
    return narrow(jnp.concatenate([x, qwen.logits_from_hidden(cfg, params, x)], -1), d)

  return jax.jit(lambda params, x0: jax.lax.fori_loop(0, new, lambda _, x: step(params, x), x0))


def matmul_floor_runner(cfg: QwenConfig, params, b: int, new: int, tag: str):
  """Timed run of `matmul_floor_program` on the sampler's weights."""
  run = matmul_floor_program(cfg, b, new)
  params = qwen.unstack_layers(params)
  x0 = jnp.ones((b, cfg.hidden_size), jnp.float32)
  jax.block_until_ready(run(params, x0))

  def timed():
    t0 = time.perf_counter()
    jax.block_until_ready(run(params, x0))
    return time.perf_counter() - t0

  return {f"{tag}_floor": timed}


def mar_summary(t: dict, tag: str, compile_s: dict, b: int, new: int) -> dict:
  pre, dec = t[f"{tag}_prefill"], t[f"{tag}_decode"]
  return {
      "compile_s": compile_s,
      "prefill_s": pre,
      "decode_s": dec,
      "tokens_per_s": b * new / (pre + dec),
      "decode_tokens_per_s": b * new / dec,
  }


def roofline(cfg: QwenConfig, mar: dict, b: int, p: int, new: int, limits: dict,
             weight_bytes: int) -> dict:
  s = p + new
  step = mar["decode_s"] / new
  kv_bytes = 2 * cfg.num_layers * b * cfg.num_kv_heads * s * cfg.head_dim * 4
  attn_flops = 4 * b * cfg.num_heads * cfg.head_dim * s * cfg.num_layers
  flops = 2 * b * matmul_params(cfg) + attn_flops
  bytes_step = matmul_params(cfg) * weight_bytes + kv_bytes
  gflops = flops / step / 1e9
  gbs = bytes_step / step / 1e9
  return {
      "decode_step_ms": step * 1e3,
      "decode_gflops": gflops,
      "share_of_matmul_roofline": gflops / limits["matmul_gflops"],
      "decode_bytes_per_step_mb": bytes_step / 1e6,
      "decode_gb_s": gbs,
      "share_of_bandwidth_roofline": gbs / limits["read_gb_s"],
  }


def matmul_floor(cfg: QwenConfig, floor_s: float, mar: dict, hf: dict, b: int, new: int,
                 limits: dict, weight_bytes: int) -> dict:
  """How close the sampler's step is to XLA's matmuls alone; the speedup over HF and the
  share of the bandwidth roofline (weights only) that those matmuls alone reach."""
  step = floor_s / new
  return {
      "step_ms": step * 1e3,
      "decode_step_over_floor": mar["decode_s"] / floor_s,
      "speedup_decode_at_floor": b / step / hf["decode_tokens_per_s"],
      "over_hf_matmul_floor": step * 1e3 / hf["matmul_floor_step_ms"],
      "weights_share_of_bandwidth_roofline":
          matmul_params(cfg) * weight_bytes / step / 1e9 / limits["read_gb_s"],
  }


def run_config(name: str, repeats: int, weights: list[str], unroll: bool | None,
               limits: dict, idle_wait_s: float = 0.0) -> dict:
  c = CONFIGS[name]
  b, new = c["batch"], c["new"]
  model = hf_model(c)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    cfg, params = hf_io.load_hf(tmp)
  tokens = np.random.RandomState(1).randint(0, c["vocab"], (b, c["prompt"]))
  fns, hf_tokens = hf_runner(model, tokens, new)
  fns.update(hf_matmul_floor_runner(model, b, new))
  compiles, outs = {}, {}
  for w in weights:
    p = params
    if w == "bf16":  # matrices in bf16 (multiplied in bf16, accumulated in f32); norms f32
      p = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim >= 2 else a, p)
    if unroll is not False:
      p = jax.block_until_ready(qwen.unstack_layers(p))
    run, compiles[w], outs[w] = mar_runner(cfg, p, tokens, new, unroll, w)
    fns.update(run)
    fns.update(matmul_floor_runner(cfg, p, b, new, w))
  t = interleaved_best(fns, repeats, idle_wait_s)
  hf = hf_summary(t, b, new)
  out = {"config": c, "hf": hf}
  for w in weights:
    mar = mar_summary(t, w, compiles[w], b, new)
    weight_bytes = 2 if w == "bf16" else 4
    out[f"mar_{w}"] = {
        **mar,
        "speedup_total": mar["tokens_per_s"] / hf["tokens_per_s"],
        "speedup_decode": mar["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
        "greedy_tokens_equal_to_hf": float((outs[w] == hf_tokens).mean()),
        "roofline": roofline(cfg, mar, b, c["prompt"], new, limits, weight_bytes),
        "matmul_floor": matmul_floor(cfg, t[f"{w}_floor"], mar, hf, b, new, limits, weight_bytes),
    }
  return out


def live_length_case(name: str, repeats: int, idle_wait_s: float = 0.0, prompt: int = 256,
                     news=(32, 96), lengths=(512, 8192), batch: int = 16) -> dict:
  """Decode cost vs cache size at a fixed live length, per step and per call.

  The same prompts [batch, prompt] decoded greedily through `sampling.decode` into caches of
  each of `lengths` slots, with the cached attention the model picks for that length
  (`auto`: dense for short caches, live blocks for long ones, `models.model.reads_live_blocks`)
  and with one dense pass over the whole cache (`attn_block` >= S), all timed round-robin in
  this process. Each is timed at two call lengths (`news` new tokens) and differenced: the
  per-step cost is (t[n2] - t[n1]) / (n2 - n1) and the per-call fixed cost is what is left of
  t[n1] (a whole-cache copy or convert per call shows there). Ratios: largest over smallest
  cache, per step and per call of n1 tokens.
  """
  c = CONFIGS[name]
  b = batch or c["batch"]
  cfg = QwenConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                   num_layers=c["layers"], num_heads=c["heads"], num_kv_heads=c["kv"],
                   head_dim=c["hidden"] // c["heads"])
  # Stacked params, as a user calls `sampling.prefill` / `decode`: the layout decode converts.
  params = init_lib.init_params(cfg, jax.random.key(0))
  toks = jnp.asarray(np.random.RandomState(1).randint(0, c["vocab"], (b, prompt)), jnp.int32)
  mask = np.ones((b, prompt), bool)
  greedy = sampling.SamplingParams(temperature=0.0)
  fns, outs = {}, {}
  for mode, block in (("auto", cfg.attn_block), ("dense", max(lengths))):
    mcfg = cfg.replace(attn_block=block)
    for s in lengths:
      for new in news:
        def timed(mcfg=mcfg, s=s, new=new, tag=f"{mode}_{s}_{new}"):
          state = jax.block_until_ready(sampling.prefill(mcfg, params, toks, mask, s))
          t0 = time.perf_counter()
          out = jax.block_until_ready(sampling.decode(
              mcfg, params, state, max_new=jnp.full((b,), new, jnp.int32), sampling=greedy))
          dt = time.perf_counter() - t0
          outs[tag] = np.asarray(out.tokens[:, prompt:prompt + min(news)])
          return dt
        timed()  # compile
        fns[f"{mode}_{s}_{new}"] = timed
  t = interleaved_best(fns, repeats, idle_wait_s)
  lo, hi = min(lengths), max(lengths)
  n1, n2 = min(news), max(news)
  step = {f"{m}_{s}": (t[f"{m}_{s}_{n2}"] - t[f"{m}_{s}_{n1}"]) / (n2 - n1)
          for m in ("auto", "dense") for s in lengths}
  fixed = {k: t[f"{k}_{n1}"] - n1 * v for k, v in step.items()}
  same = all((o == outs[f"auto_{lo}_{n1}"]).all() for o in outs.values())
  return {
      "config": name, "batch": b, "prompt": prompt, "new": list(news), "lengths": list(lengths),
      "attn_block": cfg.attn_block, "dense_max_blocks": qwen.DENSE_MAX_BLOCKS,
      "auto_path": {str(s): "live" if qwen.reads_live_blocks(cfg, s, 1) else "dense"
                    for s in lengths},
      "call_ms": {k: v * 1e3 for k, v in t.items()},
      "step_ms": {k: v * 1e3 for k, v in step.items()},
      "call_fixed_ms": {k: v * 1e3 for k, v in fixed.items()},
      f"step_ratio_{hi}_over_{lo}": step[f"auto_{hi}"] / step[f"auto_{lo}"],
      f"call_ratio_{hi}_over_{lo}": t[f"auto_{hi}_{n1}"] / t[f"auto_{lo}_{n1}"],
      f"dense_step_ratio_{hi}_over_{lo}": step[f"dense_{hi}"] / step[f"dense_{lo}"],
      "greedy_tokens_equal": bool(same),
  }


def compile_1p5b(batch: int, prompt: int, cache_len: int, unroll: bool | None) -> dict:
  """AOT-compiles prefill and decode for Qwen2.5-1.5B shapes (f32) without allocating weights."""
  cfg = QwenConfig.qwen2_5_math_1_5b()
  shapes = jax.eval_shape(lambda: init_lib.init_params(cfg, jax.random.key(0)))
  if unroll is None:
    unroll = sampler_lib._default_unroll()  # pylint: disable=protected-access
  if unroll:
    shapes = jax.eval_shape(qwen.unstack_layers, shapes)
  toks = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, prompt), jnp.bool_)
  out = {"batch": batch, "prompt": prompt, "cache_len": cache_len, "unroll": unroll}
  t0 = time.perf_counter()
  lowered = sampling.prefill.lower(cfg, shapes, toks, mask, cache_len)
  lowered.compile()
  out["prefill_compile_s"] = time.perf_counter() - t0
  state = jax.eval_shape(lambda p, t, m: sampling.prefill(cfg, p, t, m, cache_len), shapes, toks,
                         mask)
  t0 = time.perf_counter()
  lowered = sampler_lib._decode.lower(  # pylint: disable=protected-access
      cfg, shapes, state, jax.ShapeDtypeStruct((batch,), jnp.int32), None,
      sampling=sampling.SamplingParams(temperature=1.0), stop_ids=(151645, 151643),
      check_every=1, unroll=unroll)
  lowered.compile()
  out["decode_compile_s"] = time.perf_counter() - t0
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="tiny,medium")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses the machine)")
  ap.add_argument("--weights", default="f32,bf16", help="comma list of f32, bf16")
  ap.add_argument("--unroll", default="auto", choices=["auto", "yes", "no"])
  ap.add_argument("--compile_1p5b", action="store_true")
  ap.add_argument("--live_length", default="",
                  help="config for the decode-vs-cache-size case (S = 8,192 vs 512, per step and "
                  "per call)")
  ap.add_argument("--idle_wait_s", type=float, default=0.0,
                  help="shared machine: before each timed run wait up to this long for idle CPUs")
  args = ap.parse_args()
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  unroll = {"auto": None, "yes": True, "no": False}[args.unroll]
  limits = machine_limits(idle_wait_s=args.idle_wait_s)
  result = {"machine": {**limits, **host_cpu(), "cpu_count": os.cpu_count(),
                        "torch_threads": args.threads,
                        "jax": jax.__version__, "backend": jax.default_backend(),
                        "loadavg_at_start": os.getloadavg()[0]}}
  for name in filter(None, args.configs.split(",")):
    result[name] = run_config(name, args.repeats, args.weights.split(","), unroll, limits,
                              args.idle_wait_s)
  if args.live_length:
    result["live_length"] = live_length_case(args.live_length, args.repeats, args.idle_wait_s)
  if args.compile_1p5b:
    result["compile_qwen2_5_1_5b"] = compile_1p5b(8, 256, 1024, unroll)
  result["machine"]["loadavg_at_end"] = os.getloadavg()[0]
  print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
  main()
