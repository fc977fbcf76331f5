"""`ftc run` with training.objective = "grpo" or "ppo": rollout -> score -> update rounds inside the
ordinary training loop (train/loop.py: progress bar, metrics.jsonl + TensorBoard, checkpoints,
stop signals), fed by a `RolloutFeed` in place of the data pipeline's batch iterator.

    data = prompt_data(spec, tokenizer)                 # the prompt rows, tokenised once
    feed = RolloutFeed(spec, data, model, tokenizer, model_dir, hf_config, mesh)
    steps = feed.wrap(steps)                            # records the state each step returns
    train_iter = feed.start(state, data_state)          # next(): a rollout batch (rl/rollout.py)

Each round takes the next batch_size / grpo_group_size prompts (PPO: batch_size prompts, one
completion each; every prompt once per epoch, in the order training.seed shuffles them), samples
their completions with the current policy (generate/ sampler, a key split off the feed's key
chain), scores them (rl/rewards.py) and yields the batch (rl/rollout.py) for
<objective>_updates_per_rollout optimizer steps. The keys both objectives share are read by their
prefix (`RLKeys`), so one feed serves both. The feed's
state -- the round, the updates done on its batch, the sampler's key and, between a round's
updates, the batch itself (its old log-probs were computed with parameters no checkpoint keeps)
-- is saved with every checkpoint as the data iterator's state, so a resumed run samples exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import base64
import dataclasses
import time

import jax
import numpy as np

from ftc.backends.jax.data import formats
from ftc.backends.jax.data.clean import clean_rows
from ftc.backends.jax.data.read import DataError, read_rows
from ftc.backends.jax.generate.sampler import make_sampler
from ftc.backends.jax.generate.source import context_length, eos_ids
from ftc.backends.jax.generate.text import decode
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.rl import reward_model
from ftc.backends.jax.rl import rewards as rw
from ftc.backends.jax.rl.rollout import (
    RolloutConfig,
    logps_function,
    policy_function,
    ppo_update_batch,
    sample_groups,
    update_batch,
)
from ftc.backends.jax.train.step import REFERENCE

FORMAT = "prompt"


@dataclasses.dataclass(frozen=True)
class RLKeys:
    """The training keys GRPO and PPO share, read by their prefix (`grpo_`, `ppo_`)."""

    objective: str
    rewards: tuple[dict, ...]
    max_new_tokens: int
    temperature: float
    updates: int
    group_size: int  # completions per prompt: grpo_group_size; PPO samples one
    kl: float  # weight of the reference policy (grpo_beta, ppo_kl_coef); 0: no reference is computed


KL_KEYS = {"grpo": "beta", "ppo": "kl_coef"}  # the key naming each objective's reference weight


def rl_keys(spec) -> RLKeys:
    t = spec.training
    prefix = t.objective

    def key(name, default=None):
        return getattr(t, f"{prefix}_{name}", default)

    return RLKeys(
        prefix,
        tuple(key("rewards") or ()),
        key("max_new_tokens"),
        key("temperature"),
        key("updates_per_rollout"),
        key("group_size") or 1,
        float(key(KL_KEYS[prefix]) or 0.0),
    )


@dataclasses.dataclass(frozen=True)
class PromptStats:
    """What the run's data_stats.json holds for prompt data."""

    format: str
    train_files: tuple[str, ...]
    rows_read: int
    bad_rows_skipped: int
    bad_row_examples: tuple[str, ...]
    prompts: int
    with_answer: int
    prompt_tokens_max: int
    prompt_tokens_mean: float
    dropped: dict = dataclasses.field(default_factory=dict)  # rows data.clean left out, by reason

    def summary(self) -> str:
        return (
            f"data: {self.prompts} prompts ({self.with_answer} with an answer) from {', '.join(self.train_files)}; "
            f"prompt tokens mean {self.prompt_tokens_mean:.1f}, max {self.prompt_tokens_max}"
            + (f"; {self.bad_rows_skipped} bad rows skipped" if self.bad_rows_skipped else "")
            + (f"; dropped {', '.join(f'{n} {why}' for why, n in self.dropped.items())}" if self.dropped else "")
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PromptData:
    ids: tuple[tuple[int, ...], ...]  # each prompt's token ids (chat template + generation prompt)
    answers: tuple[str | None, ...]
    where: tuple[str, ...]  # file:line of each prompt
    stats: PromptStats
    steps_per_epoch: int  # optimizer steps that see every prompt once
    validation_rows: None = None  # no validation pass: the rewards are the run's measure
    conversations: tuple = ()  # each prompt's messages (what a model reward scores with the completion)


def prompt_data(spec, tokenizer) -> PromptData:
    """The spec's prompt rows, tokenised; DataError naming file:line for a prompt that leaves no
    room for <objective>_max_new_tokens in model.max_seq_len, or a row without the answer a reward needs."""
    t, k = spec.training, rl_keys(spec)
    read = read_rows(spec.data.train_sources, format=FORMAT, on_bad_row=spec.data.on_bad_row)
    if not read.rows:  # every row skipped as malformed (on_bad_row = "skip"): nothing to sample from
        raise DataError(
            f"{', '.join(read.files)}: no prompt rows left: all {len(read.skipped)} were malformed and skipped",
            read.skipped,
        )
    # data.clean as for every other format (it was ignored here): duplicate and empty prompts,
    # message roles, and overlong = "drop" leaves out a prompt with no room to generate (the other
    # choices refuse it: a prompt cut short asks another question).
    c = spec.data.clean
    rows, report = clean_rows(
        read.rows,
        format=FORMAT,
        dedupe=c.dedupe,
        drop_empty=c.drop_empty,
        roles=c.roles,
        unknown_roles=c.unknown_roles,
    )
    dropped = {why: n for why, n in report.dropped if n}
    fmt = formats.get(FORMAT)
    room = spec.model.max_seq_len - k.max_new_tokens + 1
    needing = [r.label for r in rw.parse(k.rewards, f"training.{k.objective}_rewards") if r.needs_answer]
    ids, kept, problems = [], [], []
    for row in rows:
        row_ids = tuple(fmt.tokenize(tokenizer, [row], None, None)[0].ids.tolist())
        if len(row_ids) > room and c.overlong == "drop":
            dropped["overlong"] = dropped.get("overlong", 0) + 1
            continue
        if len(row_ids) > room:
            problems.append(
                f"{row.where}: the prompt has {len(row_ids)} tokens; model.max_seq_len "
                f"({spec.model.max_seq_len}) - training.{k.objective}_max_new_tokens + 1 leaves {room} "
                '(data.clean.overlong = "drop" leaves such prompts out)'
            )
        if needing and row.data["answer"] is None:
            problems.append(f'{row.where}: no "answer", which reward(s) {", ".join(needing)} compare with')
        ids.append(row_ids)
        kept.append(row)
    if problems:
        raise DataError(f"{len(problems)} prompt row(s) cannot be used for {k.objective.upper()}", problems)
    if not kept:
        why = "".join(f", {n} {reason}" for reason, n in dropped.items())  # as CleanReport.summary
        files = ", ".join(read.files)
        raise DataError(f"{files}: no prompt rows left after cleaning (kept 0 of {len(read.rows)}{why})")
    rows = kept
    per_round = t.batch_size // k.group_size
    lengths = [len(x) for x in ids]
    stats = PromptStats(
        FORMAT,
        tuple(read.files),
        len(read.rows),
        len(read.skipped),
        tuple(read.skipped[:5]),
        len(ids),
        sum(r.data["answer"] is not None for r in rows),
        max(lengths),
        float(np.mean(lengths)),
        dropped,
    )
    rounds = -(-len(ids) // per_round)
    answers = tuple(r.data["answer"] for r in rows)
    where = tuple(r.where for r in rows)
    conversations = tuple(tuple(r.data["messages"]) for r in rows)
    return PromptData(tuple(ids), answers, where, stats, rounds * k.updates, None, conversations)


class RolloutFeed:
    """The batch iterator of a GRPO or PPO run (module docstring): `next()` gives the current round's
    batch, rolling out a new round when the last one has had its updates; `get_state()` is saved
    with each checkpoint."""

    def __init__(self, spec, data: PromptData, model, tokenizer, model_dir, hf_config, mesh):
        t, k = spec.training, rl_keys(spec)
        eos = eos_ids(model_dir, hf_config, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        self.config = RolloutConfig(
            group_size=k.group_size,
            max_new_tokens=k.max_new_tokens,
            temperature=k.temperature,
            eos_ids=tuple(eos),
            pad_id=int(pad),
        )
        self.rewards = rw.parse(k.rewards, f"training.{k.objective}_rewards")
        self.scorers = {r.label: reward_model.load(r) for r in self.rewards if r.kind == "model"}
        self.data, self.model, self.tokenizer = data, model, tokenizer
        # The update rows hold model.max_seq_len positions, and prompt_data checked each prompt plus
        # max_new_tokens against it. A rotary model runs past config.json's max_position_embeddings
        # (the plan notes it; a learned position table refuses it), so the sampler may too: with the
        # config's length it cut every completion at max_position_embeddings - prompt, silently.
        context = max(context_length(hf_config), spec.model.max_seq_len)
        self.sampler = make_sampler(model.family, model.arch, model.eval_module, context=context, mesh=mesh)
        # The rollout's log-probs (the ratio's denominator, the reference's) are the sampling
        # policy's: the module without training-only noise, as the sampler runs it. With the train
        # module a LoRA dropout drew one fixed mask (key 0) into every rollout's old log-probs.
        self.logps = logps_function(model.eval_module, k.temperature)
        self.seq_len = spec.model.max_seq_len
        self.per_round = t.batch_size // k.group_size
        self.updates = k.updates
        self.beta = k.kl
        self.make_batch = BATCHES[k.objective](spec, model, self)
        self.seed, self.shuffle = t.seed, spec.data.shuffle
        self.state = None  # the train state the next rollout samples with (set by the wrapped step)
        self.round, self.used, self.batch, self.extra = 0, 0, None, {}
        self.key = jax.random.key(t.seed)

    # ------------------------------------------------------------ the loop's side

    def wrap(self, steps):
        """`steps` whose train step records the state it returns (the next rollout's policy) and
        adds the round's rollout metrics and the update's seconds to its metrics."""
        train = steps.train

        def recorded(state, batch):
            began = time.perf_counter()
            state, metrics = train(state, batch)
            jax.block_until_ready(metrics)  # the next rollout needs these parameters anyway
            self.state = state
            return state, {**metrics, **self.extra, "time/update_seconds": time.perf_counter() - began}

        return dataclasses.replace(steps, train=recorded)

    def start(self, state: dict, saved: dict | None) -> RolloutFeed:
        """Begin at `state` (step 0's, or a checkpoint's with the feed state saved beside it)."""
        self.state = state
        if saved is not None:
            self.round, self.used, self.extra = saved["round"], saved["used"], saved["extra"]
            self.key = jax.random.wrap_key_data(np.asarray(saved["key"], np.uint32))
            self.batch = None if saved["batch"] is None else _decode_arrays(saved["batch"])
        return self

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.batch is None or self.used >= self.updates:
            self._rollout()
        self.used += 1
        return self.batch

    def get_state(self) -> dict:
        mid_round = self.batch is not None and self.used < self.updates
        return {
            "round": self.round,
            "used": self.used,
            "key": np.asarray(jax.random.key_data(self.key)).tolist(),
            "batch": _encode_arrays(self.batch) if mid_round else None,
            "extra": self.extra,
        }

    # ------------------------------------------------------------ one round

    def _prompt_indices(self, r: int) -> list[int]:
        n = len(self.data.ids)
        out = []
        for j in range(r * self.per_round, (r + 1) * self.per_round):
            epoch = j // n
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            out.append(int(order[j % n]))
        return out

    def _rollout(self) -> None:
        began = time.perf_counter()
        picked = self._prompt_indices(self.round)
        self.key, sub = jax.random.split(self.key)
        params = self.state["params"]
        prompts = [self.data.ids[i] for i in picked]
        repeated, completions = sample_groups(self.sampler, params, prompts, sub, self.config)
        g = self.config.group_size
        answers = [self.data.answers[i] for i in picked for _ in range(g)]
        texts = [decode(self.tokenizer, c) for c in completions]
        lengths = [len(c) for c in completions]
        conversations = [self.data.conversations[i] for i in picked for _ in range(g)]
        where = [self.data.where[i] for i in picked for _ in range(g)]
        total, parts = rw.score(
            self.rewards, texts, lengths, answers, conversations=conversations, models=self.scorers, where=where
        )
        reference = None
        if self.beta:
            reference = (
                self.state[REFERENCE] if REFERENCE in self.state else methods.disabled_params(self.model, params)
            )
        self.batch, batch_metrics = self.make_batch(repeated, completions, total, params, reference)
        eos = set(self.config.eos_ids)
        clipped = [
            n == self.config.max_new_tokens and (not c or c[-1] not in eos) for n, c in zip(lengths, completions)
        ]
        self.extra = {
            **rw.metrics(total, parts, g),
            **batch_metrics,
            "completions/max_length": float(max(lengths)),
            "completions/min_length": float(min(lengths)),
            "completions/clipped_ratio": float(np.mean(clipped)),
            "time/rollout_seconds": time.perf_counter() - began,
        }
        self.round += 1
        self.used = 0


def _grpo_batch(spec, model, feed: RolloutFeed):
    def make(prompts, completions, total, params, reference):
        return update_batch(prompts, completions, total, feed.config, feed.seq_len, feed.logps, params, reference), {}

    return make


def _ppo_batch(spec, model, feed: RolloutFeed):
    t = spec.training
    policy = policy_function(model.eval_module, t.ppo_temperature)  # as feed.logps: no dropout

    def make(prompts, completions, total, params, reference):
        return ppo_update_batch(
            prompts,
            completions,
            total,
            feed.seq_len,
            policy,
            feed.logps,
            params,
            reference,
            kl_coef=feed.beta,
            gamma=t.ppo_gamma,
            lam=t.ppo_lambda,
        )

    return make


# (spec, MethodModel, feed) -> (prompts, completions, rewards, params, reference) -> (batch, metrics)
BATCHES = {"grpo": _grpo_batch, "ppo": _ppo_batch}


def _encode_arrays(tree: dict) -> dict:
    """A batch of numpy arrays (nested dicts) as JSON: each array's dtype, shape and bytes."""
    return {
        k: _encode_arrays(v)
        if isinstance(v, dict)
        else {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v)), "b64": _b64(v)}
        for k, v in tree.items()
    }


def _b64(v) -> str:
    return base64.b64encode(np.ascontiguousarray(v).tobytes()).decode("ascii")


def _decode_arrays(tree: dict) -> dict:
    return {
        k: np.frombuffer(base64.b64decode(v["b64"]), np.dtype(v["dtype"])).reshape(v["shape"]).copy()
        if "b64" in v
        else _decode_arrays(v)
        for k, v in tree.items()
    }
