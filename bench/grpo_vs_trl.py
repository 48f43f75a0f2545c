"""A whole GRPO step, mar vs Hugging Face TRL's GRPOTrainer, on the same work (CPU).

  python bench/grpo_vs_trl.py                 # steps 0..8, median of steps 3..8, both sides
  python bench/grpo_vs_trl.py --side=mar      # one side only
  python bench/grpo_vs_trl.py --pack_len=0    # mar with padded learner batches
  python bench/grpo_vs_trl.py --side=mar --profile=/tmp/trace   # + XLA op time per program

The work: `configs/demo.py:lte` with method=grpo on the demo model (one model folder both
load): 16 prompts x G = 8 samples, 24 new tokens, temperature 1, f32, no KL (beta = 0), one
optimizer step over all 128 sequences, lr 3e-4 constant. Both take the prompts in mar's
order (`train.batch_indices`), as the same chat texts. Reward 1 when the last \\boxed{}
answer matches (mar's verifier; TRL's reward function calls mar's `answers_match`).

Prints one JSON object: per side the median seconds per step and its split
(generation / update / other; TRL's "update" is the step minus generation), mean
response length, reward mean, and versions. TRL is optional (`pip install trl`); it is a
bench-only dependency. Timings are wall clock on a possibly shared machine: run both
sides in one process, one after the other, and compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MAR_NO_PROGRESS", "1")
_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import demo as demo_config  # noqa: E402
from mar import algorithms
from mar import demo, setup, train  # noqa: E402
from mar.lte import hints  # noqa: E402
from mar.verify import equivalence, extract  # noqa: E402

STEPS, FIRST_TIMED = 9, 3


def grpo_config(model_path: str, pack_len: int):
  config = demo_config.get_config("lte")
  config.method = "grpo"
  config.model.demo.enabled = False
  config.model.path = model_path
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  config.verify.workers = 1
  config.train.pack_len = pack_len
  config.eval.at_start = False
  return config


def step_prompts(config, run, step: int):
  idx = train.batch_indices(config, len(run.train_data), step)
  return [run.train_data[i] for i in idx]


def _median(rows, key):
  return float(np.median([r[key] for r in rows[FIRST_TIMED:]]))


PROFILED = 3  # steps FIRST_TIMED.. traced with --profile


def trace_summary(trace_dir: str, steps: int, top: int = 15) -> dict:
  """XLA:CPU op time per step from a JAX profiler trace: per program, per op kind, top ops.

  Op events nest (a while loop contains its body's ops), so loops and conditionals are left
  out of the sums; kinds are the fusion names' first word (`ynn` / `dot`: matmuls).
  """
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  path = sorted(glob.glob(os.path.join(trace_dir, "plugins/profile/*/*.trace.json.gz")))[-1]
  with gzip.open(path) as f:
    events = [e for e in json.load(f)["traceEvents"]
              if e.get("ph") == "X" and "hlo_module" in e.get("args", {})]
  programs = collections.defaultdict(lambda: collections.defaultdict(float))
  ops = collections.defaultdict(float)
  for e in events:
    name = e["args"]["hlo_op"]
    base = re.sub(r"\.\d+$", "", name)
    if base.split("_")[0] in ("while", "cond", "call", "conditional"):
      continue
    kind = "matmul" if ("ynn" in base or "dot" in base) else base.split("_")[0]
    ms = e["dur"] / 1e3 / steps
    programs[e["args"]["hlo_module"]][kind] += ms
    ops[(e["args"]["hlo_module"], name)] += ms
  out = {}
  for prog, kinds in sorted(programs.items(), key=lambda kv: -sum(kv[1].values())):
    total = sum(kinds.values())
    if total < 1.0:
      continue
    out[prog] = {"op_ms_per_step": round(total, 1),
                 "by_kind_ms": {k: round(v, 1) for k, v in
                                sorted(kinds.items(), key=lambda kv: -kv[1]) if v >= 0.5}}
  out["top_ops_ms"] = [[p, o, round(v, 1)] for (p, o), v in
                       sorted(ops.items(), key=lambda kv: -kv[1])[:top]]
  return out


def bench_mar(model_path: str, pack_len: int, profile_dir: str = "") -> dict:
  config = grpo_config(model_path, pack_len)
  run = setup.build_run(config, tempfile.mkdtemp())
  state = algorithms.family(config).init_state(config, run)
  rows = []
  for step in range(STEPS):
    if profile_dir and step == FIRST_TIMED:
      jax.profiler.start_trace(profile_dir)
    t0 = time.perf_counter()
    state, m = algorithms.group.iteration(config, run, state, step_prompts(config, run, step), step)
    total = time.perf_counter() - t0
    if profile_dir and step == FIRST_TIMED + PROFILED - 1:
      jax.profiler.stop_trace()
    rows.append({"step": total, "generation": m["time/sample"], "update": m["time/update"],
                 "other": total - m["time/sample"] - m["time/update"],
                 "response_length": m["response_length"], "reward": m["reward_mean"],
                 "real_tokens": m.get("train/real_tokens", np.nan),
                 "padded_positions": m.get("train/padded_positions", np.nan)})
  run.close()
  out = {k: _median(rows, k) for k in ("step", "generation", "update", "other")}
  out.update(response_length=float(np.mean([r["response_length"] for r in rows])),
             reward_mean=float(np.mean([r["reward"] for r in rows])),
             update_positions_per_real_token=float(np.median(
                 [r["padded_positions"] / r["real_tokens"] for r in rows])),
             pack_len=pack_len, jax=jax.__version__,
             steps=[{k: round(float(v), 4) for k, v in r.items()} for r in rows])
  if profile_dir:
    out["profile"] = {"steps": f"{FIRST_TIMED}..{FIRST_TIMED + PROFILED - 1}",
                      **trace_summary(profile_dir, PROFILED)}
  return out


def trl_records(config, run, steps: int) -> list[dict]:
  """TRL's dataset: each step's prompts in mar's order (`train.batch_indices`, seeded by
  config.seed), once each (the trainer repeats a prompt G times), as mar's chat texts."""
  return [{"prompt": hints.chat_prompt(hints.plain_prompt(ex.question)), "answer": ex.answer}
          for step in range(steps) for ex in step_prompts(config, run, step)]


