"""Generation: a key/value-cache sampler for every decoder family, and what is built on it.

The library API (what `ftc generate`, `ftc chat`, `ftc eval`, RL rollouts and export checks use):

    from ftc.backends.jax.generate.sampler import GenerateConfig, generate, make_sampler, stream
    from ftc.backends.jax.generate.sampling import SamplingConfig

    sampler = make_sampler(family, arch, module, context=n_positions, mesh=mesh)   # once per model
    completions = generate(sampler, params, prompts, key, GenerateConfig(64, SamplingConfig(0.7, top_p=0.9),
                                                                         eos_ids=(2,)))
    completions[i].tokens, completions[i].finish      # ("stop" | "stop_string" | "length")

`generate` is a pure function of (params, prompts, key, config); `stream` yields snapshots while
decoding (and takes a host `stop` predicate). Modules:

    sampler.py      prefill + one jitted decode loop over models/kv_cache.py, bucketing, streaming
    sampling.py     SamplingConfig: greedy, temperature, top-k, top-p, min-p (transformers' order)
    source.py       SOURCE (run dir, export, model source) -> model, params, tokenizer, EOS ids
    text.py         chat-template prompts, stop strings, streamed text
    prompt_rows.py  JSONL prompt files (OpenAI chat rows / prompt rows, references)
    session.py      what `ftc generate` and `ftc chat` do with a Source
    metrics.py      exact match, contains, regex, ROUGE-L
    evaluate.py     `ftc eval`: loss / perplexity / token accuracy + generation metrics
    in_run.py       the [eval] hook `ftc run` calls after each validation
"""
