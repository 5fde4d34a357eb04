/*
 * ferry test guest: a multiboot kernel that dirties a configured set of pages at a steady
 * rate and checks on every pass that each page still holds what it wrote on the previous
 * one, reporting through a mailbox at a fixed guest-physical address.
 *
 * The layout below must match agent/guest/mailbox.py (the Python reader and writer).
 *
 * Memory (guest-physical == offset in the RAM file for low memory on `-machine pc`):
 *   0x00100000  this kernel (code only; never written after load)
 *   0x00200000  mailbox page: status, config, private state, and the stack at its top
 *   0x00300000  first page the working set or the fill may use (FREE_BASE_PAGE)
 *
 * Assembled by agent/guest/build.py with --defsym for the initial config:
 *   CFG_WS_START, CFG_WS_PAGES, CFG_RATE, CFG_FILL_START, CFG_FILL_PAGES
 */
    .code32

    .set MULTIBOOT_MAGIC,       0x1BADB002
    .set MULTIBOOT_FLAGS,       0x00000002      /* bit 1: pass memory sizes */
    .set MULTIBOOT_LOADER_MAGIC, 0x2BADB002
    .set MBI_FLAGS,             0
    .set MBI_MEM_UPPER,         8               /* KiB above 1 MiB, up to the first hole */

    .set MAILBOX,               0x00200000
    .set MAILBOX_END,           MAILBOX + 0x1000
    .set FREE_BASE_PAGE,        0x300
    .set PAGE_SHIFT,            12
    .set PAGE_DWORDS,           1024

    .set MAGIC,                 0x59524546      /* "FERY" little-endian */
    .set LAYOUT_VERSION,        1
    .set NO_PAGE,               0xFFFFFFFF

    .set STATE_BOOTING,         1
    .set STATE_FILLING,         2
    .set STATE_RUNNING,         3

    /* guest-written status */
    .set MB_MAGIC,              0x00
    .set MB_VERSION,            0x04
    .set MB_HEARTBEAT,          0x08            /* +1 per millisecond of TSC while running */
    .set MB_PASSES,             0x0C            /* passes over the working set completed */
    .set MB_ERRORS,             0x10            /* pages found not holding the previous pass */
    .set MB_FIRST_ERROR,        0x14
    .set MB_LAST_ERROR,         0x18
    .set MB_STATE,              0x1C
    .set MB_PAGES_LO,           0x20            /* pages written, 64-bit */
    .set MB_PAGES_HI,           0x24
    .set MB_TSC_PER_MS,         0x28
    .set MB_RAM_PAGES,          0x2C
    .set MB_ACTIVE_START,       0x30            /* working set in effect */
    .set MB_ACTIVE_PAGES,       0x34
    .set MB_CONFIG_STATUS,      0x38            /* 0 ok, 1 working set refused, 2 fill refused */
    /* host-written config, re-read by the guest */
    .set MB_CFG_WS_START,       0x40
    .set MB_CFG_WS_PAGES,       0x44
    .set MB_CFG_RATE,           0x48            /* pages per second, 0 = as fast as possible */
    .set MB_CFG_FILL_START,     0x4C
    .set MB_CFG_FILL_PAGES,     0x50
    .set MB_CFG_SEQ,            0x54            /* seqlock: odd while the host writes */
    /* private state: the host must not rely on it */
    .set PV_LAST_TSC_LO,        0x800
    .set PV_LAST_TSC_HI,        0x804
    .set PV_CREDIT,             0x808
    .set PV_PASS,               0x80C
    .set PV_VERIFY,             0x810
    .set PV_RESYNC_TICKS,       0x814
    .set PV_INDEX,              0x818
    .set PV_ACT_START,          0x81C
    .set PV_ACT_PAGES,          0x820

    .set CONFIG_OK,             0
    .set CONFIG_BAD_WS,         1
    .set CONFIG_BAD_FILL,       2

    /* Pacing: every elapsed millisecond adds RATE credit; a page costs CREDIT_PER_PAGE. */
    .set CREDIT_PER_PAGE,       1000
    .set CREDIT_CAP_SHIFT,      4               /* at most 16 ms of credit banked */
    .set MAX_RATE,              0x01000000
    .set RESYNC_MS,             50              /* a longer gap (VM stopped) is not caught up */

    /* TSC calibration against PIT channel 2 (gated through port 0x61). */
    .set PIT_HZ,                1193182
    .set CALIBRATE_MS,          50
    .set PIT_LATCH,             PIT_HZ * CALIBRATE_MS / 1000

    /* Page pattern: dword j of page p on pass n = seed(p, n) + j * PATTERN_STEP. */
    .set SEED_PAGE_MUL,         0x9E3779B1
    .set SEED_PASS_MUL,         0x85EBCA77
    .set SEED_ADD,              0x27D4EB2F
    .set PATTERN_STEP,          0x6A09E667
    .set FILL_SEED_MUL,         0x9E3779B1

    .section .multiboot, "a"
    .align 4
    .long MULTIBOOT_MAGIC, MULTIBOOT_FLAGS, -(MULTIBOOT_MAGIC + MULTIBOOT_FLAGS)

    .text
    .globl _start
