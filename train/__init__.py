"""Training for gmod-jax: `python -m train --config configs/<recipe>.py --workdir DIR [--set k=v ...]`.

Modules: config (TrainConfig, recipes, overrides), loop (the run), step (state, jitted train /
eval steps), optimizer (AdamW, schedules, freezing), data (sources, host -> global arrays),
checkpoint (Orbax), metrics (JSONL / TensorBoard / tqdm), flops (MFU), distributed
(multi-process start-up), export (params -> gmod-jax checkpoint).
"""
