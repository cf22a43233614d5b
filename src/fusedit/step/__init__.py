"""What one training step computes, without Lightning: the trainer (fusedit.training), the latent cache
(fusedit.cache) and the benchmark (fusedit.bench) all build and step through this package.

build (load -> fuse -> fp8 -> LoRA -> activation checkpointing -> compile, recorded and order-checked) ->
conditioning (a data batch -> `EditInputs`) -> loss (noise draw, transformer call, objective) in the precision
config's autocast (precision). Nothing here imports Lightning.
"""
