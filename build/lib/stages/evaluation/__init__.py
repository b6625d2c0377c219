"""Measuring thefts for `evaluate`: `relabel` (the best class relabelling from a few labelled images),
`budget_curve` (stealing accuracy against queries), `decision` (each defense's best setting per benign-cost budget),
`report` and `plots` (the Markdown report and its Pareto plots), and `family_confidence` (how sure a victim is on
near-distribution images)."""
