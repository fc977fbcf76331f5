"""alpaca: Stanford Alpaca instruction rows, trained as completion rows.

Row: `{"instruction", optional "input", "output"}`, strings (`input` may be empty or absent);
Databricks Dolly's `{"instruction", "context", "response"}` read alike.
Normalised: the completion format's `{"prompt", "completion"}`, the prompt written with Alpaca's
own template (with or without its "### Input:" block) and the completion the output, so
everything after reading (train_on, packing) is completion's.
"""

from __future__ import annotations

import dataclasses

from ftc.backends.jax.data.formats import completion
from ftc.backends.jax.data.read import BadRow, expect_object, expect_string, kind_of

# The prompts of the Stanford Alpaca repository (train.py, PROMPT_DICT), verbatim.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def normalise(record) -> dict:
    record = expect_object(record)
    instruction = expect_string(record, "instruction")
    # Databricks Dolly's rows name the same fields context and response.
    input_key = "context" if "input" not in record and "context" in record else "input"
    extra = record.get(input_key)
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"{input_key!r} is {kind_of(extra)}, expected a string (or no {input_key!r})")
    output = expect_string(record, "response" if "output" not in record and "response" in record else "output")
    if extra and extra.strip():
        prompt = PROMPT_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = PROMPT_NO_INPUT.format(instruction=instruction)
    return {"prompt": prompt, "completion": output}


FORMAT = dataclasses.replace(completion.FORMAT, name="alpaca", normalise=normalise)
