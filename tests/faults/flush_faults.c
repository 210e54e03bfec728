/* Flushes of LMDB's data file that fail in the middle of a commit, for tests/test_flush_faults.py.
 *
 * LMDB commits in three steps: it writes the transaction's pages, flushes them (fdatasync), then
 * writes the meta page that makes them the current state, through a descriptor opened with
 * O_DSYNC (the write returns once it is on the disk). Here the first step succeeds and a later
 * one fails, with EIO, as a failing disk or a lost storage path would, while the file named by
 * MEMOS_FLUSH_FAULT_FILE exists:
 *
 *   "fsync"  every fsync/fdatasync of a "data.mdb" fails: the pages are written, not flushed;
 *   "meta"   every write through an O_SYNC/O_DSYNC descriptor of a "data.mdb" fails: the pages
 *            are flushed, the meta page (the commit point) is not written.
 *
 * Load it before tests/faults/faults.c (LD_PRELOAD="flush_faults.so faults.so"): what it lets
 * through goes on to that shim, so a flush that failed here is not in its power-loss image.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int (*next_fsync)(int);
static int (*next_fdatasync)(int);
static ssize_t (*next_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*next_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*next_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*next_write)(int, const void *, size_t);

static void init(void) {
    if (next_fsync) return;
    next_fsync = dlsym(RTLD_NEXT, "fsync");
    next_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    next_pwrite = dlsym(RTLD_NEXT, "pwrite");
    next_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    next_pwritev = dlsym(RTLD_NEXT, "pwritev");
    next_write = dlsym(RTLD_NEXT, "write");
}

/* The fault named in the trigger file ("" if none), read fresh each time. */
static void fault(char *what, size_t size) {
    what[0] = 0;
    const char *file = getenv("MEMOS_FLUSH_FAULT_FILE");
    if (!file) return;
    FILE *f = fopen(file, "re");
    if (!f) return;
    size_t n = fread(what, 1, size - 1, f);
    fclose(f);
    what[n] = 0;
}

static int is_data_file(int fd) {
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 8) return 0;
    path[n] = 0;
    return strcmp(path + n - 8, "data.mdb") == 0;
}

/* 1 (errno EIO) if this flush must fail now. */
static int failing_flush(int fd) {
    char what[16];
    fault(what, sizeof what);
    if (strncmp(what, "fsync", 5) != 0 || !is_data_file(fd)) return 0;
    errno = EIO;
    return 1;
}

/* 1 (errno EIO) if this write, through a synchronous descriptor (the meta page), must fail now. */
static int failing_sync_write(int fd) {
    char what[16];
    fault(what, sizeof what);
    if (strncmp(what, "meta", 4) != 0) return 0;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || !(flags & (O_SYNC | O_DSYNC)) || !is_data_file(fd)) return 0;
    errno = EIO;
    return 1;
}

int fsync(int fd) { init(); return failing_flush(fd) ? -1 : next_fsync(fd); }
int fdatasync(int fd) { init(); return failing_flush(fd) ? -1 : next_fdatasync(fd); }

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    init(); return failing_sync_write(fd) ? -1 : next_pwrite(fd, buf, count, offset);
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    init(); return failing_sync_write(fd) ? -1 : next_pwrite64(fd, buf, count, offset);
}
ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    init(); return failing_sync_write(fd) ? -1 : next_pwritev(fd, iov, iovcnt, offset);
}
ssize_t write(int fd, const void *buf, size_t count) {
    init(); return failing_sync_write(fd) ? -1 : next_write(fd, buf, count);
}
