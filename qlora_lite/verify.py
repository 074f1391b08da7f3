"""How an export is checked before it is kept: the probe prompts, and how close each kind of output must stay.

Both exports compare what they wrote with what they were made from, on the same probe prompts:
merge compares the merged model's logits with base + adapter (transformers on both sides), the GGUF
export compares llama.cpp's logits with transformers' on the merged folder. Each difference is
max |logit difference| / max(1, max |reference logit|), over the last (GGUF) or every (merge) token
of each probe, and must stay under the tolerance of the output's type. Checking holds a second
model in fp32, so above AUTO_VERIFY_MAX_PARAMS it is opt-in (--verify).
"""

from __future__ import annotations

# Prompts run through both sides to compare logits; any text works, these mix prose, code and an instruction header.
PROBE_PROMPTS = (
    "The capital of France is",
    "def add(a, b):\n    return a + b",
    "Below is an instruction that describes a task. Write a response.",
)
# merge, by output dtype: the merged weights are rounded once to it (fp32 unit roundoff 6e-8, fp16 5e-4,
# bf16 4e-3); the margins leave room for that rounding to add up through the layers of a deep model.
MERGE_REL_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# export-gguf, by --type: a gate against a wrong conversion (a tensor mapped or rotated wrongly moves logits
# by about their own size), not a quality bar. Measured on the probes: the demo f16 2.4e-4, bf16 3.9e-3,
# q8_0 4.7e-3, q4_k_m 1.2e-2; a random-weight Phi-3 (tests/export/test_gguf.py) f16 2.0e-3. bf16 keeps
# 8 mantissa bits, q4_k_m about 4.5 bits per weight.
GGUF_REL_TOL = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2, "q4_k_m": 0.25}
AUTO_VERIFY_MAX_PARAMS = 1_000_000_000
"""Above this many parameters, checking (a second full model in fp32) is opt-in, so that an 8B merge stays within one shard."""


def relative_logit_difference(reference, other) -> float:
    """max |other - reference| / max(1, max |reference|): how every check here measures two sets of logits (numpy arrays)."""
    return float(abs(other - reference).max()) / max(1.0, float(abs(reference).max()))


def decide_verify(verify: bool | None, num_parameters: int) -> bool:
    """--verify / --no-verify as given; unset (None): check models of at most AUTO_VERIFY_MAX_PARAMS parameters."""
    return num_parameters <= AUTO_VERIFY_MAX_PARAMS if verify is None else verify


def describe_skipped_check(num_parameters: int, what: str) -> str:
    """The note a report carries when the check was skipped for size; `what` says what --verify would compare."""
    return (
        f"verification skipped: {num_parameters / 1e9:.2f}B parameters (> {AUTO_VERIFY_MAX_PARAMS / 1e9:.0f}B); "
        f"pass --verify to compare {what}"
    )
