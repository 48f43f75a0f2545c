"""KV-cache sampling: prefill, while-loop decode, turn appends, on-device stop predicates."""

from mar.models.model import stack_layers, unstack_layers
from mar.sampling.generation import GenerateResult, generate, pad_prompts, prompt_bucket
from mar.sampling.sample import SamplingParams, argmax, categorical, filtered_logits, sample
from mar.sampling.sampler import (
    FINISH_LENGTH,
    FINISH_NAMES,
    FINISH_NONE,
    FINISH_PREDICATE,
    FINISH_STOP_TOKEN,
    SamplerState,
    append,
    decode,
    prefill,
    rewind,
)
from mar.sampling.stop import (
    BOX_OPEN,
    StopPredicate,
    boxed_stop_predicate,
    boxed_tables,
    host_has_closed_box,
)
