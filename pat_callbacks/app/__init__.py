"""The training application behind ``train.py``: Hydra schemas (:mod:`~pat_callbacks.app.config`), one run
(:mod:`~pat_callbacks.app.run`), reports over run folders (:mod:`~pat_callbacks.app.report`, ``pat-report``) and the
example models and data modules it trains (:mod:`~pat_callbacks.app.models`, :mod:`~pat_callbacks.app.data`).

Only this package and :mod:`pat_callbacks.callbacks` import Lightning.
"""
