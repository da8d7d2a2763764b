"""`mrdiff evidence`: the synthetic-scenes evidence that the method works, as subcommands.

- report: train (optionally) and evaluate the model matrix, every model × variant × resolution (Table 1);
- summary: one size of a report, models down and metrics across (the README's headline table);
- diagnose: the failure modes at 2R (sun counts, stacked horizons) on chosen models, with a figure;
- solvers: samplers against network calls on the same seeds and weights;
- curves: the in-fit curves of several fits against training pixels;
- noiseshift: how many images a NoiseShift calibration needs;
- tune: each training-free method's setting, picked from tuning reports;
- export: a run's checkpoint as shippable weights.
"""
