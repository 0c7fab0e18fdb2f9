/* LD_PRELOAD shim for benchmarks: every fsync, fdatasync and syncfs of the process
   waits SLOW_FSYNC_MS milliseconds (default 5) before it runs, as on storage whose
   cache flush takes that long (network block devices; bench/RESULTS.md §53). Nothing
   of mailpipe uses it. To run mailpipe with it beside an unslowed peer:

     gcc -shared -fPIC -O2 -o /tmp/slow_fsync.so bench/slow_fsync.c -ldl
     printf '#!/bin/sh\nLD_PRELOAD=/tmp/slow_fsync.so SLOW_FSYNC_MS=5 exec %s "$@"\n' \
         "$(command -v python)" > /tmp/py-slow && chmod +x /tmp/py-slow
     python bench/scale.py --rounds 0 --worker-cycles 0 --concurrency 50 \
         --peer slow=/tmp/py-slow --base-dir /mnt/benchfs
*/
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static long delay_ns(void) {
    const char *v = getenv("SLOW_FSYNC_MS");
    return (long)((v ? atof(v) : 5.0) * 1e6);
}
static void wait_a_bit(void) {
    long ns = delay_ns();
    struct timespec ts = { ns / 1000000000L, ns % 1000000000L };
    while (nanosleep(&ts, &ts) != 0) {}
}
int fsync(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fsync"); wait_a_bit(); return real(fd); }
int fdatasync(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fdatasync"); wait_a_bit(); return real(fd); }
int syncfs(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "syncfs"); wait_a_bit(); return real(fd); }
