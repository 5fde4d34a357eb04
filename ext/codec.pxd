# C declarations for ext/codec.pyx: the per-block kernels of codec_kernel.h.
#
# Cython finds a .pxd for a module only under its full name (agent._native.codec), and the
# sources live in ext/, so codec.pyx cimports these; the DedupIndex class stays in the .pyx.

from libc.stdint cimport uint64_t


cdef extern from "codec_kernel.h" nogil:
    uint64_t fcodec_load_le64(const unsigned char *p)
    void fcodec_store_le64(unsigned char *p, uint64_t v)
    bint fcodec_is_zero(const unsigned char *p, size_t n)
    void fcodec_hash(const unsigned char *p, size_t n, uint64_t *lo, uint64_t *hi)