_start:
    cli
    cld
    mov $MAILBOX_END, %esp

    /* RAM size from the multiboot info, before anything else is touched. */
    xor %ebp, %ebp
    cmp $MULTIBOOT_LOADER_MAGIC, %eax
    jne 1f
    testl $1, MBI_FLAGS(%ebx)
    jz 1f
    mov MBI_MEM_UPPER(%ebx), %ebp
    add $1024, %ebp                             /* KiB of RAM below the first hole */
    shr $2, %ebp                                /* pages */
1:
    /* Clear the mailbox page below the stack, then publish config before the magic. */
    mov $MAILBOX, %edi
    xor %eax, %eax
    mov $(PAGE_DWORDS - 64), %ecx
    rep stosl
    mov %ebp, MAILBOX + MB_RAM_PAGES
    movl $LAYOUT_VERSION, MAILBOX + MB_VERSION
    movl $NO_PAGE, MAILBOX + MB_FIRST_ERROR
    movl $NO_PAGE, MAILBOX + MB_LAST_ERROR
    movl $STATE_BOOTING, MAILBOX + MB_STATE
    movl $CFG_WS_START, MAILBOX + MB_CFG_WS_START
    movl $CFG_WS_PAGES, MAILBOX + MB_CFG_WS_PAGES
    movl $CFG_RATE, MAILBOX + MB_CFG_RATE
    movl $CFG_FILL_START, MAILBOX + MB_CFG_FILL_START
    movl $CFG_FILL_PAGES, MAILBOX + MB_CFG_FILL_PAGES

    call calibrate_tsc
    movl $MAGIC, MAILBOX + MB_MAGIC

    movl $STATE_FILLING, MAILBOX + MB_STATE
    call fill
    movl $STATE_RUNNING, MAILBOX + MB_STATE

    rdtsc
    mov %eax, MAILBOX + PV_LAST_TSC_LO
    mov %edx, MAILBOX + PV_LAST_TSC_HI

main_loop:
    call load_config
    cmpl $0, MAILBOX + PV_ACT_PAGES
    jne 1f
    call pace                                   /* idle: keep the heartbeat going */
    jmp main_loop
1:
    movl $0, MAILBOX + PV_INDEX
next_page:
    call pace
    mov MAILBOX + PV_ACT_START, %ebx
    add MAILBOX + PV_INDEX, %ebx                /* ebx = page number */
    mov %ebx, %edi
    shl $PAGE_SHIFT, %edi

    cmpl $0, MAILBOX + PV_VERIFY
    je 2f
    mov %ebx, %eax
    mov MAILBOX + PV_PASS, %edx
    dec %edx
    call page_seed
    push %edi
    call check_page
    pop %edi
    je 2f
    /* A page that does not hold the previous pass: a lost or foreign write. */
    incl MAILBOX + MB_ERRORS
    mov %ebx, MAILBOX + MB_LAST_ERROR
    cmpl $NO_PAGE, MAILBOX + MB_FIRST_ERROR
    jne 2f
    mov %ebx, MAILBOX + MB_FIRST_ERROR
