"""Update-step throughput: mar's jitted PPO and GRPO steps vs HF transformers + torch.AdamW.

  python bench/train_step.py                           # tiny and medium, f32, CPU
  python bench/train_step.py --configs=tiny --repeats=5
  python bench/train_step.py --reshard                 # + layout change cost on 8 CPU devices
  python bench/train_step.py --configs= --host_fraction  # host share of demo trainer steps
  python bench/train_step.py --configs= --packing        # padding of packed batches, paper mix

Prints one JSON object. For each config (Qwen2 shapes below; batch x sequence stated in the
output), one update step on one batch, all f32 on one device:
  ppo   critic update + actor update (PPO-clip + 0.01 k3 KL to a reference), as one PPO
        mini-batch of `mar.rl.ppo.PPOLearner`;
  grpo  one `mar.rl.grpo.GRPOLearner` update (PPO-clip on group advantages).
Each is forward + backward + clip + Adam. The torch side is the same model (same weights,
loaded from the same HF folder), the same losses written in torch, `clip_grad_norm_` and
`torch.optim.AdamW`, with torch's thread count set to XLA's CPU device count. The first
step's losses of both are reported as a check that the two compute the same thing.

FLOPs per step: 6 N T (N = matmul parameters: layers + output projection; T = tokens) plus
attention 12 L H Dh S^2 per sequence (forward + backward of QK^T and PV); PPO counts the
actor and the critic. MFU = achieved FLOP/s / a measured jitted f32 2048^2 matmul peak.
Timings are best-of-N wall clock; the machine may be shared, so compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mar import algorithms
from mar.models import hf_io  # noqa: E402
from mar.models.config import QwenConfig  # noqa: E402
from mar.rl import grpo, optim, ppo, scoring  # noqa: E402

CONFIGS = {
    # hidden, layers, heads, kv heads, intermediate, vocab; rows x (prompt + response) tokens
    "tiny": dict(hidden=256, layers=4, heads=4, kv=2, inter=704, vocab=1024, batch=8,
                 prompt=64, response=192),
    "medium": dict(hidden=768, layers=8, heads=12, kv=4, inter=2048, vocab=8192, batch=4,
                   prompt=64, response=192),
}
LR, CLIP, KL_COEF = 1e-5, 0.2, 0.01


def best_time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """GFLOP/s of a jitted f32 n x n matmul, best of `repeats` (the MFU denominator).

  Measured before and after the benchmarks; the larger figure is used, so a busy moment on
  a shared machine does not inflate MFU."""
  a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32))
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  t = best_time(lambda: mm(a).block_until_ready(), repeats)
  return 2 * n**3 / t / 1e9


def matmul_params(cfg: QwenConfig) -> int:
  d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  qkv = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  o = cfg.num_heads * cfg.head_dim * d
  return l * (qkv + o + 3 * d * f) + d * cfg.vocab_size


def step_flops(cfg: QwenConfig, rows: int, seq: int) -> float:
  """Forward + backward FLOPs of one pass over rows x seq tokens."""
  dense = 6 * matmul_params(cfg) * rows * seq
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * seq * rows
  return float(dense + attention)


# ----- the batch (shared by both frameworks) --------------------------------------------------


def make_batch(c: dict, seed: int = 1) -> dict:
  """[B, S] tokens, all valid; loss on the response slots. old/ref log-probs are set later."""
  rng = np.random.RandomState(seed)
  b, s = c["batch"], c["prompt"] + c["response"]
  action = np.zeros((b, s), bool)
  action[:, c["prompt"]:] = True
  return {
      "tokens": rng.randint(0, c["vocab"], (b, s)).astype(np.int32),
      "valid": np.ones((b, s), bool),
      "action_mask": action,
      "advantages": rng.normal(size=(b, s)).astype(np.float32),
      "seq_advantages": rng.normal(size=b).astype(np.float32),
      "returns": rng.normal(size=(b, s)).astype(np.float32),
      "old_values": (0.1 * rng.normal(size=(b, s))).astype(np.float32),
  }


def with_old_logp(batch: dict, logp: np.ndarray, seed: int = 2) -> dict:
  """pi_old and pi_ref near the current policy, so ratios and the KL are not trivial."""
  rng = np.random.RandomState(seed)
  noise = lambda: (0.05 * rng.normal(size=logp.shape)).astype(np.float32)
  return dict(batch, old_logp=np.where(batch["action_mask"], logp + noise(), 0.0),
              ref_logp=np.where(batch["action_mask"], logp + noise(), 0.0))


# ----- mar ------------------------------------------------------------------------------------


def bench_mar(cfg: QwenConfig, params, batch: dict, repeats: int, value_head) -> dict:
  opt = optim.make_optimizer(LR, 100, warmup_ratio=0.0, grad_clip=1.0)
  hp = ppo.PPOHparams(clip=CLIP, kl_coef=KL_COEF)
  learner = ppo.PPOLearner(cfg, hp, opt, opt)
  critic = {"backbone": jax.tree.map(jnp.copy, params),
            "value_head": jnp.asarray(value_head)}
  ppo_batch = {k: jnp.asarray(batch[k]) for k in
               ("tokens", "valid", "action_mask", "old_logp", "ref_logp", "advantages",
                "returns", "old_values")}
  state = {"pol": jax.tree.map(jnp.copy, params), "a": opt.init(params), "cri": critic,
           "c": opt.init(critic)}
  first = {}

  def ppo_step():
    s = state
    s["cri"], s["c"], cm = learner.update_critic(s["cri"], s["c"], ppo_batch)
    s["pol"], s["a"], am = learner.update_actor(s["pol"], s["a"], ppo_batch)
    jax.block_until_ready((s["pol"], s["cri"]))
    return am, cm

  t0 = time.perf_counter()
  am, cm = ppo_step()
  ppo_first = time.perf_counter() - t0
  first["ppo_actor_loss"], first["ppo_critic_loss"] = float(am["loss"]), float(cm["loss"])
  ppo_t = best_time(ppo_step, repeats)

  ghp = grpo.GRPOHparams(clip_low=CLIP, clip_high=CLIP)
  glearner = grpo.GRPOLearner(cfg, ghp, opt, response_len=int(batch["action_mask"].sum(1).max()))
  g_batch = {"tokens": ppo_batch["tokens"], "valid": ppo_batch["valid"],
             "action_mask": ppo_batch["action_mask"], "old_logp": ppo_batch["old_logp"],
             "old_logp_hinted": jnp.zeros_like(ppo_batch["old_logp"]),
             "hinted": jnp.zeros(batch["tokens"].shape[0], bool),
             "advantages": jnp.asarray(batch["seq_advantages"])}
  gs = {"pol": jax.tree.map(jnp.copy, params), "o": opt.init(params)}

  def grpo_step():
    gs["pol"], gs["o"], m = glearner.update(gs["pol"], gs["o"], g_batch)
    jax.block_until_ready(gs["pol"])
    return m

  t0 = time.perf_counter()
  m = grpo_step()
  grpo_first = time.perf_counter() - t0
  first["grpo_loss"] = float(m["loss"])
  grpo_t = best_time(grpo_step, repeats)
  return {"ppo_s": ppo_t, "grpo_s": grpo_t, "compile_s": {"ppo": ppo_first - ppo_t,
                                                          "grpo": grpo_first - grpo_t},
          "first_losses": first}


# ----- HF transformers + torch -----------------------------------------------------------------


def bench_torch(model_dir: str, batch: dict, repeats: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Qwen2ForCausalLM, Qwen2Model  # pylint: disable=g-import-not-at-top

  t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  tokens = t["tokens"].long()
  mask = t["action_mask"].float()

  def token_logprobs(logits):  # slot s scored from slot s - 1; slot 0 gets 0
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    picked = lp.gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], 1)

  def clip_loss(logp, adv):
    ratio = torch.exp(torch.clamp(logp - t["old_logp"], -20, 20))
    per = torch.maximum(-ratio * adv, -torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv)
    return (per * mask).sum() / mask.sum()

  def actor_loss(model, adv):
    logp = token_logprobs(model(input_ids=tokens).logits)
    loss = clip_loss(logp, adv)
    d = torch.clamp(torch.where(mask.bool(), logp - t["ref_logp"], 0.0), -10, 10)
    return loss + KL_COEF * ((torch.exp(-d) - 1 + d) * mask).sum() / mask.sum()

  policy = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  backbone = Qwen2Model.from_pretrained(model_dir, dtype=torch.float32)
  head = torch.nn.Linear(backbone.config.hidden_size, 1, bias=False)
  head_init = head.weight.detach().numpy()[0].copy()

  def critic_loss():
    h = backbone(input_ids=tokens).last_hidden_state
    v = head(h)[..., 0]
    v = torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], 1)
    old, ret = t["old_values"], t["returns"]
    v_clip = old + torch.clamp(v - old, -CLIP, CLIP)
    per = 0.5 * torch.maximum((v_clip - ret) ** 2, (v - ret) ** 2)
    return (per * mask).sum() / mask.sum()

  def opt_for(params):
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)

  a_opt = opt_for(policy.parameters())
  c_params = list(backbone.parameters()) + list(head.parameters())
  c_opt = opt_for(c_params)
  seq_adv = t["seq_advantages"][:, None].expand_as(mask)
  first = {}

  def update(loss_fn, params, opt):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss)

  def ppo_step():
    c = update(critic_loss, c_params, c_opt)
    a = update(lambda: actor_loss(policy, t["advantages"]), list(policy.parameters()), a_opt)
    return a, c

  first["ppo_actor_loss"], first["ppo_critic_loss"] = ppo_step()
  ppo_t = best_time(ppo_step, repeats)

  g_policy = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  g_opt = opt_for(g_policy.parameters())
  g_loss = lambda: clip_loss(token_logprobs(g_policy(input_ids=tokens).logits), seq_adv)
  first["grpo_loss"] = update(g_loss, list(g_policy.parameters()), g_opt)
  grpo_t = best_time(lambda: update(g_loss, list(g_policy.parameters()), g_opt), repeats)
  return {"ppo_s": ppo_t, "grpo_s": grpo_t, "first_losses": first,
          "_critic_head": head_init}


# ----- one config --------------------------------------------------------------------------------


def hf_model(c: dict, seed: int = 0):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Qwen2Config, Qwen2ForCausalLM  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  hc = Qwen2Config(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                   num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                   num_key_value_heads=c["kv"], max_position_embeddings=4096,
                   tie_word_embeddings=False)
  return Qwen2ForCausalLM(hc).float()


def run_config(name: str, repeats: int, peak_gflops: float) -> dict:
  c = CONFIGS[name]
  batch = make_batch(c)
  with tempfile.TemporaryDirectory() as tmp:
    hf_model(c).save_pretrained(tmp)
    cfg, params = hf_io.load_hf(tmp)
    logp = np.asarray(jax.jit(lambda p, tk, v: scoring.token_logprobs(cfg, p, tk, v))(
        params, batch["tokens"], batch["valid"]))
    batch = with_old_logp(batch, logp)
    torch_res = bench_torch(tmp, batch, repeats)
  # mar's critic head starts from torch's, so the first critic losses are comparable.
  mar_res = bench_mar(cfg, params, batch, repeats, torch_res.pop("_critic_head"))
  rows, seq = c["batch"], c["prompt"] + c["response"]
  tokens = rows * seq
  flops = {"grpo": step_flops(cfg, rows, seq)}
  flops["ppo"] = 2 * flops["grpo"]  # actor and critic passes (the value head is negligible)
  out = {"config": c, "tokens_per_step": tokens, "matmul_params": matmul_params(cfg),
         "gflop_per_step": {k: v / 1e9 for k, v in flops.items()}}
  for who, res in (("mar", mar_res), ("hf_torch", torch_res)):
    out[who] = dict(res)
    for algo in ("ppo", "grpo"):
      sec = res[f"{algo}_s"]
      out[who][algo] = {"step_s": sec, "tokens_per_s": tokens / sec,
                        "gflops": flops[algo] / sec / 1e9,
                        "mfu": flops[algo] / sec / 1e9 / peak_gflops}
      del out[who][f"{algo}_s"]
  out["mar_speedup_vs_hf"] = {a: torch_res[f"{a}_s"] / mar_res[f"{a}_s"] for a in ("ppo", "grpo")}
  out["first_loss_abs_diff"] = {k: abs(mar_res["first_losses"][k] - torch_res["first_losses"][k])
                                for k in mar_res["first_losses"]}
  out["planner_check"] = planner_check(name)
  return out


# ----- positions the update computes: padded rows vs packed rows (paper length mix) ---------


def paper_length_mix(n: int, seed: int = 0, prompt=(100, 130), median: float = 900.0,
                     sigma: float = 0.8, cap: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Prompt and response lengths: prompts uniform in `prompt`, responses lognormal."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(prompt[0], prompt[1] + 1, n)
  responses = np.minimum(np.maximum(np.round(rng.lognormal(np.log(median), sigma, n)), 1), cap)
  return prompts, responses.astype(np.int64)


def packing_counts(sequences: int = 1024, prompt_len: int = 1024, token_budget: int = 8192,
                   mini_batches: int = 2, micro_batches: int = 64, seeds: int = 5) -> dict:
  """Positions computed by the GRPO update per real token, padded vs packed.

  Defaults: configs/lte_qwen.py (128 prompts x G = 8, 2 mini-batches of 64 micro-batches).
  The batch is laid out as the rollout hands it over ([N, prompt bucket + token budget],
  left-padded prompts, right-padded responses) and packed by the learner's own plan
  (`GRPOLearner.plan`, rows as wide as the rollout's, counts bucketed per mini-batch).
  """
  cfg = QwenConfig.tiny("qwen3")
  learner = grpo.GRPOLearner(cfg, grpo.GRPOHparams(micro_batches=micro_batches),
                             optim.make_optimizer(LR, 10), token_budget, pack_len=-1)
  width = prompt_len + token_budget
  runs = []
  for seed in range(seeds):
    p_len, r_len = paper_length_mix(sequences, seed, cap=token_budget)
    slot = np.arange(width)[None]
    valid = (slot >= prompt_len - p_len[:, None]) & (slot < prompt_len + r_len[:, None])
    plan = learner.plan(valid, mini_batches, micro_batches)
    real = int(valid.sum())
    runs.append({"real_tokens": real, "padded_positions": int(valid.size),
                 "packed_positions": plan.positions, "rows": plan.num_rows,
                 "padded_ratio": valid.size / real, "packed_ratio": plan.positions / real})
  return {"sequences": sequences, "row_len": width, "mini_batches": mini_batches,
          "micro_batches": micro_batches,
          "mix": "prompts U[100, 130], responses lognormal(median 900, sigma 0.8), cap 8192",
          "packed_ratio_max": max(r["packed_ratio"] for r in runs),
          "padded_ratio_mean": float(np.mean([r["padded_ratio"] for r in runs])),
          "runs": runs}


# ----- the memory planner's activation estimate vs XLA ---------------------------------------------


def planner_check(name: str) -> dict:
  """XLA's compiled temp bytes of one GRPO update vs the planner (activations + gradients)."""
  from mar.tools import memory_plan as pm  # pylint: disable=g-import-not-at-top
  from mar.models.init import param_shapes  # pylint: disable=g-import-not-at-top

  c = CONFIGS[name]
  rows, seq = c["batch"], c["prompt"] + c["response"]
  mesh = pm.abstract_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  out = {}
  for remat in (True, False):
    cfg = QwenConfig("qwen2", c["vocab"], c["hidden"], c["inter"], c["layers"], c["heads"],
                     c["kv"], c["hidden"] // c["heads"], tie_word_embeddings=False, remat=remat)
    opt = optim.make_optimizer(LR, 100)
    learner = grpo.GRPOLearner(cfg, grpo.GRPOHparams(), opt, response_len=c["response"])
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
    batch = {"tokens": sds((rows, seq), jnp.int32), "valid": sds((rows, seq), bool),
             "action_mask": sds((rows, seq), bool), "old_logp": sds((rows, seq), jnp.float32),
             "old_logp_hinted": sds((rows, seq), jnp.float32), "hinted": sds((rows,), bool),
             "advantages": sds((rows,), jnp.float32)}
    compiled = learner.update.lower(params, jax.eval_shape(opt.init, params), batch).compile()
    xla = compiled.memory_analysis().temp_size_in_bytes
    planned = (pm.activation_bytes(cfg, mesh, rows, seq, remat, dtype=jnp.float32)
               + 2 * pm.param_bytes(cfg, mesh))
    out["remat_on" if remat else "remat_off"] = {
        "xla_temp_mb": xla / 1e6, "planner_mb": planned / 1e6, "ratio": planned / xla}
  return out


# ----- how long the device waits for the host (demo config, real trainer iterations) ------------


def host_fraction(steps: int = 6) -> dict:
  """Share of a trainer step's wall time in which the device waited for the host.

  Runs `algorithms.ppo.iteration` (multi-attempt: verification inside the rollout, the device
  stalls on it) and `algorithms.group.iteration` (LTE: single-turn chunks verified on the host
  while the device samples the next chunk) of configs/demo.py on the demo model, and reads
  the trainer's own `time/host_critical` / `time/host_fraction` (mar.overlap). LTE runs a
  second time with the verification inside the rollout (`defer_verify=False`, no overlap)
  for comparison. The first step (compiles) is dropped; the figures are medians.
  """
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from mar import demo, setup, train  # pylint: disable=g-import-not-at-top
  from mar.rollout.runner import RolloutRunner, RunnerSpec  # pylint: disable=g-import-not-at-top

  out = {}
  work = tempfile.mkdtemp()
  base = demo_config.get_config()
  base.model.demo.sft_steps = 20
  model_path = demo.ensure_demo_model(base, work)
  keys = ("time/total_step", "time/verify", "time/host_critical", "time/host_fraction")
  for name, method, overlap in (("ppo", None, None), ("lte", "lte", True),
                                ("lte_no_overlap", "lte", False)):
    config = demo_config.get_config(method)
    config.model.demo.enabled = False
    config.model.path = model_path
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    config.verify.workers = 1
    config.rollout.prompt_len = 256  # hints quoting a barely trained model's answers are long
    if name != "ppo":
      config.rollout.batch_size = 16  # several chunks per step, so they can overlap
    run = setup.build_run(config, os.path.join(work, name))
    if overlap is False:
      r = run.runner
      run.runner = RolloutRunner(run.model_config, run.tokenizer, run.verifier,
          RunnerSpec(batch_size=r.batch_size, prompt_len=r.prompt_len, max_attempts=1,
          token_budget=r.spec.token_budget, sampling=r.spec.sampling,
          check_every=r.spec.check_every), mesh=run.mesh, defer_verify=False,
          timeline=run.timeline)
    state = algorithms.family(config).init_state(config, run)
    iteration = algorithms.ppo.iteration if name == "ppo" else algorithms.group.iteration
    rows = []
    for step in range(steps):
      idx = train.batch_indices(config, len(run.train_data), step)
      t0 = time.perf_counter()
      state, m = iteration(config, run, state, [run.train_data[i] for i in idx], step)
      rows.append({**m, "time/total_step": time.perf_counter() - t0})
    run.close()
    # Median: a step that compiles a new shape (LTE's hinted rows) would swamp a mean.
    out[name] = {k: float(np.median([r[k] for r in rows[1:]])) for k in keys}
    out[name]["steps"] = [{k: round(float(v), 4) for k, v in r.items() if k.startswith("time/")}
                          for r in rows]
    out[name]["rollout_rows_per_call"] = run.runner.batch_size
  return out


# ----- layout change between sampling and training (8 simulated devices) ------------------------


def reshard_child() -> dict:
  """Medium params: FSDP (training) -> tensor-parallel and replicated layouts, timed."""
  from mar import parallel  # pylint: disable=g-import-not-at-top
  from mar.models import init as init_lib  # pylint: disable=g-import-not-at-top
  from mar.models import sharding  # pylint: disable=g-import-not-at-top

  c = CONFIGS["medium"]
  cfg = QwenConfig("qwen2", c["vocab"], c["hidden"], c["inter"], c["layers"], c["heads"],
                   c["kv"], c["hidden"] // c["heads"], tie_word_embeddings=False)
  params = init_lib.init_params(cfg, jax.random.key(0))
  layouts = {"fsdp8": (1, 8, 1), "tensor4_fsdp2": (1, 2, 4), "replicated": (8, 1, 1)}
  placed = {k: parallel.TrainShardings.create(cfg, sharding.make_mesh(*v), None).params
            for k, v in layouts.items()}
  src = jax.block_until_ready(jax.device_put(params, placed["fsdp8"]))
  out = {"devices": jax.device_count(), "param_mb": sum(
      x.nbytes for x in jax.tree.leaves(params)) / 1e6}
  for k in ("tensor4_fsdp2", "replicated"):
    parallel.reshard(src, placed[k])  # warm-up (compiles the transfers)
    best = min((parallel.reshard(src, placed[k])[1] for _ in range(3)),
               key=lambda r: r["seconds"])
    out[f"fsdp8_to_{k}"] = {"seconds": best["seconds"], "mb_moved": best["bytes_moved"] / 1e6,
                            "per_device_mb_after": parallel.per_device_bytes(
                                jax.device_put(src, placed[k])) / 1e6}
  return out


def reshard_bench() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--reshard_child"], env=env,
                        capture_output=True, text=True, timeout=900)
  if proc.returncode:
    return {"error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="tiny,medium")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--reshard", action="store_true", help="also time layout changes (8 devices)")
  ap.add_argument("--reshard_child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--packing", action="store_true",
                  help="also count positions vs real tokens of packed batches (paper mix)")
  ap.add_argument("--host_fraction", action="store_true",
                  help="also measure the host's share of trainer steps (demo config)")
  args = ap.parse_args()
  if args.reshard_child:
    print(json.dumps(reshard_child()))
    return
  import torch  # pylint: disable=g-import-not-at-top

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  peak = matmul_peak()
  result = {"machine": {"matmul_peak_gflops": peak, "cpu_count": os.cpu_count(),
                        "torch_threads": threads, "jax": jax.__version__,
                        "torch": torch.__version__, "backend": jax.default_backend(),
                        "loadavg_at_start": os.getloadavg()[0]},
            "dtype": "float32"}
  names = list(filter(None, args.configs.split(",")))
  runs = {name: run_config(name, args.repeats, peak) for name in names}
  peak_end = matmul_peak()
  result["machine"]["matmul_peak_gflops_start_end"] = [peak, peak_end]
  if peak_end > peak:  # rescale MFU to the larger peak
    for r in runs.values():
      for who in ("mar", "hf_torch"):
        for algo in ("ppo", "grpo"):
          r[who][algo]["mfu"] *= peak / peak_end
    result["machine"]["matmul_peak_gflops"] = peak_end
  result.update(runs)
  if args.reshard:
    result["reshard"] = reshard_bench()
  if args.host_fraction:
    result["host_fraction"] = host_fraction()
  if args.packing:
    result["packing"] = packing_counts()
  result["machine"]["loadavg_at_end"] = os.getloadavg()[0]
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
