/*
 * ferry's Linux benchmark workload: fills a working set with pages of realistic
 * compressibility, rewrites them at a given rate, and verifies every page against what
 * it must hold now, printing one status line a second on the console.
 *
 *   workload WS_MIB DIRTY_MIB_S [SELFTEST|none [DISK DISK_MIB_S]]   (in the guest)
 *   workload --dump PAGES                         (on the host: the mix to stdout)
 *
 * Page i's content is a pure function of (i, its generation g): the writer rewrites
 * pages in a fixed scattered order (position p -> page p*STRIDE mod N), so after W writes
 * page i must be at generation (W + N - 1 - pos(i)) / N. The checker regenerates the
 * expected content and compares all 4096 bytes: a garbled page, a page never sent (still
 * at an older generation, or zero) and a stale one (an older generation) all fail.
 * Kinds, chosen by a hash of (i, g) (the mix; document changes in bench/linuxguest.py):
 *   30% text-like (words and numbers in lines), 25% binary-like (kernel-struct-like
 *   records: pointers, small counters, flags), 15% random, 20% zero, 10% a copy of one
 *   of 16 template pages (duplicates).
 * With DISK (a block device, e.g. /dev/vda) its blocks get the same treatment through
 * O_DIRECT writes at DISK_MIB_S and O_DIRECT reads verified against their generation.
 * SELFTEST "garble" flips a byte of one page after the first full pass, "stale" puts one
 * page back to its previous generation: the checker must report an error (the negative
 * control of the tests).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define TEMPLATES 16u
#define HEADER_MAGIC 0x46455252594c4e58ull  /* "FERRYLNX" */
#define CHECK_CHUNK 64u          /* pages verified between looks at the clock */
#define MAX_CATCHUP_S 1.0        /* after a pause (the migration) write at most 1 s extra */
#define MAX_REPORTED 20          /* error lines printed in detail */

enum kind { TEXT, BINARY, RANDOM, ZERO, DUP };
static const char *kind_names[] = {"text", "binary", "random", "zero", "dup"};

static uint64_t n_pages, stride, stride_inv;
static uint8_t *ws;
static uint8_t templates[TEMPLATES][PAGE];

static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t seed_of(uint64_t index, uint64_t gen)
{
    return mix64(index * 0x100000001b3ull ^ mix64(gen + 0x5851f42d4c957f2dull));
}

static enum kind kind_of(uint64_t seed)
{
    unsigned r = (unsigned)(seed % 100);
    return r < 30 ? TEXT : r < 55 ? BINARY : r < 70 ? RANDOM : r < 90 ? ZERO : DUP;
}

static uint64_t next(uint64_t *s)    /* xorshift64* */
{
    *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dull;
}

static const char *words[64] = {
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
    "have", "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her",
    "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "request", "server", "error", "memory", "process", "kernel", "user", "file", "data",
    "value", "config", "status", "network", "time", "system", "page"};

/* Generated text for text-like pages: a page's body is a window of this at an offset
   from its hash. Large enough that the windows of one batch of pages rarely overlap. */
#define CORPUS (8u << 20)
static char *corpus;

static void make_corpus(void)
{
    uint64_t s = 0x243f6a8885a308d3ull;
    unsigned at = 0, col = 0;
    corpus = malloc(CORPUS);
    while (at < CORPUS) {
        uint64_t r = next(&s);
        char num[24];
        const char *w = words[r & 63];
        if ((r >> 6) % 11 == 0) {        /* a number now and then, as logs have */
            snprintf(num, sizeof num, "%u", (unsigned)((r >> 12) % 100000));
            w = num;
        }
        for (size_t k = 0; w[k] && at < CORPUS; k++)
            corpus[at++] = w[k];
        if (at < CORPUS)
            corpus[at++] = (++col % 12 == 0) ? '\n' : ' ';
    }
}

#define TEXT_HEADER 44u     /* "page " 16 hex " gen " 16 hex "\n" */

