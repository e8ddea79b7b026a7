"""The paper's 16 RL environments as named configs of ``esx train`` (EGGROLL, Sarkar et al. 2025, the RL table).

:data:`PAPER_SETTINGS` holds each environment's chosen EGGROLL setting as the paper reports it (population, rank,
σ, learning rate in the paper's convention, optimizer); :data:`PAPER_CONFIGS` turns them into
:class:`~esx_envs.rl.RLConfig` s with the paper's policy (MLP 3×256, LayerNorm then ReLU: ``width=256, depth=3,
layer_norm=True``). :mod:`esx_envs.configs` adds them to ``CONFIGS`` (``esx train brax-ant``).

Learning rates: esx steps by ``lr · g`` on the textbook ES gradient estimate, the paper's code by
``lr_paper · √N σ² · g`` (:func:`esx.paper_learning_rate`). SGD rates are converted with that function; Adam and
AdamW rates are used as given (Adam normalises the gradient's scale, so the same rate gives the same steps up to
its ``eps``). Observation normalisation (``obs_norm``) is on for the suites with unbounded real-valued observations
(Brax, Kinetix's symbolic vectors) and off for bounded or categorical ones (gymnax classic control, Craftax's
``[0, 1]`` features, Jumanji and Navix grids): our choice, not read from the paper's code.
"""
from __future__ import annotations

from typing import NamedTuple

import esx
from esx_envs.rl.task import RLConfig


class PaperSetting(NamedTuple):
    """One environment's row: ``env`` (an ``esx`` env name), the paper's name for it and its EGGROLL setting."""

    env: str
    paper_name: str
    population_size: int
    rank: int
    sigma: float
    paper_lr: float
    optimizer: str


#: config name -> the paper's chosen EGGROLL setting (issue #25 quotes the paper's table).
PAPER_SETTINGS: dict[str, PaperSetting] = {
    "paper-cartpole": PaperSetting("CartPole-v1", "CartPole-v1", 2048, 4, 0.2, 0.1, "sgd"),
    "paper-pendulum": PaperSetting("Pendulum-v1", "Pendulum-v1", 4096, 4, 0.05, 0.01, "adam"),
    "brax-ant": PaperSetting("brax:ant", "Ant", 2048, 1, 0.05, 0.01, "adam"),
    "brax-humanoid": PaperSetting("brax:humanoid", "Humanoid", 4096, 1, 0.2, 0.1, "adam"),
    "brax-idp": PaperSetting("brax:inverted_double_pendulum", "Inverted Double Pendulum", 2048, 2, 0.5, 0.1, "adam"),
    "craftax-classic": PaperSetting("craftax:Craftax-Classic-Symbolic-v1", "Craftax Classic-Symbolic", 2048, 1,
                                    0.05, 0.01, "sgd"),
    "craftax-symbolic": PaperSetting("craftax:Craftax-Symbolic-v1", "Craftax Symbolic", 512, 4, 0.05, 0.01, "sgd"),
    "jumanji-2048": PaperSetting("jumanji:Game2048-v1", "Game2048", 1024, 1, 0.5, 0.1, "adamw"),
    "jumanji-knapsack": PaperSetting("jumanji:Knapsack-v1", "Knapsack", 1024, 4, 0.05, 0.1, "sgd"),
    "jumanji-snake": PaperSetting("jumanji:Snake-v1", "Snake", 4096, 1, 0.05, 0.001, "adam"),
    "kinetix-hard-pinball": PaperSetting("kinetix:l/hard_pinball", "hard_pinball", 2048, 4, 0.05, 0.01, "sgd"),
    "kinetix-thrust-left": PaperSetting("kinetix:m/h17_thrustcontrol_left", "h17_thrustcontrol_left", 512, 4, 0.5,
                                        0.1, "sgd"),
    "kinetix-thrust-over-ball": PaperSetting("kinetix:s/h1_thrust_over_ball", "h1_thrust_over_ball", 512, 1, 0.5,
                                             0.1, "adamw"),
    "navix-doorkey": PaperSetting("navix:Navix-DoorKey-8x8-v0", "DoorKey-8x8", 1024, 1, 0.05, 0.01, "adamw"),
    "navix-dynamic-obstacles": PaperSetting("navix:Navix-Dynamic-Obstacles-6x6-Random-v0",
                                            "Dynamic-Obstacles-6x6-Random", 512, 2, 0.05, 0.01, "adam"),
    "navix-fourrooms": PaperSetting("navix:Navix-FourRooms-v0", "FourRooms", 2048, 4, 0.05, 0.01, "sgd"),
}

#: The suites whose observations are normalised (see the module docstring).
OBS_NORM_PREFIXES = ("brax:", "kinetix:")


def esx_learning_rate(setting: PaperSetting) -> float:
    """The setting's learning rate in esx's convention: SGD converted by :func:`esx.paper_learning_rate`, Adam and
    AdamW unchanged."""
    if setting.optimizer == "sgd":
        return esx.paper_learning_rate(setting.paper_lr, sigma=setting.sigma,
                                       population_size=setting.population_size)
    return setting.paper_lr


def paper_config(name: str, setting: PaperSetting) -> RLConfig:
    """The named :class:`RLConfig` of one row: the paper's setting and policy; the run control (generations,
    evaluations, checkpoints) sized for a CPU run that the caller overrides (``generations=...``)."""
    continuous = setting.env.startswith("brax:")
    return RLConfig(
        name=name, env=setting.env, population_size=setting.population_size, rank=setting.rank,
        sigma=setting.sigma, optimizer=setting.optimizer, learning_rate=esx_learning_rate(setting),
        width=256, depth=3, layer_norm=True, episodes=1,
        action_mode="greedy" if continuous else "stochastic",
        obs_norm=setting.env.startswith(OBS_NORM_PREFIXES), generations=500, eval_every=10, eval_episodes=16,
        final_eval_episodes=64, chunk=5, checkpoint_every=50,
    )


#: The 16 named configs (added to :data:`esx_envs.configs.CONFIGS`).
PAPER_CONFIGS: dict[str, RLConfig] = {name: paper_config(name, s) for name, s in PAPER_SETTINGS.items()}

__all__ = ["OBS_NORM_PREFIXES", "PAPER_CONFIGS", "PAPER_SETTINGS", "PaperSetting", "esx_learning_rate",
           "paper_config"]
