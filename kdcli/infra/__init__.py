"""Infrastructure every stage uses: errors that carry their exit code, logs and progress on stderr, torchrun
(``distributed``), devices and precision, atomic file writes, directory locks, output directories
(``--overwrite``), and test-only crash points."""
