"""The training wing: `fit` (fit.py), the run's setup and checks (setup.py), evaluation (evaluate.py),
checkpoints and resume (checkpoints.py), stopping early (stopping.py), what a step computes
(objective.py, loss.py), several processes (distributed.py), optimizers (optim.py), and watching a run
(tracking.py, plot.py).

May import everything below it: config, errors, folders, quant, memory, doctor, model_paths, data,
methods, planner, generate. Nothing here imports export.
"""
