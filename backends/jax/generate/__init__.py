"""Generation: a key/value-cache sampler for every decoder family, and what is built on it.

sampler.py    make_sampler, generate, stream: prefill + jitted decode loop (the library API)
sampling.py   SamplingConfig and the rules (greedy, temperature, top-k, top-p, min-p)
"""
