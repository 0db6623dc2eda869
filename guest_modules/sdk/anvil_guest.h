/*
 * anvil_guest.h — the guest side of anvil-compute's WASM job ABI, for C.
 *
 * Header-only: include it in exactly one .c file per module (every function
 * is `static`). Build with the Zig toolchain from PyPI:
 *
 *     python -m ziglang cc --target=wasm32-wasi -O2 -s -I sdk -o m.wasm m.c
 *
 * The ABI (a WASI preview 1 command; see guest_modules/GUIDE.md):
 *
 *   params   Each job param `key=value` arrives twice:
 *              - as an argument `--key=value` after argv[0], and
 *              - as an environment variable ANVIL_PARAM_<KEY>, where KEY is the
 *                key upper-cased with every byte outside [A-Za-z0-9] turned
 *                into '_' (group_by -> ANVIL_PARAM_GROUP_BY).
 *            anvil_param() reads argv first (the last --key= wins) and falls
 *            back to the environment, so a module works with either.
 *   inputs   Input i (0-based, in the job's order) is the read-only file
 *            /input/<i>: /input/0, /input/1, ... The first input is also stdin.
 *   outputs  Every regular file the module writes into /output (a fresh,
 *            writable, initially empty directory) becomes an output object
 *            named after the file.
 *   result   Whatever the module writes to stdout is the job's inline result
 *            (keep it small: the host caps it).
 *   errors   Exit with a non-zero status and a one-line message on stderr.
 *            anvil_fail() does exactly that, with exit status 1.
 */
#ifndef ANVIL_GUEST_H
#define ANVIL_GUEST_H

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ANVIL_ABI_VERSION 1
/* Every function is static; unused ones are fine. anvil_guest.c defines
 * ANVIL_API first to compile them with external linkage instead. */
#ifndef ANVIL_API
#define ANVIL_API static __attribute__((unused))
#endif
#define ANVIL_INPUT_DIR "/input"
#define ANVIL_OUTPUT_DIR "/output"
#define ANVIL_PARAM_ENV_PREFIX "ANVIL_PARAM_"

static int anvil__argc;
static char **anvil__argv;
static const char *anvil__name = "guest";

/* Print "<module>: <message>" on stderr and exit with status 1. */
__attribute__((noreturn, format(printf, 1, 2))) ANVIL_API void anvil_fail(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "%s: ", anvil__name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    exit(1);
}

/* malloc/realloc that fail the job instead of returning NULL. */
ANVIL_API void *anvil_xrealloc(void *ptr, size_t size) {
    void *p = realloc(ptr, size ? size : 1);
    if (p == NULL) anvil_fail("out of memory (wanted %zu bytes)", size);
    return p;
}

ANVIL_API void *anvil_xmalloc(size_t size) { return anvil_xrealloc(NULL, size); }

/* Remember argv for anvil_param(). Call first thing in main(). `name` prefixes
 * every error message (use the capability string, e.g. "text:wordcount"). */
ANVIL_API void anvil_init(const char *name, int argc, char **argv) {
    anvil__name = name;
    anvil__argc = argc;
    anvil__argv = argv;
}

/* The value of param `key`, or NULL when it was not given. */
ANVIL_API const char *anvil_param(const char *key) {
    size_t klen = strlen(key);
    const char *found = NULL;
    for (int i = 1; i < anvil__argc; i++) {
        const char *a = anvil__argv[i];
        if (a[0] == '-' && a[1] == '-' && strncmp(a + 2, key, klen) == 0 && a[2 + klen] == '=')
            found = a + 3 + klen; /* the last one wins, as with most CLIs */
    }
    if (found != NULL) return found;
    char env[128];
    size_t plen = strlen(ANVIL_PARAM_ENV_PREFIX);
    if (plen + klen + 1 > sizeof env) return NULL;
    memcpy(env, ANVIL_PARAM_ENV_PREFIX, plen);
    for (size_t i = 0; i < klen; i++) {
        unsigned char c = (unsigned char)key[i];
        env[plen + i] = isalnum(c) ? (char)toupper(c) : '_';
    }
    env[plen + klen] = '\0';
    return getenv(env);
}

/* The value of param `key`, or `fallback` when it was not given. */
ANVIL_API const char *anvil_param_or(const char *key, const char *fallback) {
    const char *v = anvil_param(key);
    return v != NULL ? v : fallback;
}

