"""Lab 08, the capstone: the whole Reformer and which attention to pick, measured on tasks that need context.

Modules, one job each: `tasks` (seeded recall and ListOps generators), `reversible` (reversible blocks, a
memory-saving reversible stack, the chunked feed-forward), `memory` (their peak memory, fresh processes),
`models` (small Trax models with any family's attention, one training step for all), `generation` (their
predict-mode twins: greedy decoding with a cache, time per token), `sweep` (the resumable
comparison), `plots`, `cli` (`python -m labkit capstone`). Importing this package imports none of them.
"""
