/* Counts a process's calls into the C allocator, for `make bench`'s cost table.
 *
 * LD_PRELOAD=alloc_count.so ALLOC_COUNT_FILE=/path/to/counter <program>: every call to malloc,
 * calloc, realloc, posix_memalign, aligned_alloc, memalign and valloc adds one to a 64-bit
 * counter kept in the first 8 bytes of ALLOC_COUNT_FILE, mapped shared, so that forked children
 * (nginx's workers) add to the same counter and the bench reads it from outside while the
 * program runs (`od -An -tu8 -N8 FILE`). Frees are not counted. Rust programs count only when
 * built with the system allocator (sluice's `system-alloc` feature): mimalloc does not call
 * malloc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t local_count;
static uint64_t *counter = &local_count;

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static void *(*real_memalign)(size_t, size_t);
static void *(*real_valloc)(size_t);
static void (*real_free)(void *);

/* dlsym may call calloc before real_calloc is known: serve that from a static arena */
static char arena[4096];
static size_t arena_used;
static int resolving;

static void count(void) { __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }

static void resolve(void) {
	if (real_malloc || resolving)
		return;
	resolving = 1;
	real_malloc = dlsym(RTLD_NEXT, "malloc");
	real_calloc = dlsym(RTLD_NEXT, "calloc");
	real_realloc = dlsym(RTLD_NEXT, "realloc");
	real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
	real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
	real_memalign = dlsym(RTLD_NEXT, "memalign");
	real_valloc = dlsym(RTLD_NEXT, "valloc");
	real_free = dlsym(RTLD_NEXT, "free");
	resolving = 0;
}

__attribute__((constructor)) static void init(void) {
	resolve();
	const char *path = getenv("ALLOC_COUNT_FILE");
	if (!path)
		return;
	int fd = open(path, O_RDWR | O_CREAT, 0644);
	if (fd < 0)
		return;
	if (ftruncate(fd, sizeof(uint64_t)) == 0) {
		void *m = mmap(NULL, sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (m != MAP_FAILED)
			counter = m;
	}
	close(fd);
}

static int from_arena(void *p) { return (char *)p >= arena && (char *)p < arena + sizeof(arena); }

void *malloc(size_t n) {
	resolve();
	count();
	return real_malloc(n);
}

void *calloc(size_t n, size_t m) {
	resolve();
	if (!real_calloc) {
		size_t want = (n * m + 15) & ~(size_t)15;
		if (arena_used + want > sizeof(arena))
			return NULL;
		void *p = arena + arena_used;
		arena_used += want;
		return p; /* static storage is zeroed */
	}
	count();
	return real_calloc(n, m);
}

void *realloc(void *p, size_t n) {
	resolve();
	count();
	if (from_arena(p)) {
		void *q = real_malloc(n);
		if (q)
			memcpy(q, p, n < sizeof(arena) ? n : sizeof(arena));
		return q;
	}
	return real_realloc(p, n);
}

int posix_memalign(void **out, size_t align, size_t n) {
	resolve();
	count();
	return real_posix_memalign(out, align, n);
}

void *aligned_alloc(size_t align, size_t n) {
	resolve();
	count();
	return real_aligned_alloc(align, n);
}

void *memalign(size_t align, size_t n) {
	resolve();
	count();
	return real_memalign(align, n);
}

void *valloc(size_t n) {
	resolve();
	count();
	return real_valloc(n);
}

void free(void *p) {
	if (!p || from_arena(p))
		return;
	resolve();
	real_free(p);
}
