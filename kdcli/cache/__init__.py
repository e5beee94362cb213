"""The teacher cache: HDF5 shards + manifest.json. The only thing cache-teacher and train-student share.

- :mod:`kdcli.cache.modes`    -- what a cache stores per row, one file per mode (full, topk, sample, priority):
  keys and dtypes, the reduction of teacher logits on the device, checks, and the targets the losses take
- :mod:`kdcli.cache.reduce`   -- teacher logits -> a mode's per-row tensors; their copy to the host
- :mod:`kdcli.cache.manifest` -- the manifest schema, its checks against data and teacher, rank manifests
- :mod:`kdcli.cache.writer`   -- shards built in memory and published atomically, checked before they are
- :mod:`kdcli.cache.reader`   -- lazy, streaming reads in contiguous blocks (DDP ranks, DataLoader workers)
- :mod:`kdcli.cache.tokens`   -- the reader of token-level (language-model) caches: ragged rows + offsets
- :mod:`kdcli.cache.fused`    -- several caches read in lock-step as one fused teacher
- :mod:`kdcli.cache.verify`   -- full re-hash and content checks (``kdcli cache verify``)
"""
