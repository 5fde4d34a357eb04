"""Page and block batches: ZERO/UNCHANGED/COPY/DATA entries, zstd, strict decoding."""