2:
    mov %ebx, %eax
    mov MAILBOX + PV_PASS, %edx
    call page_seed
    call write_page
    addl $1, MAILBOX + MB_PAGES_LO
    adcl $0, MAILBOX + MB_PAGES_HI

    incl MAILBOX + PV_INDEX
    mov MAILBOX + PV_INDEX, %eax
    cmp MAILBOX + PV_ACT_PAGES, %eax
    jb next_page

    incl MAILBOX + PV_PASS
    mov MAILBOX + PV_PASS, %eax
    mov %eax, MAILBOX + MB_PASSES
    movl $1, MAILBOX + PV_VERIFY
    jmp main_loop

/* Take the working set from the config; a changed or refused one restarts verification.
 * Clobbers eax, ecx, edx. */
load_config:
    mov MAILBOX + MB_CFG_SEQ, %edx              /* x86 keeps loads in order: a seqlock */
    test $1, %edx
    jnz 4f                                      /* host mid-write: keep the current set */
    mov MAILBOX + MB_CFG_WS_START, %eax
    mov MAILBOX + MB_CFG_WS_PAGES, %ecx
    cmp MAILBOX + MB_CFG_SEQ, %edx
    jne 4f
    movl $CONFIG_OK, MAILBOX + MB_CONFIG_STATUS
    test %ecx, %ecx
    jz 2f
    call range_ok
    jnc 2f
    movl $CONFIG_BAD_WS, MAILBOX + MB_CONFIG_STATUS
    xor %ecx, %ecx
2:
    cmp MAILBOX + PV_ACT_START, %eax
    jne 3f
    cmp MAILBOX + PV_ACT_PAGES, %ecx
    je 4f
3:
    movl $0, MAILBOX + PV_VERIFY
    mov %eax, MAILBOX + PV_ACT_START
    mov %ecx, MAILBOX + PV_ACT_PAGES
    mov %eax, MAILBOX + MB_ACTIVE_START
    mov %ecx, MAILBOX + MB_ACTIVE_PAGES
4:
    ret

/* CF clear if pages [eax, eax+ecx) lie in free RAM; preserves eax and ecx. */
range_ok:
    push %edx
    cmp $FREE_BASE_PAGE, %eax
    jb 1f
    mov %eax, %edx
    add %ecx, %edx
    jc 1f
    cmpl $0, MAILBOX + MB_RAM_PAGES             /* size unknown: trust the host */
    je 2f
    cmp MAILBOX + MB_RAM_PAGES, %edx
    ja 1f
2:
    pop %edx
    clc
    ret
1:
    pop %edx
    stc
    ret

/* eax = page, edx = pass -> eax = first dword of the page's pattern; clobbers edx. */
page_seed:
    imul $SEED_PAGE_MUL, %eax, %eax
    imul $SEED_PASS_MUL, %edx, %edx
    add %edx, %eax
    add $SEED_ADD, %eax
    ret

/* ZF set if the page at edi holds the pattern starting with eax; clobbers eax, ecx, edi. */
check_page:
    mov $PAGE_DWORDS, %ecx
1:
    cmp %eax, (%edi)
    jne 2f
    add $PATTERN_STEP, %eax
    add $4, %edi
    dec %ecx
    jnz 1b
2:
    ret

/* Write the pattern starting with eax into the page at edi; clobbers eax, ecx, edi. */
write_page:
    mov $PAGE_DWORDS, %ecx
1:
    mov %eax, (%edi)
    add $PATTERN_STEP, %eax
    add $4, %edi
    dec %ecx
    jnz 1b
    ret

/* Wait until the rate allows one more page; counts the heartbeat. Preserves all registers. */
pace:
    pushal
1:
    rdtsc
    mov %eax, %esi
    mov %edx, %edi
    sub MAILBOX + PV_LAST_TSC_LO, %eax
    sbb MAILBOX + PV_LAST_TSC_HI, %edx
    jnz 3f                                      /* >= 2^32 ticks, or the TSC went back */
    cmp MAILBOX + PV_RESYNC_TICKS, %eax
    jae 3f
    cmp MAILBOX + MB_TSC_PER_MS, %eax
    jb 4f
    mov MAILBOX + MB_TSC_PER_MS, %eax           /* one millisecond passed */
    add %eax, MAILBOX + PV_LAST_TSC_LO
    adcl $0, MAILBOX + PV_LAST_TSC_HI
    call tick
    jmp 1b