/* Integer param in [min, max]; `fallback` when absent; fails on anything else. */
ANVIL_API long long anvil_param_int(const char *key, long long fallback, long long min, long long max) {
    const char *v = anvil_param(key);
    if (v == NULL) return fallback;
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (*v == '\0' || *end != '\0' || errno != 0 || isspace((unsigned char)*v))
        anvil_fail("param %s: expected an integer, got '%s'", key, v);
    if (n < min || n > max) anvil_fail("param %s: %lld is outside [%lld, %lld]", key, n, min, max);
    return n;
}

/* Fail when argv holds anything but --key=value with a key from `allowed`
 * (a NULL-terminated list): catches typos such as --colum=price. */
ANVIL_API void anvil_check_params(const char *const allowed[]) {
    for (int i = 1; i < anvil__argc; i++) {
        const char *a = anvil__argv[i];
        const char *eq = strchr(a, '=');
        if (a[0] != '-' || a[1] != '-' || eq == NULL || eq == a + 2)
            anvil_fail("unexpected argument '%s' (params are --key=value)", a);
        size_t klen = (size_t)(eq - (a + 2));
        int ok = 0;
        for (const char *const *k = allowed; *k != NULL; k++)
            if (strlen(*k) == klen && strncmp(*k, a + 2, klen) == 0) ok = 1;
        if (!ok) anvil_fail("unknown param '%.*s'", (int)klen, a + 2);
    }
}

/* Input `index` opened for reading, or NULL when the job has no such input.
 * Input 0 is stdin (the same bytes as /input/0, and works as a stream). */
ANVIL_API FILE *anvil_input_try(int index) {
    if (index == 0) return stdin;
    char path[64];
    snprintf(path, sizeof path, ANVIL_INPUT_DIR "/%d", index);
    return fopen(path, "rb");
}

/* Input `index` opened for reading; fails the job when it is missing. */
ANVIL_API FILE *anvil_input(int index) {
    FILE *f = anvil_input_try(index);
    if (f == NULL) anvil_fail("input %d is missing (%s/%d)", index, ANVIL_INPUT_DIR, index);
    return f;
}

/* Read all of `f` into a new NUL-terminated buffer; `*len` gets the size. */
ANVIL_API unsigned char *anvil_read_all(FILE *f, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = anvil_xmalloc(cap);
    for (;;) {
        if (cap - n < 2) {
            cap *= 2;
            buf = anvil_xrealloc(buf, cap);
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    if (ferror(f)) anvil_fail("read error: %s", strerror(errno));
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Create /output/<name> for writing. `name` is a plain file name: no '/', not
 * "." or "..". The file becomes an output object once the module exits 0. */
ANVIL_API FILE *anvil_output(const char *name) {
    if (name[0] == '\0' || strchr(name, '/') != NULL || strcmp(name, ".") == 0 ||
        strcmp(name, "..") == 0)
        anvil_fail("bad output name '%s'", name);
    char path[512];
    if ((size_t)snprintf(path, sizeof path, ANVIL_OUTPUT_DIR "/%s", name) >= sizeof path)
        anvil_fail("output name too long");
    FILE *f = fopen(path, "wb");
    if (f == NULL) anvil_fail("cannot create %s: %s", path, strerror(errno));
    return f;
}

/* Close a file from anvil_output(), failing the job if any write was lost. */
ANVIL_API void anvil_output_close(FILE *f) {
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) anvil_fail("writing an output failed: %s", strerror(errno));
}

/* Write `s[0..len)` as a JSON string literal. Invalid UTF-8 is replaced by
 * U+FFFD, one per maximal invalid subpart (the same as Python's
 * bytes.decode("utf-8", "replace")), so the output is always valid JSON. */
ANVIL_API void anvil_json_string(FILE *out, const unsigned char *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    fputc('"', out);
    size_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        if (c < 0x80) {
            if (c == '"' || c == '\\') {
                fputc('\\', out);
                fputc(c, out);
            } else if (c < 0x20 || c == 0x7f) {
                fprintf(out, "\\u00%c%c", hex[c >> 4], hex[c & 15]);
            } else {
                fputc(c, out);
            }
            i++;
            continue;
        }
        /* Expected length and the allowed range of the second byte (RFC 3629). */
        size_t need = 0;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) need = 2;
        else if (c >= 0xE0 && c <= 0xEF) need = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        else if (c >= 0xF0 && c <= 0xF4) need = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        size_t k = 1;
        while (need && k < need && i + k < len) {
            unsigned char b = s[i + k];
            if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) break;
            k++;
        }
        if (need && k == need) {
            fwrite(s + i, 1, k, out);
        } else {
            fputs("\xEF\xBF\xBD", out);
        }
        i += k;
    }
    fputc('"', out);
}

#endif /* ANVIL_GUEST_H */
