"""Learned step values: collect labelled rollouts of a policy, train a value head.

The value of a partial answer x_{<=t} to a problem c under a policy pi is the
probability that the policy, continuing from it, ends with a correct answer:

    V(c, x_{<=t}) = E_{x_{>t} ~ pi(. | c, x_{<=t})} [ 1{x correct} ].

It is the optimal *twist* of twisted sequential Monte Carlo (Zhao et al.
2024): with intermediate targets p(x_{<=t} | c) V(c, x_{<=t}), particle
filtering samples the policy conditioned on a correct answer with no
degeneracy from a reward that only speaks at the end. Math-Shepherd (Wang et
al. 2024) estimates the same quantity from completions, with no human labels.

* ``piscale.values.collect``: rollouts of a policy on training problems,
  graded by the verifier, stored resumably in the evaluation store, with
  outcome labels and optional Monte-Carlo labels;
* ``piscale.values.train``: features of the stored rollouts from a backbone
  (the same function that serves them, ``StepValueReward.read_features``), a
  logistic head fitted on them (by default within problems: per-problem
  intercepts absorb difficulty, which no search can act on), and the head
  file ``value:PATH`` loads;
* ``piscale.values.measures``: AUROC on step labels, and the within-problem
  accuracies a search depends on: pairwise on finished answers, and on
  prefixes at equal depth.

This is an application layer: it may import rewards, search, lm and eval;
only the command line imports it.
"""
