"""Optuna sweeper for Hydra on current Optuna (>= 4).

Why in-repo: the released `hydra-optuna-sweeper` (1.3.0, PyPI) pins `optuna<3`, which cannot be
installed beside a current Optuna; the Optuna-4 port on Hydra's main branch is unreleased. This
plugin keeps the same config shape (`hydra/sweeper: optuna` with `direction`, `n_trials`,
`n_jobs`, `sampler`, `storage`, `study_name`, `params` written in Hydra's sweep syntax), so
moving to the upstream plugin once it is released is a one-line change.
"""
