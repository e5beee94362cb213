"""Models that are not language models, and what every model shares.

- :mod:`kdcli.models.classifiers` -- MODEL specs (built-ins, ``file.py:factory`` plugins, run dirs) -> modules
- :mod:`kdcli.models.weights`     -- reading weights safely, counting, sizing and hashing them; run-dir file names
- :mod:`kdcli.models.plugins`     -- ``file.py:factory`` specs: the only place kdcli runs user code
- :mod:`kdcli.models.quant`       -- int8 Linear layers and what a compressed run dir is
- :mod:`kdcli.models.stats`       -- non-zero parameters, bytes on disk, latency per row

Language models (Hugging Face, GGUF, the built-in transformer): :mod:`kdcli.lm.hf`.
"""