static void put_hex(uint8_t *p, uint64_t v)
{
    for (int k = 15; k >= 0; k--, v >>= 4)
        p[k] = (uint8_t)"0123456789abcdef"[v & 15];
}

static void fill_text(uint8_t *p, uint64_t index, uint64_t gen, uint64_t s)
{
    memcpy(p, "page ", 5);
    put_hex(p + 5, index);
    memcpy(p + 21, " gen ", 5);
    put_hex(p + 26, gen);
    memcpy(p + 42, "\n\n", 2);
    memcpy(p + TEXT_HEADER, corpus + (s >> 8) % (CORPUS - PAGE), PAGE - TEXT_HEADER);
}

static void put_header(uint8_t *p, enum kind k, uint64_t index, uint64_t gen)
{
    uint64_t h[3] = {HEADER_MAGIC ^ (uint64_t)k, index, gen};
    memcpy(p, h, sizeof h);
}

static void fill_binary(uint8_t *p, uint64_t index, uint64_t gen, uint64_t s)
{
    put_header(p, BINARY, index, gen);
    uint64_t *q = (uint64_t *)p;
    for (unsigned w = 3; w + 4 <= PAGE / 8; w += 4) {   /* 32-byte records */
        uint64_t r = next(&s);
        q[w] = 0xffff888000000000ull + ((r & 0xfffffull) << 6);  /* a pointer */
        q[w + 1] = ((r >> 20) % 1000) | (((r >> 30) & 0xf) << 32); /* counter, flags */
        q[w + 2] = (r >> 34) & 1 ? r : 0;                         /* half the time data */
        q[w + 3] = 0;
    }
    q[PAGE / 8 - 1] = 0;                 /* the tail the records leave */
}

static void fill_random(uint8_t *p, uint64_t index, uint64_t gen, uint64_t s)
{
    put_header(p, RANDOM, index, gen);
    uint64_t *q = (uint64_t *)p;
    for (unsigned w = 3; w < PAGE / 8; w++)
        q[w] = next(&s);
}

/* The content page `index` holds at generation `gen`. */
static enum kind make_page(uint8_t *p, uint64_t index, uint64_t gen)
{
    uint64_t seed = seed_of(index, gen);
    enum kind k = kind_of(seed);
    uint64_t s = seed | 1;
    switch (k) {
    case TEXT: fill_text(p, index, gen, s); break;
    case BINARY: fill_binary(p, index, gen, s); break;
    case RANDOM: fill_random(p, index, gen, s); break;
    case ZERO: memset(p, 0, PAGE); break;
    case DUP: memcpy(p, templates[(seed >> 8) % TEMPLATES], PAGE); break;
    }
    return k;
}

static void make_templates(void)
{
    make_corpus();
    for (unsigned t = 0; t < TEMPLATES; t++)
        fill_text(templates[t], 0xfeedull << 32 | t, 0, mix64(t) | 1);
}

static uint64_t gcd(uint64_t a, uint64_t b) { while (b) { uint64_t t = a % b; a = b; b = t; } return a; }

static uint64_t inverse_mod(uint64_t a, uint64_t m)
{
    __int128 t = 0, nt = 1, r = m, nr = a;
    while (nr) {
        __int128 q = r / nr, tmp;
        tmp = t - q * nt; t = nt; nt = tmp;
        tmp = r - q * nr; r = nr; nr = tmp;
    }
    return (uint64_t)(t < 0 ? t + m : t);
}

/* n_pages < 2^32 (checked in main): the products fit 64 bits. */
static uint64_t page_at(uint64_t pos) { return pos * stride % n_pages; }
static uint64_t pos_of(uint64_t page) { return page * stride_inv % n_pages; }

static uint64_t gen_after(uint64_t page, uint64_t writes)
{
    return (writes + n_pages - 1 - pos_of(page)) / n_pages;
}

