"""NoiseShift (He et al. 2025), adapted to DDPM: per-resolution recalibration of a model's time conditioning.

- `search`: for each sampler timestep t, the conditioning t̂ that minimises the one-step ε error at a
  resolution (coarse-to-fine, common random numbers);
- `calibration`: that search over several resolutions of one model, into a table (with its plot);
- `table`: the checked JSON table file;
- `weights`: which weights a table belongs to;
- `time_cond`: the callables a sampler feeds the network (a table's t̂(t), the analytic SD3 shift);
- `conditioning`: which of those a sampling run uses at each size.
"""
