"""Accelerator benchmarks (GPU or TPU): decode vs the HBM roofline, update-step MFU in bf16.

  python bench/accelerator.py                 # on a GPU/TPU host: Qwen2.5-1.5B shapes
  JAX_PLATFORMS=cpu python bench/accelerator.py --smoke   # tiny shapes: checks the script
  python bench/accelerator.py --sections=paper_decode --out=bench/results/h100_paper_decode.json

Prints one JSON object (and writes it to --out when given, after every section, so a run
cut short keeps what it measured):
  machine  measured bf16 matmul TFLOP/s (n^3 product) and HBM read bandwidth (jitted sum
           over a large array), the two roofline denominators;
  decode   Qwen2.5-1.5B-shaped model, random weights, bf16 weights and compute, greedy, no
           early stop: mar's decode tokens/s per batch size; bytes read per step (matmul
           weights + the whole KV cache the step attends over) / measured bandwidth gives
           the roofline tokens/s; and HF `generate` (torch, bf16, same weights loaded from
           the same folder) in the same process for the ratio;
  update   one PPO step (critic + actor, as `PPOLearner`) and one GRPO step (`GRPOLearner`)
           with f32 master weights and bf16 compute: tokens/s and MFU = model FLOPs
           (6 N T + attention, as bench/train_step.py counts them) / measured bf16 peak;
  paper_decode  the paper configs' rollout decode per device (--paper_rows rows, default 32 =
           256 / 8): Qwen2.5-Math-1.5B at S = 4,128 slots with 1,200 live tokens per row
           (multi-attempt) and Qwen3-8B-Base at S = 9,216 with 2,000 (LTE), random bf16
           weights, sampled at temperature 1: tokens/s and step ms into the cache of S slots
           and into one of the live length rounded up to `attn_block`, timed round-robin, their
           ratio (~1 when a step's cost follows the live tokens), and bytes per step (weights +
           live KV) / measured bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "")  # the host's accelerator (train_step sets cpu)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_BENCH, ".."))
sys.path.insert(0, _BENCH)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mar import sampling  # noqa: E402
from mar.models import hf_io  # noqa: E402
from mar.models import init as init_lib  # noqa: E402
from mar.models import model as qwen  # noqa: E402
from mar.models.config import PRESETS, QwenConfig  # noqa: E402
from mar.rl import grpo, optim, ppo  # noqa: E402
import sampler as sb  # noqa: E402  (bench/sampler.py: the timed mar and HF decode runs)
import train_step as ts  # noqa: E402  (shared FLOP counts and batch builder)

NOMINAL_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, no sparsity


def smoke_config() -> QwenConfig:
  return QwenConfig("qwen2", 1024, 256, 704, 4, 4, 2, 64, 10000.0, 1e-6, True, 4096)


def best_of(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def first_and_best(step, repeats: int) -> tuple[float, float]:
  """(best step seconds, compile seconds: the first call's excess over the best)."""
  t0 = time.perf_counter()
  jax.block_until_ready(step())
  first = time.perf_counter() - t0
  t = best_of(step, repeats)
  return t, first - t


def machine_limits(n: int, read_bytes: int) -> dict:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  t_mm = best_of(lambda: mm(a), 10)
  big = jnp.ones((read_bytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(big))
  t_sum = best_of(lambda: total(big), 10)
  kind = jax.devices()[0].device_kind
  nominal = next((v for k, v in NOMINAL_TFLOPS.items() if k in kind), None)
  return {"device": kind, "backend": jax.default_backend(), "jax": jax.__version__,
          "bf16_matmul_tflops": 2 * n**3 / t_mm / 1e12, "matmul_n": n,
          "nominal_bf16_tflops": nominal, "read_gb_s": big.nbytes / t_sum / 1e9}


# ----- decode ----------------------------------------------------------------------------------


def hf_folder(cfg: QwenConfig, tmp: str, seed: int = 0):
  """A random HF Qwen2 with cfg's shapes in bf16 on the GPU, saved to tmp; returns the model."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Qwen2Config, Qwen2ForCausalLM  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  hc = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                   max_position_embeddings=cfg.max_position_embeddings,
                   tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = Qwen2ForCausalLM(hc).to(torch.bfloat16).to(device).eval()
  model.save_pretrained(tmp)
  return model


def decode_roofline(cfg: QwenConfig, b: int, s: int, step_s: float, read_gb_s: float) -> dict:
  weight_bytes = ts.matmul_params(cfg) * 2  # bf16
  kv_bytes = 2 * cfg.num_layers * b * cfg.num_kv_heads * s * cfg.head_dim * 2
  step_bytes = weight_bytes + kv_bytes
  ideal = step_bytes / (read_gb_s * 1e9)
  return {"decode_step_ms": step_s * 1e3, "bytes_per_step_mb": step_bytes / 1e6,
          "achieved_gb_s": step_bytes / step_s / 1e9, "roofline_tokens_per_s": b / ideal,
          "share_of_bandwidth_roofline": ideal / step_s}


def bench_decode(cfg: QwenConfig, batches: list[int], prompt: int, new: int, repeats: int,
                 read_gb_s: float, with_hf: bool, unroll: bool | None) -> dict:
  cfg = cfg.replace(dtype=jnp.bfloat16)
  out = {"shape": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
                   "kv_heads": cfg.num_kv_heads, "inter": cfg.intermediate_size,
                   "vocab": cfg.vocab_size, "matmul_params": ts.matmul_params(cfg)},
         "prompt": prompt, "new": new, "unroll": unroll}
  with tempfile.TemporaryDirectory() as tmp:
    model = hf_folder(cfg, tmp) if with_hf else None
    if with_hf:
      cfg, params = hf_io.load_hf(tmp, dtype=jnp.bfloat16)
    else:
      params = init_lib.init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16)
  if unroll:  # per-layer weights, converted once (the sampler would otherwise per call)
    params = jax.block_until_ready(qwen.unstack_layers(params))
  for b in batches:
    tokens = np.random.RandomState(b).randint(0, cfg.vocab_size, (b, prompt))
    fns, compile_s, mar_tokens = sb.mar_runner(cfg, params, tokens, new, unroll, "mar")
    if model is not None:
      hf_fns, hf_tokens = sb.hf_runner(model, tokens, new)
      fns.update(hf_fns)
    t = sb.interleaved_best(fns, repeats)
    mar = sb.mar_summary(t, "mar", compile_s, b, new)
    row = {"mar": mar, "roofline": decode_roofline(cfg, b, prompt + new, mar["decode_s"] / new,
                                                   read_gb_s)}
    if model is not None:
      hf = row["hf"] = sb.hf_summary(t, b, new)
      row["speedup_decode"] = mar["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
      row["speedup_total"] = mar["tokens_per_s"] / hf["tokens_per_s"]
      # bf16 greedy paths drift apart once two logits round to a tie; the prefix agrees.
      row["greedy_tokens_equal_to_hf_first16"] = float((mar_tokens[:, :16] ==
                                                        hf_tokens[:, :16]).mean())
    out[f"batch_{b}"] = row
  if model is not None:
    import torch  # pylint: disable=g-import-not-at-top

    del model
    torch.cuda.empty_cache()  # hand the memory to the update section
  return out


# ----- decode at the paper shapes --------------------------------------------------------------

# The two paper configs' rollout programs per device: 256 rows over 8 devices, the cache the
# config sizes (prompt bucket + token budget [+ feedback turns]), a typical live length.
PAPER_SHAPES = {
    "multi_attempt_qwen2_5_math_1_5b": dict(preset="qwen2_5_math_1_5b", cache=4128, live=1200),
    "lte_qwen3_8b_base": dict(preset="qwen3_8b_base", cache=9216, live=2000),
}


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def filled_state(cfg: QwenConfig, params, rows: int, cache_len: int, live: int, chunk: int,
                 seed: int = 0):
  """A sampler state whose rows all hold `live` random tokens in a cache of cache_len slots.

  Written as a rollout writes its context (a prefill of the first chunk, then appends), so
  no prefill materialises attention scores over the whole live length at once.
  """
  rng = np.random.RandomState(seed)
  first = min(chunk, live)
  toks = jnp.asarray(rng.randint(0, cfg.vocab_size, (rows, first)), jnp.int32)
  state = sampling.prefill(cfg, params, toks, np.ones((rows, first), bool), cache_len)
  for done in range(first, live, chunk):
    more = jnp.asarray(rng.randint(0, cfg.vocab_size, (rows, chunk)), jnp.int32)
    state = sampling.append(cfg, params, state, more,
                            jnp.full((rows,), min(chunk, live - done), jnp.int32))
  return jax.block_until_ready(state)


def rewinding_decoder(cfg: QwenConfig, params, states: dict, name: str, new: int):
  """fn -> seconds: decodes `new` tokens on states[name], then rewinds them (untimed).

  decode donates its state, so each run continues from the same live length without a
  second copy of the cache in memory.
  """
  rows = states[name].pos.shape[0]
  max_new = jnp.full((rows,), new, jnp.int32)
  temp1 = sampling.SamplingParams(temperature=1.0)  # as the paper configs sample

  def timed():
    t0 = time.perf_counter()
    state = jax.block_until_ready(sampling.decode(cfg, params, states[name], max_new=max_new,
                                                  sampling=temp1))
    dt = time.perf_counter() - t0
    states[name] = jax.block_until_ready(sampling.rewind(state, max_new))
    return dt

  return timed


def paper_decode_shape(cfg: QwenConfig, rows: int, cache_len: int, live: int, new: int,
                       repeats: int, read_gb_s: float, unroll: bool | None, dense: bool) -> dict:
  """Decode steps into a cache of cache_len slots vs one of the live length rounded up.

  Both caches hold the same `live` tokens per row and decode the same `new` tokens (rows
  never stop), round-robin in this process. With live-length attention the ratio of the
  two step times is ~1; `dense` adds the whole-cache pass (`attn_block` >= S) on the big cache.
  """
  cfg = cfg.replace(dtype=jnp.bfloat16)
  small = round_up(live + new, cfg.attn_block)
  if cache_len < small:
    raise ValueError(f"paper_decode: cache {cache_len} holds fewer than live {live} + new {new}")
  params = init_lib.init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16)
  if unroll is not False:  # per-layer weights, made once (the sampler would otherwise per call)
    params = jax.block_until_ready(qwen.unstack_layers(params))
  chunk = min(256, cfg.attn_block)
  states = {"cache": filled_state(cfg, params, rows, cache_len, live, chunk),
            "live": filled_state(cfg, params, rows, small, live, chunk)}
  fns = {"cache": rewinding_decoder(cfg, params, states, "cache", new),
         "live": rewinding_decoder(cfg, params, states, "live", new)}
  if dense:
    fns["dense_cache"] = rewinding_decoder(cfg.replace(attn_block=cache_len), params, states,
                                           "cache", new)
  first = {k: fn() for k, fn in fns.items()}  # includes the compile
  best = sb.interleaved_best(fns, repeats)
  mean_live = live + new // 2  # the live KV a step reads, on average over the call
  out = {"shape": {"model_type": cfg.model_type, "hidden": cfg.hidden_size,
                   "layers": cfg.num_layers, "heads": cfg.num_heads,
                   "kv_heads": cfg.num_kv_heads, "inter": cfg.intermediate_size,
                   "vocab": cfg.vocab_size, "matmul_params": ts.matmul_params(cfg)},
         "rows": rows, "cache_slots": cache_len, "live_cache_slots": small,
         "live_tokens": [live, live + new], "new": new, "attn_block": cfg.attn_block,
         "unroll": unroll}
  for k, t in best.items():
    out[k] = {"slots": small if k == "live" else cache_len, "compile_s": first[k] - t,
              "tokens_per_s": rows * new / t,
              "roofline_live_kv": decode_roofline(cfg, rows, mean_live, t / new, read_gb_s)}

  def step_mb(slots):
    return decode_roofline(cfg, rows, slots, 1.0, read_gb_s)["bytes_per_step_mb"]

  out["kv_share_of_live_step_bytes"] = 1 - ts.matmul_params(cfg) * 2 / 1e6 / step_mb(mean_live)
  out["bytes_per_step_mb_whole_cache"] = step_mb(cache_len)
  out["step_ratio_cache_over_live"] = best["cache"] / best["live"]
  if dense:
    out["step_ratio_dense_cache_over_live"] = best["dense_cache"] / best["live"]
  return out


def paper_shapes(names: str, caches: str, lives: str, smoke: bool) -> dict:
  """{name: (QwenConfig, cache slots, live tokens)} from the comma lists of the command line.

  Caches and live lengths are listed in PAPER_SHAPES' order; smoke swaps the presets for
  `smoke_config` of the same model type.
  """
  cache = dict(zip(PAPER_SHAPES, (int(c) for c in caches.split(","))))
  live = dict(zip(PAPER_SHAPES, (int(n) for n in lives.split(","))))
  out = {}
  for name in filter(None, names.split(",")):
    if name not in PAPER_SHAPES:
      raise ValueError(f"--paper_models: unknown shape {name!r}; expected {sorted(PAPER_SHAPES)}")
    cfg = PRESETS[PAPER_SHAPES[name]["preset"]]()
    if smoke:
      cfg = smoke_config().replace(model_type=cfg.model_type,
                                   tie_word_embeddings=cfg.tie_word_embeddings)
    out[name] = (cfg, cache.get(name, PAPER_SHAPES[name]["cache"]),
                 live.get(name, PAPER_SHAPES[name]["live"]))
  return out


def bench_paper_decode(out: dict, shapes: dict, rows: int, new: int, repeats: int,
                       read_gb_s: float, unroll: bool | None, dense: bool,
                       attn_block: int | None = None, after_each=lambda: None) -> dict:
  """Fills out[name] with `paper_decode_shape` for each of shapes {name: (QwenConfig, cache_len,
  live)}, calling after_each() after each; an error (e.g. out of memory) is reported for its
  shape and the next one still runs (each shape's weights and caches are freed before it)."""
  for name, (cfg, cache_len, live) in shapes.items():
    if attn_block:
      cfg = cfg.replace(attn_block=attn_block)
    try:
      out[name] = paper_decode_shape(cfg, rows, cache_len, live, new, repeats, read_gb_s,
                                     unroll, dense)
    except Exception:  # pylint: disable=broad-except
      out[name] = {"error": traceback.format_exc()[-2000:]}
    after_each()
  return out


# ----- update steps ----------------------------------------------------------------------------


def train_batch(cfg: QwenConfig, rows: int, prompt: int, response: int) -> dict:
  c = {"batch": rows, "prompt": prompt, "response": response, "vocab": cfg.vocab_size}
  batch = ts.make_batch(c)
  logp = np.zeros(batch["tokens"].shape, np.float32) - 5.0  # near a flat policy's log-probs
  return {k: jnp.asarray(v) for k, v in ts.with_old_logp(batch, logp).items()}


def f32_params(cfg: QwenConfig, seed: int = 0) -> dict:
  return init_lib.init_params(cfg, jax.random.key(seed), dtype=jnp.float32)


def time_ppo(cfg, batch, micro: int, repeats: int) -> tuple[float, float]:
  opt = optim.make_optimizer(1e-6, 100, warmup_ratio=0.0, grad_clip=1.0)
  learner = ppo.PPOLearner(cfg, ppo.PPOHparams(micro_batches=micro), opt, opt)
  critic = {"backbone": f32_params(cfg, 1),
            "value_head": qwen.init_value_head(cfg, jax.random.key(1))}
  pol = f32_params(cfg)
  s = {"pol": pol, "a": opt.init(pol), "cri": critic, "c": opt.init(critic)}
  keys = ("tokens", "valid", "action_mask", "old_logp", "ref_logp", "advantages", "returns",
          "old_values")
  mb = {k: batch[k] for k in keys}

  def step():
    s["cri"], s["c"], _ = learner.update_critic(s["cri"], s["c"], mb)
    s["pol"], s["a"], m = learner.update_actor(s["pol"], s["a"], mb)
    return s["pol"], s["cri"], m["loss"]

  return first_and_best(step, repeats)


def time_grpo(cfg, batch, micro: int, response: int, repeats: int):
  opt = optim.make_optimizer(1e-6, 100, warmup_ratio=0.0, grad_clip=1.0)
  learner = grpo.GRPOLearner(cfg, grpo.GRPOHparams(micro_batches=micro), opt,
                             response_len=response)
  gb = {"tokens": batch["tokens"], "valid": batch["valid"], "action_mask": batch["action_mask"],
        "old_logp": batch["old_logp"], "old_logp_hinted": jnp.zeros_like(batch["old_logp"]),
        "hinted": jnp.zeros(batch["tokens"].shape[0], bool),
        "advantages": batch["seq_advantages"]}
  pol = f32_params(cfg)
  s = {"pol": pol, "o": opt.init(pol)}

  def step():
    s["pol"], s["o"], m = learner.update(s["pol"], s["o"], gb)
    return s["pol"], m["loss"]

  return first_and_best(step, repeats)


def bench_update(cfg: QwenConfig, rows: int, prompt: int, response: int, micro: int,
                 repeats: int, peak_tflops: float, algos: list[str], remat: bool) -> dict:
  # bf16 compute, f32 master weights and Adam state. MFU counts model FLOPs only, so the
  # forward that remat recomputes lowers it.
  cfg = cfg.replace(dtype=jnp.bfloat16, remat=remat)
  batch = train_batch(cfg, rows, prompt, response)
  seq = prompt + response
  flops = ts.step_flops(cfg, rows, seq)
  out = {"rows": rows, "seq": seq, "micro_batches": micro, "remat": remat,
         "tokens_per_step": rows * seq,
         "tflop_per_step": {"grpo": flops / 1e12, "ppo": 2 * flops / 1e12}}
  for algo in algos:
    try:
      if algo == "ppo":
        t, compile_s = time_ppo(cfg, batch, micro, repeats)
      else:
        t, compile_s = time_grpo(cfg, batch, micro, response, repeats)
      f = flops * (2 if algo == "ppo" else 1)
      out[algo] = {"step_s": t, "compile_s": compile_s, "tokens_per_s": rows * seq / t,
                   "tflops": f / t / 1e12, "mfu": f / t / 1e12 / peak_tflops}
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: report, go on)
      out[algo] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat: checks the script")
  ap.add_argument("--sections", default="decode,update,paper_decode")
  ap.add_argument("--batches", default="16,64,256")
  ap.add_argument("--prompt", type=int, default=256)
  ap.add_argument("--new", type=int, default=256)
  ap.add_argument("--unroll", default="auto", choices=["auto", "yes", "no"],
                  help="decode layers as an unrolled loop (auto: the sampler's default) or a scan")
  ap.add_argument("--no_hf", action="store_true", help="skip the HF generate reference")
  ap.add_argument("--train_rows", type=int, default=16)
  ap.add_argument("--train_prompt", type=int, default=256)
  ap.add_argument("--train_response", type=int, default=768)
  ap.add_argument("--micro_batches", type=int, default=2,
                  help="gradient accumulation (without remat, 80 GB fits 8 for GRPO, 16 for PPO)")
  ap.add_argument("--no_remat", action="store_true",
                  help="keep activations (remat on with 2 micro-batches measured fastest on H100)")
  ap.add_argument("--algos", default="grpo,ppo")
  ap.add_argument("--paper_rows", type=int, default=32,
                  help="paper_decode: rows per device (the paper configs: 256 rows / 8 devices)")
  ap.add_argument("--paper_cache", default=",".join(str(v["cache"]) for v in PAPER_SHAPES.values()),
                  help="paper_decode: cache slots S of the 1.5B multi-attempt and 8B LTE shapes")
  ap.add_argument("--paper_live", default=",".join(str(v["live"]) for v in PAPER_SHAPES.values()),
                  help="paper_decode: live tokens per row at the first timed step, per shape")
  ap.add_argument("--paper_new", type=int, default=64, help="paper_decode: tokens per timed call")
  ap.add_argument("--paper_models", default=",".join(PAPER_SHAPES))
  ap.add_argument("--paper_dense", action="store_true",
                  help="paper_decode: also time one dense pass over the whole cache (the old path)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  cfg = QwenConfig.qwen2_5_math_1_5b()
  n, read = 8192, 2 << 30
  if args.smoke:
    cfg, n, read = smoke_config(), 256, 64 << 20
    args.batches, args.prompt, args.new, args.repeats = "2", 8, 8, 1
    args.train_rows, args.train_prompt, args.train_response = 2, 8, 8
    args.micro_batches = 2
    args.paper_rows, args.paper_cache, args.paper_live, args.paper_new = 2, "512,768", "128,160", 8
  result = {"machine": machine_limits(n, read)}

  def emit():
    text = json.dumps(result, indent=1, default=float)
    if args.out:
      with open(args.out, "w") as f:
        f.write(text)
    return text

  emit()
  sections = args.sections.split(",")
  m = result["machine"]
  if "decode" in sections:
    try:
      result["decode"] = bench_decode(cfg, [int(b) for b in args.batches.split(",")],
                                      args.prompt, args.new, args.repeats, m["read_gb_s"],
                                      not args.no_hf,
                                      {"auto": None, "yes": True, "no": False}[args.unroll])
    except Exception:  # pylint: disable=broad-except
      result["decode"] = {"error": traceback.format_exc()[-2000:]}
    emit()
  if "update" in sections:
    result["update"] = bench_update(cfg, args.train_rows, args.train_prompt, args.train_response,
                                    args.micro_batches, args.repeats, m["bf16_matmul_tflops"],
                                    args.algos.split(","), not args.no_remat)
    if m["nominal_bf16_tflops"]:
      for algo in args.algos.split(","):
        if "tflops" in result["update"].get(algo, {}):
          result["update"][algo]["mfu_vs_nominal"] = (result["update"][algo]["tflops"] /
                                                      m["nominal_bf16_tflops"])
    emit()
  if "paper_decode" in sections:
    shapes = paper_shapes(args.paper_models, args.paper_cache, args.paper_live, args.smoke)
    bench_paper_decode(result.setdefault("paper_decode", {}), shapes, args.paper_rows,
                       args.paper_new, args.repeats, m["read_gb_s"],
                       {"auto": None, "yes": True, "no": False}[args.unroll], args.paper_dense,
                       attn_block=64 if args.smoke else None, after_each=emit)
  print(emit())


if __name__ == "__main__":
  main()
