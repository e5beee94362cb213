"""The teacher cache: HDF5 shards + manifest.json. The only thing cache-teacher and train-student share.

- :mod:`kdcli.cache.manifest` -- the manifest schema and its checks against data and teacher
- :mod:`kdcli.cache.writer`   -- reduce logits (full / top-k / sample) and publish shards atomically
- :mod:`kdcli.cache.reader`   -- lazy, streaming reads in contiguous blocks
- :mod:`kdcli.cache.verify`   -- full re-hash and content checks (``kdcli cache verify``)
"""
