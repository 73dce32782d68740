"""Run directories: their layout and checkpoints (rundir.layout), summary.json (rundir.summary), the run lock and
metrics.jsonl."""
