"""Where computation runs: the processor's abilities, data parallelism over devices, runs of several processes, and the settings a process makes before JAX starts."""
