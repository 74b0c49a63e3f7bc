"""Pure, engine-free stream logic: join state machine, negative sampler, feature extraction."""
