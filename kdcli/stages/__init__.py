"""The pipeline's stages, one module each, each the one of its kind for every task:

- :mod:`kdcli.stages.cache`    -- ``cache-teacher``: data -> teacher (once) -> reduce -> shards + manifest
- :mod:`kdcli.stages.train`    -- ``train-student``: cache reader + data -> loss -> optimizer loop -> run dir
- :mod:`kdcli.stages.evaluate` -- ``eval``: models + data (+ cache) -> metrics against labels and teacher
- :mod:`kdcli.stages.compress` -- ``compress``: a run dir -> a pruned / int8 run dir

What differs between classification and language modelling sits behind :mod:`kdcli.tasks`.
"""
