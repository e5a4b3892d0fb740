"""Supervised fine-tuning by the recipe of Pareja et al. (2024), and the
search answers it trains on (rejection-sampling fine-tuning).

    search on training problems  (piscale eval / piscale prm collect)
        -> sft.searched: verified-correct answers, distinct per problem
    fine-tune                     (sft.train: transformers' Trainer,
                                   completion-only loss, constant LR)
        -> a model folder any engine loads by path
    or a grid stopped early       (sft.sweep: the recipe's early indicators)

Modules: ``data`` (layouts, completion-only labels, stacked or phased
order), ``train`` (the Trainer, per-step metrics, resuming), ``sweep`` (the
grid), ``searched`` (search outputs to SFT records), ``plots``. The recipe's
settings and the early-stopping rule are ``piscale.recipe``, shared with
``piscale.distill``.
"""
