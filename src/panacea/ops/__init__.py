"""Operations: the layer above :mod:`panacea.pipeline` that runs nights.

Run configuration (:mod:`.config`), the per-night outcome summary and exit codes
(:mod:`.summary`), the one-writer lock (:mod:`.lock`) and the ledger of what was reduced
(:mod:`.ledger`). The stages never import from here.
"""