3:
    /* The VM was stopped or descheduled: start counting again from now. */
    mov %esi, MAILBOX + PV_LAST_TSC_LO
    mov %edi, MAILBOX + PV_LAST_TSC_HI
    call tick
    jmp 1b
4:
    cmpl $0, MAILBOX + MB_CFG_RATE
    je 5f                                       /* unpaced */
    cmpl $CREDIT_PER_PAGE, MAILBOX + PV_CREDIT
    jb 6f
    subl $CREDIT_PER_PAGE, MAILBOX + PV_CREDIT
5:
    popal
    ret
6:
    pause
    jmp 1b

/* One millisecond: heartbeat, and RATE more credit up to a small cap. */
tick:
    incl MAILBOX + MB_HEARTBEAT
    mov MAILBOX + MB_CFG_RATE, %eax
    cmp $MAX_RATE, %eax
    jbe 1f
    mov $MAX_RATE, %eax
1:
    mov %eax, %ecx
    shl $CREDIT_CAP_SHIFT, %ecx
    add $CREDIT_PER_PAGE, %ecx
    add MAILBOX + PV_CREDIT, %eax
    cmp %ecx, %eax
    jbe 2f
    mov %ecx, %eax
2:
    mov %eax, MAILBOX + PV_CREDIT
    ret

/* TSC ticks per millisecond, measured over CALIBRATE_MS of PIT channel 2 in mode 0. */
calibrate_tsc:
    in $0x61, %al
    and $0xFD, %al                              /* speaker off */
    or $0x01, %al                               /* gate channel 2 */
    out %al, $0x61
    mov $0xB0, %al                              /* channel 2, lo/hi byte, mode 0, binary */
    out %al, $0x43
    mov $(PIT_LATCH & 0xFF), %al
    out %al, $0x42
    mov $(PIT_LATCH >> 8), %al
    out %al, $0x42
    rdtsc
    mov %eax, %esi
    mov %edx, %edi
1:
    in $0x61, %al
    test $0x20, %al                             /* channel 2 output goes high at zero */
    jz 1b
    rdtsc
    sub %esi, %eax
    sbb %edi, %edx
    mov $CALIBRATE_MS, %ecx
    div %ecx
    test %eax, %eax
    jnz 2f
    inc %eax
2:
    mov %eax, MAILBOX + MB_TSC_PER_MS
    imul $RESYNC_MS, %eax, %eax
    mov %eax, MAILBOX + PV_RESYNC_TICKS
    ret

/*
 * Fill the configured pages once with guest-like content: a quarter zero, half text-like
 * (letters, compressible), a quarter random; the kind follows from the page number.
 */
fill:
    mov MAILBOX + MB_CFG_FILL_START, %eax
    mov MAILBOX + MB_CFG_FILL_PAGES, %ecx
    test %ecx, %ecx
    jz 9f
    call range_ok
    jnc 1f
    movl $CONFIG_BAD_FILL, MAILBOX + MB_CONFIG_STATUS
    ret
1:
    mov %eax, %ebx                              /* ebx = page */
    mov %ecx, %ebp                              /* ebp = pages left */
2:
    mov %ebx, %edi
    shl $PAGE_SHIFT, %edi
    imul $FILL_SEED_MUL, %ebx, %edx             /* edx = per-page seed and kind */
    mov %edx, %eax
    shr $30, %eax
    jz 5f                                       /* kind 0: zero */
    or $1, %edx                                 /* xorshift state must not be 0 */
    mov $PAGE_DWORDS, %ecx
3:
    mov %edx, %esi                              /* xorshift32 */
    shl $13, %esi
    xor %esi, %edx
    mov %edx, %esi
    shr $17, %esi
    xor %esi, %edx
    mov %edx, %esi
    shl $5, %esi
    xor %esi, %edx
    mov %edx, %esi
    cmp $3, %eax
    je 4f                                       /* kind 3: random */
    and $0x0F0F0F0F, %esi                       /* kinds 1, 2: letters a..p */
    add $0x61616161, %esi
4:
    mov %esi, (%edi)
    add $4, %edi
    dec %ecx
    jnz 3b
    jmp 6f
5:
    xor %eax, %eax
    mov $PAGE_DWORDS, %ecx
    rep stosl
6:
    inc %ebx
    dec %ebp
    jnz 2b
9:
    ret

    .section .note.GNU-stack, "", @progbits
