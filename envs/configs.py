"""Named configs of ``esx train`` and the help text that lists them.

``esx train cartpole population_size=512 sigma=0.1`` starts from :data:`CONFIGS` ``["cartpole"]`` and replaces the
named fields (:func:`esx.run.apply_overrides`). ``esx train <kind>`` (any task kind registered under the
``esx.tasks`` entry points, a third-party one included) starts from that kind's class defaults.

The config classes, one per job, each validating itself:

* :class:`esx_envs.rl.RLConfig` (kind ``"rl"``): a gymnax policy, fitness = episode return;
* :class:`esx_envs.egg.task.EggRunConfig` (``"egg"``): the integer-only byte LM trained by integer EGGROLL;
* :class:`esx_envs.llm.config.LLMConfig` (``"llm"``): a pretrained Llama-family LM on a verifiable task.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing

from esx.run import ConfigError, RunConfig, apply_overrides, config_from_dict, task_class, task_classes, to_dict
from esx.run.config import field_names
from esx_envs.egg.task import EggRunConfig
from esx_envs.llm.config import LLMConfig
from esx_envs.rl.paper import PAPER_CONFIGS
from esx_envs.rl.task import RLConfig

CONFIGS: dict[str, RunConfig] = {
    "cartpole": RLConfig(
        name="cartpole", env="CartPole-v1", generations=300, population_size=256, rank=4, sigma=0.2,
        optimizer="sgd", learning_rate=0.1, width=32, depth=2, episodes=1, eval_every=10, eval_episodes=32,
        target_return=499.0, chunk=10,
    ),
    "acrobot": RLConfig(
        name="acrobot", env="Acrobot-v1", generations=200, population_size=256, rank=4, sigma=0.2,
        optimizer="sgd", learning_rate=0.1, width=32, depth=2, episodes=1, eval_every=10, target_return=-80.0,
    ),
    "pendulum": RLConfig(
        name="pendulum", env="Pendulum-v1", generations=1000, population_size=512, rank=4, sigma=0.05,
        optimizer="adam", learning_rate=0.01, width=64, depth=2, episodes=2, action_mode="greedy",
        obs_norm=False, eval_every=20, chunk=10, checkpoint_every=100,
    ),
    "minatar-breakout": RLConfig(
        name="minatar-breakout", env="Breakout-MinAtar", generations=400, population_size=256, rank=4,
        sigma=0.1, optimizer="adam", learning_rate=0.01, width=64, depth=2, episodes=1, action_mode="stochastic",
        eval_every=10, eval_episodes=16, final_eval_episodes=100, chunk=5, checkpoint_every=50,
    ),
    # alpha_decay: 0.0005 keeps α_t large enough for runs of tens of thousands of generations (measured in
    # docs/egg.md: 4.09 bits/byte at 9.7 minutes vs 4.46 at 9 minutes with 0.003).
    "egg-shakespeare": EggRunConfig(name="egg-shakespeare", alpha_decay=0.0005),
    # 2-digit addition without the system turn (SmolLM2-135M: ~25-30% greedy before training); antithetic pairs
    # with 2 prompts each, so most pairs see a reward difference; recipe rehearsed on an H100 (docs/llm.md).
    "llm-arithmetic": LLMConfig(
        name="llm-arithmetic", system_prompt="none", generations=1000, population_size=32, group_size=2,
        prompts_per_member=2, learning_rate=2e-4, max_new_tokens=16, val_size=64, eval_every=20,
        checkpoint_every=20,
    ),
    # Countdown, 2 numbers in [1, 40], targets up to 200, read leniently (the last equation of a completion without
    # answer tags). SmolLM2-135M's greedy accuracy before training: 32.0% on the 128 validation problems (61 distinct
    # puzzles), 15.6% on the 64 tuning problems (docs/llm.md; inside the 5-40% band). 3 numbers gave 0.8-6%
    # on validation (from fewer distinct puzzles) and wider 2-number ranges 43-52% (mostly sums). Validation and tuning puzzles come from their own 5% hash
    # buckets (disjoint), so training never sees them; the best evaluation is kept in best/.
    "llm-countdown": LLMConfig(
        name="llm-countdown", task="countdown", numbers=2, min_number=1, max_number=40, min_target=1,
        max_target=200, lenient=True, generations=1000, population_size=32, group_size=2, prompts_per_member=2,
        learning_rate=2e-4, max_new_tokens=32, val_size=128, tune_size=64, disjoint=True, eval_every=25,
        checkpoint_every=25, keep_best=True,
    ),
    "llm-tiny-digits": LLMConfig(
        name="llm-tiny-digits", model="tiny", task="digits", digits=1, generations=30, population_size=32,
        group_size=8, prompts_per_member=2, sigma=0.05, optimizer="adam", learning_rate=0.02, max_new_tokens=24,
        val_size=16, eval_every=10, checkpoint_every=20,
    ),
}

# The paper's 16 RL environments with its EGGROLL settings and policy (esx_envs.rl.paper; docs/rl.md, "More suites").
CONFIGS.update(PAPER_CONFIGS)


#: the kind of a saved config without a ``"kind"`` field (written before kinds existed: RL runs).
LEGACY_KIND = "rl"


def from_dict(d: dict) -> RunConfig:
    """The config of a saved dict (``config.json``); one without ``"kind"`` is an RL config (:data:`LEGACY_KIND`)."""
    return config_from_dict(d, default_kind=LEGACY_KIND)


def get_config(name: str) -> RunConfig:
    """The named config, or the class defaults of a registered task kind (named ``name``); an unknown name raises
    :class:`ConfigError` listing the valid names."""
    if name in CONFIGS:
        return CONFIGS[name]
    kinds = task_classes()
    if name in kinds:
        return task_class(name)(name=name)
    valid = sorted(CONFIGS) + sorted(k for k in kinds if k not in CONFIGS)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown config {name!r}{hint}; valid configs are {sorted(CONFIGS)}, or a task kind: "
                      f"{sorted(kinds)}")


def describe(config: RunConfig | None = None) -> str:
    """A help text: the named configs, then the fields of ``config``'s class with ``config``'s values (or, without
    a config, of every registered kind with its class defaults)."""
    width = max(len(n) for n in CONFIGS) + 2
    lines = ["configs:"] + [f"  {name:<{width}}{cfg.summary()}" for name, cfg in CONFIGS.items()]
    kinds = task_classes()
    if config is not None:
        sections = [(f"{config.name} ({type(config).__name__}, kind {config.KIND!r}); override with field=value, "
                     "its values shown", type(config), config)]
    else:
        sections = [(f"{kind} fields ({cls.__name__}); override with field=value, class defaults shown", cls, None)
                    for kind, cls in ((k, task_class(k)) for k in sorted(kinds))]
    for title, cls, values in sections:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        name_w = max(len(f.name) for f in fields) + 2
        type_w = max(len(_type_name(hints[f.name])) for f in fields) + 2
        lines.append(f"\n{title}:")
        for f in fields:
            value = getattr(values, f.name) if values is not None else f.default
            lines.append(f"  {f.name:<{name_w}}{_type_name(hints[f.name]):<{type_w}}{value!r}")
    return "\n".join(lines)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


__all__ = ["CONFIGS", "LEGACY_KIND", "ConfigError", "EggRunConfig", "LLMConfig", "RLConfig", "apply_overrides", "describe",
           "field_names", "from_dict", "get_config", "to_dict"]
