"""esx_envs: plug-in fitness functions for esx (installed from the ``envs/`` folder as ``esx_envs``)."""
