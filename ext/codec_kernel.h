/* Per-block C kernels of agent._native.codec: XXH3-128 inlined, zero check, LE words.
 *
 * Blocks are any power of two from 512 B, not only 4 KiB pages. XXH_INLINE_ALL lets
 * -march=native pick XXH3's widest vector path.
 */
#ifndef FERRY_CODEC_KERNEL_H
#define FERRY_CODEC_KERNEL_H

#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

/* Zero test granule: a non-zero block usually costs one granule before we give up. */
#define FCODEC_ZERO_GRANULE 256

static inline uint64_t fcodec_load_le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);   /* unaligned-safe; compiles to one load */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void fcodec_store_le64(unsigned char *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, sizeof v);
}

/* 1 if all n bytes at p are zero; n is a multiple of FCODEC_ZERO_GRANULE. */
static inline int fcodec_is_zero(const unsigned char *p, size_t n)
{
    for (size_t off = 0; off < n; off += FCODEC_ZERO_GRANULE) {
        uint64_t acc = 0;
        for (size_t i = 0; i < FCODEC_ZERO_GRANULE; i += 8) {
            uint64_t v;
            memcpy(&v, p + off + i, sizeof v);
            acc |= v;
        }
        if (acc)
            return 0;
    }
    return 1;
}

/* XXH3-128 of n bytes as its two 64-bit halves. */
static inline void fcodec_hash(const unsigned char *p, size_t n, uint64_t *lo, uint64_t *hi)
{
    XXH128_hash_t h = XXH3_128bits(p, n);
    *lo = h.low64;
    *hi = h.high64;
}

#endif
