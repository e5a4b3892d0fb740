"""Attribute bias in generated text, measured and removed at inference time.

Following Liu et al. (2021): prompts that differ only in a sensitive
attribute (``prompts``: gender, location, topic) are continued by the model
(``generate``); a real scorer places each continuation between two poles of
a property, political leaning by default (``scorer``: the packaged
all-MiniLM-L6-v2 against anchor texts, calibrated on held-out examples); the
bias is the distance between the property distributions of the attribute
values, with bootstrap intervals (``measures``, ``report``).

Debiasing samples the reward-tilted distribution p(y | c) · exp(β r(y)),
r pulling the property toward the attribute-neutral target (``tilt``), with
piscale's particle filter; best-of-N under the same reward is the baseline.
"""
