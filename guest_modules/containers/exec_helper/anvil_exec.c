/*
 * anvil-exec: run a container job's command with input 0 as its stdin.
 *
 *     anvil-exec PROGRAM [ARG...]
 *
 * Opens /input/0, when the job has inputs, as file descriptor 0, then runs
 * PROGRAM, found on PATH as execvp(3) finds it, with the arguments and the
 * environment unchanged. Exit status 127: PROGRAM not found; 126: found but
 * not runnable; 125: /input/0 exists but cannot be opened, or the sandbox is
 * not ours (the message then starts "anvil-exec: sandbox:").
 *
 * First it checks, from inside, the one thing Podman's inspect cannot show:
 * that our seccomp profile is in force. It refuses unshare outright, even
 * unshare(0), which changes nothing and which Podman's default profile allows.
 *
 * Why: the executor runs the command through Podman's exec API (the
 * container's own process is a pause process that keeps /output readable).
 * Stdin attached through that API loses the command's output whenever the
 * command leaves stdin unread (conmon 2.1 resets the stream), so the executor
 * attaches none and the command's stdin comes from here. Bind-mounted
 * read-only into every container at /.anvil-exec by daemon/executors/podman/executor.py.
 *
 * Freestanding: no C library, raw system calls for x86_64 and aarch64, so
 * one static binary per machine runs in any image. Built byte for byte by
 * guest_modules/containers/build_exec_helper.py.
 */

typedef unsigned long size_t;

#if defined(__x86_64__)
enum { SYS_write = 1, SYS_close = 3, SYS_dup3 = 292, SYS_execve = 59, SYS_openat = 257, SYS_exit_group = 231, SYS_unshare = 272 };
__asm__(".text\n.global _start\n_start:\n\txor %rbp, %rbp\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start_c\n\thlt\n");
static long sys3(long n, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
enum { SYS_write = 64, SYS_close = 57, SYS_dup3 = 24, SYS_execve = 221, SYS_openat = 56, SYS_exit_group = 94, SYS_unshare = 97 };
__asm__(".text\n.global _start\n_start:\n\tmov x29, #0\n\tmov x30, #0\n\tmov x0, sp\n\tbl start_c\n\tbrk #0\n");
static long sys3(long n, long a, long b, long c) {
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    __asm__ volatile("svc #0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
    return x0;
}
#else
#error "anvil-exec supports x86_64 and aarch64"
#endif

enum { AT_FDCWD = -100, O_RDONLY = 0, EPERM = 1, ENOENT = 2, EACCES = 13, ENOTDIR = 20, PATH_MAX = 4096 };

/* The compiler may turn byte loops into calls to these. */
void *memcpy(void *dst, const void *src, size_t n) {
    volatile char *d = dst;
    const volatile char *s = src;
    while (n--) *d++ = *s++;
    return dst;
}
void *memset(void *dst, int c, size_t n) {
    volatile char *d = dst;
    while (n--) *d++ = (char)c;
    return dst;
}

static size_t length(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

static void say(const char *s) { sys3(SYS_write, 2, (long)s, (long)length(s)); }

static __attribute__((noreturn)) void fail(const char *program, const char *why, int status) {
    say("anvil-exec: ");
    say(program);
    say(": ");
    say(why);
    say("\n");
    sys3(SYS_exit_group, status, 0, 0);
    __builtin_unreachable();
}

static const char *path_of(char **envp) {
    for (; *envp; envp++) {
        const char *e = *envp;
        if (e[0] == 'P' && e[1] == 'A' && e[2] == 'T' && e[3] == 'H' && e[4] == '=') return e + 5;
    }
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
}

__attribute__((noreturn, used)) void start_c(long *sp) {
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    char **envp = argv + argc + 1;
    if (argc < 2) fail("anvil-exec", "usage: anvil-exec PROGRAM [ARG...]", 125);
    if (sys3(SYS_unshare, 0, 0, 0) != -EPERM)
        fail("sandbox", "unshare is allowed: the seccomp profile of anvil-compute is not in force", 125);

    long fd = sys3(SYS_openat, AT_FDCWD, (long)"/input/0", O_RDONLY);
    if (fd >= 0) {
        if (fd != 0 && (sys3(SYS_dup3, fd, 0, 0) < 0 || sys3(SYS_close, fd, 0, 0) < 0))
            fail("/input/0", "cannot make it stdin", 125);
    } else if (fd != -ENOENT) {
        fail("/input/0", "cannot open it", 125);
    }

    const char *program = argv[1];
    for (const char *c = program; *c; c++) {
        if (*c == '/') {
            long err = sys3(SYS_execve, (long)program, (long)(argv + 1), (long)envp);
            fail(program, err == -ENOENT ? "not found" : "cannot run it", err == -ENOENT ? 127 : 126);
        }
    }
    size_t plen = length(program);
    int denied = 0;
    for (const char *dir = path_of(envp);;) {
        const char *end = dir;
        while (*end && *end != ':') end++;
        size_t dlen = (size_t)(end - dir);
        char full[PATH_MAX];
        if (dlen + 1 + plen < sizeof full) {
            size_t i = 0;
            if (dlen == 0) full[i++] = '.';
            for (const char *c = dir; c < end; c++) full[i++] = *c;
            full[i++] = '/';
            for (size_t k = 0; k <= plen; k++) full[i++] = program[k];
            long err = sys3(SYS_execve, (long)full, (long)(argv + 1), (long)envp);
            if (err == -EACCES) denied = 1;
            else if (err != -ENOENT && err != -ENOTDIR) fail(program, "cannot run it", 126);
        }
        if (!*end) break;
        dir = end + 1;
    }
    if (denied) fail(program, "permission denied", 126);
    fail(program, "not found on PATH", 127);
}
