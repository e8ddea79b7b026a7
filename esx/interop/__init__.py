"""Adapters from other JAX libraries to esx: Flax linen (`esx.interop.linen`), Flax NNX (`esx.interop.nnx`), Equinox
(`esx.interop.equinox`) and evosax (`esx.interop.evosax`). Each module imports its framework; `import esx` never does."""