/* The disk: blocks of one page, rewritten and verified (O_DIRECT: from the device, not
   the page cache) in the same scheme, with their own order and counters. Block b's
   content is that of page DISK_BASE + b. */
#define DISK_BASE (1ull << 40)
#define DISK_CHUNK 16u            /* blocks per verifying read */
#define DISK_FILL_CHUNK 256u      /* blocks per write while filling */
static int disk_fd = -1;
static uint64_t d_blocks, d_stride, d_inv, d_errors, d_writes, d_passes, d_cursor;
static uint8_t *d_buf;

static uint64_t d_block_at(uint64_t pos) { return pos * d_stride % d_blocks; }
static uint64_t d_gen_after(uint64_t block, uint64_t writes)
{
    return (writes + d_blocks - 1 - block * d_inv % d_blocks) / d_blocks;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t errors;

static void check_page(uint64_t page, uint64_t writes, uint8_t *scratch)
{
    uint8_t *p = ws + page * PAGE;
    uint64_t gen = gen_after(page, writes);
    enum kind k = make_page(scratch, page, gen);
    if (memcmp(p, scratch, PAGE) == 0)
        return;
    errors++;
    if (errors > MAX_REPORTED)
        return;
    unsigned at = 0;
    while (at < PAGE && p[at] == scratch[at])
        at++;
    uint64_t found[3];
    memcpy(found, p, sizeof found);
    char what[96] = "";
    if ((found[0] & ~7ull) == (HEADER_MAGIC & ~7ull) && found[1] == page)
        snprintf(what, sizeof what, " (holds generation %llu: %s)",
                 (unsigned long long)found[2],
                 found[2] < gen ? "stale" : found[2] > gen ? "newer" : "garbled");
    printf("FERRY-WL ERROR page %llu gen %llu (%s): first difference at byte %u%s\n",
           (unsigned long long)page, (unsigned long long)gen, kind_names[k], at, what);
    fflush(stdout);
}

static void disk_error(uint64_t block, uint64_t gen, const char *what)
{
    d_errors++;
    if (d_errors <= MAX_REPORTED) {
        printf("FERRY-WL ERROR disk block %llu gen %llu: %s\n", (unsigned long long)block,
               (unsigned long long)gen, what);
        fflush(stdout);
    }
}

static int disk_open(const char *dev)
{
    disk_fd = open(dev, O_RDWR | O_DIRECT);
    if (disk_fd < 0) {
        perror("workload: open disk");
        return -1;
    }
    off_t size = lseek(disk_fd, 0, SEEK_END);
    d_blocks = size > 0 ? (uint64_t)size / PAGE : 0;
    if (d_blocks < DISK_FILL_CHUNK || d_blocks % DISK_FILL_CHUNK || d_blocks >= (1ull << 32)) {
        fprintf(stderr, "workload: disk %s of %lld bytes: need a multiple of 1 MiB\n", dev,
                (long long)size);
        return -1;
    }
    d_stride = ((uint64_t)((double)d_blocks * 0.6180339887) | 1) % d_blocks;
    while (gcd(d_stride, d_blocks) != 1)
        d_stride += 2;
    d_inv = inverse_mod(d_stride, d_blocks);
    if (posix_memalign((void **)&d_buf, PAGE, DISK_FILL_CHUNK * PAGE))
        return -1;
    for (uint64_t b = 0; b < d_blocks; b += DISK_FILL_CHUNK) {
        for (unsigned k = 0; k < DISK_FILL_CHUNK; k++)
            make_page(d_buf + k * PAGE, DISK_BASE + b + k, 0);
        if (pwrite(disk_fd, d_buf, DISK_FILL_CHUNK * PAGE, (off_t)(b * PAGE)) !=
            (ssize_t)(DISK_FILL_CHUNK * PAGE)) {
            perror("workload: filling the disk");
            return -1;
        }
    }
    return 0;
}

static void disk_write_one(void)
{
    uint64_t block = d_block_at(d_writes % d_blocks), gen = d_writes / d_blocks + 1;
    make_page(d_buf, DISK_BASE + block, gen);
    if (pwrite(disk_fd, d_buf, PAGE, (off_t)(block * PAGE)) != PAGE)
        disk_error(block, gen, "write failed");
    d_writes++;
}

static void disk_check_chunk(uint8_t *scratch)
{
    uint64_t first = d_cursor;
    if (pread(disk_fd, d_buf, DISK_CHUNK * PAGE, (off_t)(first * PAGE)) !=
        (ssize_t)(DISK_CHUNK * PAGE)) {
        disk_error(first, 0, "read failed");
    } else {
        for (unsigned k = 0; k < DISK_CHUNK; k++) {
            uint64_t gen = d_gen_after(first + k, d_writes);
            make_page(scratch, DISK_BASE + first + k, gen);
            if (memcmp(d_buf + k * PAGE, scratch, PAGE) != 0)
                disk_error(first + k, gen, "content differs (lost, stale or garbled)");
        }
    }
    d_cursor += DISK_CHUNK;
    if (d_cursor >= d_blocks) {
        d_cursor = 0;
        d_passes++;
    }
}

/* One page whose current content differs between generations: for the self-tests. */
static uint64_t distinct_page(uint64_t writes)
{
    for (uint64_t page = 0; page < n_pages; page++) {
        uint64_t g = gen_after(page, writes);
        enum kind k = kind_of(seed_of(page, g));
        if (k != ZERO && k != DUP && (g == 0 || kind_of(seed_of(page, g - 1)) != ZERO))
            return page;
    }
    return 0;
}

static void selftest(const char *mode, uint64_t writes, uint8_t *scratch)
{
    uint64_t page = distinct_page(writes);
    uint64_t gen = gen_after(page, writes);
    if (strcmp(mode, "garble") == 0) {
        ws[page * PAGE + 100] ^= 0x5a;
    } else if (strcmp(mode, "stale") == 0) {
        /* the page as it was one generation earlier (for generation 0: all zero, as a
           page never sent would be at the destination) */
        if (gen == 0)
            memset(ws + page * PAGE, 0, PAGE);
        else
            make_page(ws + page * PAGE, page, gen - 1);
    } else {
        return;
    }
    (void)scratch;
    printf("FERRY-WL selftest %s: page %llu\n", mode, (unsigned long long)page);
    fflush(stdout);
}

static int dump(uint64_t pages)
{
    uint8_t p[PAGE];
    make_templates();
    for (uint64_t i = 0; i < pages; i++) {
        make_page(p, i, 0);
        if (fwrite(p, PAGE, 1, stdout) != 1)
            return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--dump") == 0)
        return dump(strtoull(argv[2], NULL, 10));
    if (argc < 3) {
        fprintf(stderr, "usage: workload WS_MIB DIRTY_MIB_S [garble|stale|none [DISK "
                        "DISK_MIB_S]] | --dump PAGES\n");
        return 2;
    }
    uint64_t ws_mib = strtoull(argv[1], NULL, 10);
    double dirty_mib_s = strtod(argv[2], NULL);
    const char *test = argc > 3 && strcmp(argv[3], "none") != 0 ? argv[3] : "";
    const char *disk = argc > 4 ? argv[4] : NULL;
    double disk_mib_s = argc > 5 ? strtod(argv[5], NULL) : 0;
    n_pages = ws_mib * (1u << 20) / PAGE;
    if (n_pages < 2 || n_pages >= (1ull << 32)) {
        fprintf(stderr, "workload: a working set of %llu MiB is out of range (8 KiB to 16 TiB)\n",
                (unsigned long long)ws_mib);
        return 2;
    }
    /* A stride near N/phi scatters consecutive writes over the whole set. */
    stride = ((uint64_t)((double)n_pages * 0.6180339887) | 1) % n_pages;
    while (gcd(stride, n_pages) != 1)
        stride += 2;
    stride_inv = inverse_mod(stride, n_pages);

    ws = mmap(NULL, n_pages * PAGE, PROT_READ | PROT_WRITE,
              MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (ws == MAP_FAILED) {
        perror("workload: mmap");
        return 1;
    }
    madvise(ws, n_pages * PAGE, MADV_NOHUGEPAGE);
    mlock(ws, n_pages * PAGE);
    make_templates();
    double t0 = now_s();
    for (uint64_t page = 0; page < n_pages; page++)
        make_page(ws + page * PAGE, page, 0);
    if (disk && disk_open(disk) != 0)
        return 1;
    printf("FERRY-WL ready ws_pages=%llu fill_s=%.2f\n", (unsigned long long)n_pages,
           now_s() - t0);
    /* Where page 0 lives in guest-physical memory, for a host that corrupts it. */
    int pm = open("/proc/self/pagemap", O_RDONLY);
    uint64_t entry = 0;
    if (pm >= 0 && pread(pm, &entry, sizeof entry,
                         (off_t)((uintptr_t)ws / PAGE * sizeof entry)) == sizeof entry &&
        (entry >> 63) & 1)
        printf("FERRY-WL probe page=0 phys=0x%llx\n",
               (unsigned long long)((entry & ((1ull << 55) - 1)) * PAGE));
    if (pm >= 0)
        close(pm);
    fflush(stdout);

    static uint8_t scratch[PAGE];
    double rate = dirty_mib_s * (1 << 20) / PAGE;    /* pages per second */
    double d_rate = disk_mib_s * (1 << 20) / PAGE, d_paced = 0;
    uint64_t writes = 0, checked = 0, passes = 0, cursor = 0, tick = 0;
    double start = now_s(), paced = 0, next_status = start + 1;
    int tested = 0;
    for (;;) {
        double now = now_s();
        double due_total = rate * (now - start);
        if (due_total - paced > rate * MAX_CATCHUP_S)     /* do not burst after a pause */
            paced = due_total - rate * MAX_CATCHUP_S;
        uint64_t due = (uint64_t)(due_total - paced);
        for (uint64_t k = 0; k < due; k++) {
            make_page(ws + page_at(writes % n_pages) * PAGE, page_at(writes % n_pages),
                      writes / n_pages + 1);
            writes++;
        }
        paced += (double)due;
        if (disk_fd >= 0) {
            double d_due_total = d_rate * (now - start);
            if (d_due_total - d_paced > d_rate * MAX_CATCHUP_S)
                d_paced = d_due_total - d_rate * MAX_CATCHUP_S;
            uint64_t d_due = (uint64_t)(d_due_total - d_paced);
            for (uint64_t k = 0; k < d_due; k++)
                disk_write_one();
            d_paced += (double)d_due;
            disk_check_chunk(scratch);
        }
        for (unsigned k = 0; k < CHECK_CHUNK; k++) {
            check_page(cursor, writes, scratch);
            checked++;
            if (++cursor == n_pages) {
                cursor = 0;
                passes++;
                if (passes == 1 && *test && !tested) {
                    selftest(test, writes, scratch);
                    tested = 1;
                }
            }
        }
        if (now >= next_status) {
            tick++;
            printf("FERRY-WL t=%llu pass=%llu checked=%llu written=%llu errors=%llu",
                   (unsigned long long)tick, (unsigned long long)passes,
                   (unsigned long long)checked, (unsigned long long)writes,
                   (unsigned long long)errors);
            if (disk_fd >= 0)
                printf(" disk_pass=%llu disk_written=%llu disk_errors=%llu",
                       (unsigned long long)d_passes, (unsigned long long)d_writes,
                       (unsigned long long)d_errors);
            printf("\n");
            fflush(stdout);
            next_status += 1;
            if (next_status < now)
                next_status = now + 1;
        }
    }
}