def hf_policy(model_path: str):
  """(tokenizer, f32 model) of a mar model folder for TRL; generation stops at <|im_end|>
  or <|endoftext|>, as mar's rollout does."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from mar.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  tok = Tokenizer.from_dir(model_path)
  hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(model_path, "tokenizer.json"),
      eos_token="<|im_end|>", pad_token="<|endoftext|>")
  model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
  model.generation_config.eos_token_id = [tok.im_end_id, tok.eos_id]
  model.generation_config.pad_token_id = tok.pad_id
  return hf_tok, model


def answer_reward(completions, answer, **_):
  """TRL reward function: 1 when the completion's last \\boxed{} answer matches (mar's
  extraction and `answers_match`), else 0."""
  out = []
  for text, gold in zip(completions, answer):
    got = extract.extract_boxed(text)
    out.append(float(got is not None and equivalence.answers_match(got, gold)))
  return out


def bench_trl(model_path: str) -> dict:
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  config = grpo_config(model_path, -1)
  run = setup.build_run(config, tempfile.mkdtemp())  # for the data order and the tokenizer
  records = trl_records(config, run, STEPS)
  run.close()
  hf_tok, model = hf_policy(model_path)
  g = config.grpo.group_size
  args = trl.GRPOConfig(
      output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(records) // STEPS * g,
      num_generations=g, max_completion_length=config.rollout.token_budget, beta=0.0,
      num_iterations=1, gradient_accumulation_steps=1, steps_per_generation=1,
      learning_rate=config.grpo.lr, lr_scheduler_type="constant", warmup_steps=0,
      temperature=config.rollout.temperature, top_p=1.0, max_steps=STEPS, logging_steps=1,
      report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=config.seed,
      shuffle_dataset=False, max_grad_norm=config.optim.grad_clip,
      adam_beta1=config.optim.b1, adam_beta2=config.optim.b2, loss_type="grpo")
  data = datasets.Dataset.from_list(records)  # each prompt once; the trainer repeats it G times
  timings = {"generation": []}

  trainer = trl.GRPOTrainer(model=model, reward_funcs=answer_reward, args=args,
                            train_dataset=data, processing_class=hf_tok)
  generate = trainer._generate_single_turn  # pylint: disable=protected-access

  def timed_generate(*a, **kw):
    t0 = time.perf_counter()
    out = generate(*a, **kw)
    timings["generation"].append(time.perf_counter() - t0)
    return out

  trainer._generate_single_turn = timed_generate  # pylint: disable=protected-access
  steps = []

  class StepTimer(transformers.TrainerCallback):

    def on_step_begin(self, *a, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, *a, **kw):
      steps.append(time.perf_counter() - self.t0)

  trainer.add_callback(StepTimer())
  with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs: keep JSON clean
    trainer.train()
  logs = [h for h in trainer.state.log_history if "reward" in h]
  rows = [{"step": s, "generation": gen, "update": s - gen, "other": 0.0}
          for s, gen in zip(steps, timings["generation"])]
  out = {k: _median(rows, k) for k in ("step", "generation", "update", "other")}
  out.update(response_length=float(np.mean([h.get("completions/mean_length", np.nan)
                                            for h in logs])),
             reward_mean=float(np.mean([h["reward"] for h in logs])),
             trl=trl.__version__, torch=torch.__version__,
             transformers=transformers.__version__, torch_threads=torch.get_num_threads(),
             steps=[{k: round(float(v), 4) for k, v in r.items()} for r in rows])
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--side", default="both", choices=["both", "mar", "trl"])
  ap.add_argument("--pack_len", type=int, default=-1)
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mar_grpo_vs_trl"))
  ap.add_argument("--model_path", default="", help="a demo model folder (default: build one)")
  ap.add_argument("--profile", default="",
                  help="trace mar's steps 3-5 with the JAX profiler into this folder and add "
                       "their XLA op time per program / kind / op to the JSON (slows them)")
  args = ap.parse_args()
  model_path = args.model_path or demo.ensure_demo_model(demo_config.get_config("lte"),
                                                         args.workdir)
  result = {"machine": {"cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg()[0]},
            "work": "configs/demo.py:lte method=grpo: 16 prompts x 8, 24 new tokens, f32, "
                    "beta 0, one update over 128 sequences; median of steps 3-8"}
  if args.side in ("both", "mar"):
    result["mar"] = bench_mar(model_path, args.pack_len, args.profile)
  if args.side in ("both", "trl"):
    result["trl"] = bench_trl(model_path)
  if "mar" in result and "trl" in result:
    result["mar_over_trl"] = result["mar"]["step"] / result["trl"]["step"]
  result["machine"]["loadavg_at_end"] = os.getloadavg()[0]
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
