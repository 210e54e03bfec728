/* Faults for LMDB files, loaded into memosd with LD_PRELOAD by tests/test_powerloss.py and
 * tests/test_disk_faults.py: power loss, and a disk that fails or fills up.
 *
 * Power loss.
 * After a power cut, a file holds what was flushed to the disk and nothing else. This shim keeps,
 * beside each LMDB data file ("data.mdb"), an image of it as of its last flush: whenever the
 * process calls fsync/fdatasync on the file, or writes to it through a descriptor opened with
 * O_SYNC/O_DSYNC (LMDB writes its meta page that way), the whole file is copied to
 * "data.mdb.durable" (written to a temporary file, then renamed: the image is always a complete
 * flush). A test kills the daemon, puts the image in place of the file, and checks that every
 * acknowledged write is still there. With commits not flushed (MDB_NOSYNC) the image falls
 * behind and acknowledged writes are lost: the test fails, as it must.
 *
 * Failing disk. While the file named by MEMOS_FAULT_FILE exists, every write to and flush of an
 * LMDB data file fails: with ENOSPC if the file says "enospc", else with EIO.
 *
 * Counting flushes. When MEMOS_SYNC_COUNT names a file, every successful fsync/fdatasync of an
 * LMDB data file adds one to a count that the file then holds (a decimal number): one per durable
 * commit. tests/test_bounds.py reads it to tell how many commits a burst of requests cost.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 4096
static char tracked[MAX_FD];  /* 1: an LMDB data file; 2: one opened with O_SYNC/O_DSYNC */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_close)(int);

static void init(void) {
    if (real_open) return;
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    real_write = dlsym(RTLD_NEXT, "write");
    real_close = dlsym(RTLD_NEXT, "close");
}

static int is_data_file(const char *path) {
    size_t n = strlen(path);
    return n >= 8 && strcmp(path + n - 8, "data.mdb") == 0;
}

static void track(int fd, const char *path, int flags) {
    if (fd >= 0 && fd < MAX_FD && path && is_data_file(path))
        tracked[fd] = (flags & (O_SYNC | O_DSYNC)) ? 2 : 1;
}

/* Copy the file behind fd to "<path>.durable", atomically. */
static void snapshot(int fd) {
    char link[64], path[PATH_MAX], tmp[PATH_MAX + 16], image[PATH_MAX + 16];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return;
    path[n] = 0;
    snprintf(tmp, sizeof tmp, "%s.durable.tmp", path);
    snprintf(image, sizeof image, "%s.durable", path);
    pthread_mutex_lock(&lock);
    int src = real_open(path, O_RDONLY), dst = real_open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (src >= 0 && dst >= 0) {
        char buf[1 << 16];
        ssize_t got;
        while ((got = read(src, buf, sizeof buf)) > 0) {
            if (real_write(dst, buf, (size_t)got) != got) break;
        }
        rename(tmp, image);
    }
    if (src >= 0) real_close(src);
    if (dst >= 0) real_close(dst);
    pthread_mutex_unlock(&lock);
}

static long sync_count = 0;

/* One more flush of an LMDB data file: write the count to MEMOS_SYNC_COUNT, if set. */
static void count_sync(void) {
    const char *file = getenv("MEMOS_SYNC_COUNT");
    if (!file) return;
    pthread_mutex_lock(&lock);
    char text[32];
    int n = snprintf(text, sizeof text, "%ld\n", ++sync_count);
    int f = real_open(file, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (f >= 0) {
        if (real_write(f, text, (size_t)n) != n) { /* a short count is read as such */ }
        real_close(f);
    }
    pthread_mutex_unlock(&lock);
}

static int synced(int fd) { return fd >= 0 && fd < MAX_FD && tracked[fd] == 2; }
static int data(int fd) { return fd >= 0 && fd < MAX_FD && tracked[fd]; }

/* 1 (errno set) if writes to fd must fail now. */
static int failing(int fd) {
    const char *file = getenv("MEMOS_FAULT_FILE");
    if (!file || !data(fd)) return 0;
    int f = real_open(file, O_RDONLY);
    if (f < 0) return 0;
    char what[16] = {0};
    ssize_t n = read(f, what, sizeof what - 1);
    real_close(f);
    errno = (n >= 6 && strncmp(what, "enospc", 6) == 0) ? ENOSPC : EIO;
    return 1;
}

int open(const char *path, int flags, ...) {
    init();
    va_list ap; va_start(ap, flags); mode_t mode = va_arg(ap, int); va_end(ap);
    int fd = real_open(path, flags, mode);
    track(fd, path, flags);
    return fd;
}

int open64(const char *path, int flags, ...) {
    init();
    va_list ap; va_start(ap, flags); mode_t mode = va_arg(ap, int); va_end(ap);
    int fd = real_open64(path, flags, mode);
    track(fd, path, flags);
    return fd;
}

int close(int fd) {
    init();
    if (fd >= 0 && fd < MAX_FD) tracked[fd] = 0;
    return real_close(fd);
}

int fsync(int fd) {
    init(); if (failing(fd)) return -1;
    int rc = real_fsync(fd); if (rc == 0 && data(fd)) { snapshot(fd); count_sync(); } return rc;
}
int fdatasync(int fd) {
    init(); if (failing(fd)) return -1;
    int rc = real_fdatasync(fd); if (rc == 0 && data(fd)) { snapshot(fd); count_sync(); } return rc;
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    init(); if (failing(fd)) return -1;
    ssize_t rc = real_pwrite(fd, buf, count, offset); if (rc > 0 && synced(fd)) snapshot(fd); return rc;
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    init(); if (failing(fd)) return -1;
    ssize_t rc = real_pwrite64(fd, buf, count, offset); if (rc > 0 && synced(fd)) snapshot(fd); return rc;
}
ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    init(); if (failing(fd)) return -1;
    ssize_t rc = real_pwritev(fd, iov, iovcnt, offset); if (rc > 0 && synced(fd)) snapshot(fd); return rc;
}
ssize_t write(int fd, const void *buf, size_t count) {
    init(); if (failing(fd)) return -1;
    ssize_t rc = real_write(fd, buf, count); if (rc > 0 && synced(fd)) snapshot(fd); return rc;
}
