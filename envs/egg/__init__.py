"""esx_envs.egg: the integer-only recurrent byte-level language model (EGG) of PAPER.md §6 and its task.

* :mod:`esx_envs.egg.model` -- the int8 model, its integer log-likelihood, bits/byte, sampling and the jitted
  integer-EGGROLL generation (the names below are re-exported from it);
* :mod:`esx_envs.egg.text_data` -- byte data (files, folders, the shipped tinyshakespeare), splits, streams;
* :mod:`esx_envs.egg.float_twin` -- the float32 twin of the model (throughput and backprop comparisons);
* :mod:`esx_envs.egg.task` -- :class:`EggRunConfig` and its :class:`esx.run.Setup` (``esx train egg-shakespeare``).
"""
from esx_envs.egg.model import EXP2_FRAC, LL_FRAC, VOCAB, EggConfig, bits_per_byte, exp2_table, \
    float_log2_likelihood, forward, init_params, initial_hidden, labels, layer_norm, log2_likelihood, log2_table, \
    make_fitness, make_generation, num_params, recip_table, rescale, sample, table_bytes

__all__ = ["EXP2_FRAC", "LL_FRAC", "VOCAB", "EggConfig", "bits_per_byte", "exp2_table", "float_log2_likelihood",
           "forward", "init_params", "initial_hidden", "labels", "layer_norm", "log2_likelihood", "log2_table",
           "make_fitness", "make_generation", "num_params", "recip_table", "rescale", "sample", "table_bytes"]
