/*
 * text:wordcount — count lines, words and bytes of the first input, and its
 * most frequent words.
 *
 * Params: top (optional, 0..10000, default 10) — how many words `top` lists.
 * Result (stdout): {"lines": L, "words": W, "bytes": B, "top": [["word", n], ...]}
 *
 *   bytes  the input's size in bytes.
 *   lines  the number of '\n' bytes, plus one when the input is non-empty and
 *          does not end with '\n' (a last line without a newline still counts).
 *   words  the number of maximal runs of bytes other than ASCII whitespace
 *          (space, \t, \n, \v, \f, \r) — the same as `wc -w` in the C locale.
 *   top    words after normalising: ASCII letters lower-cased, leading and
 *          trailing ASCII punctuation (!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~)
 *          stripped; a word that is only punctuation is left out of `top`
 *          (it still counts in `words`). The `top` most frequent, by count
 *          descending, then by the word's bytes ascending. Words that are not
 *          valid UTF-8 are shown with U+FFFD replacing the bad bytes.
 *
 * The input is streamed from stdin in 64 KiB reads, so its size is bounded only
 * by the memory the distinct words need.
 */
#include "anvil_guest.h"

#define CHUNK (1 << 16)

typedef struct {
    uint64_t hash; /* 0 = empty slot */
    uint64_t count;
    uint32_t off; /* into the word arena */
    uint32_t len;
} Entry;

static Entry *table;
static size_t table_cap, table_used;
static unsigned char *arena;
static size_t arena_len, arena_cap;

static unsigned char is_space[256], is_punct[256], lower[256];

static void init_tables(void) {
    for (int c = 0; c < 256; c++) {
        lower[c] = (unsigned char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
        is_punct[c] = c < 0x80 && ispunct(c);
    }
    is_space[' '] = is_space['\t'] = is_space['\n'] = is_space['\v'] = is_space['\f'] =
        is_space['\r'] = 1;
}

static void table_grow(void) {
    size_t old_cap = table_cap;
    Entry *old = table;
    table_cap = old_cap ? old_cap * 2 : 1 << 12;
    table = anvil_xmalloc(table_cap * sizeof *table);
    memset(table, 0, table_cap * sizeof *table);
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].hash == 0) continue;
        size_t j = old[i].hash & (table_cap - 1);
        while (table[j].hash != 0) j = (j + 1) & (table_cap - 1);
        table[j] = old[i];
    }
    free(old);
}

/* Count one word: normalise, then find or insert it. */
static void add_word(const unsigned char *w, size_t len) {
    while (len > 0 && is_punct[w[0]]) w++, len--;
    while (len > 0 && is_punct[w[len - 1]]) len--;
    if (len == 0) return;
    if (len > UINT32_MAX) anvil_fail("a word longer than 4 GiB");

    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a over the lower-cased bytes */
    for (size_t i = 0; i < len; i++) h = (h ^ lower[w[i]]) * 0x100000001b3ull;
    h |= 1; /* never 0, which marks an empty slot */

    if ((table_used + 1) * 2 > table_cap) table_grow();
    size_t j = h & (table_cap - 1);
    for (;; j = (j + 1) & (table_cap - 1)) {
        Entry *e = &table[j];
        if (e->hash == 0) break;
        if (e->hash != h || e->len != len) continue;
        const unsigned char *s = arena + e->off;
        size_t i = 0;
        while (i < len && s[i] == lower[w[i]]) i++;
        if (i == len) {
            e->count++;
            return;
        }
    }
    if (arena_len + len > UINT32_MAX) anvil_fail("more than 4 GiB of distinct words");
    if (arena_len + len > arena_cap) {
        arena_cap = (arena_len + len) * 2;
        arena = anvil_xrealloc(arena, arena_cap);
    }
    for (size_t i = 0; i < len; i++) arena[arena_len + i] = lower[w[i]];
    table[j] = (Entry){.hash = h, .count = 1, .off = (uint32_t)arena_len, .len = (uint32_t)len};
    arena_len += len;
    table_used++;
}

static int by_count_then_bytes(const void *pa, const void *pb) {
    const Entry *a = pa, *b = pb;
    if (a->count != b->count) return a->count > b->count ? -1 : 1;
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(arena + a->off, arena + b->off, n);
    if (c != 0) return c;
    return (a->len > b->len) - (a->len < b->len);
}

int main(int argc, char **argv) {
    anvil_init("text:wordcount", argc, argv);
    static const char *const params[] = {"top", NULL};
    anvil_check_params(params);
    long long top = anvil_param_int("top", 10, 0, 10000);
    init_tables();
    table_grow();

    FILE *in = anvil_input(0);
    static unsigned char buf[CHUNK];
    unsigned char *carry = NULL; /* a word cut by the end of a read */
    size_t carry_len = 0, carry_cap = 0;
    uint64_t bytes = 0, newlines = 0, words = 0;
    unsigned char last = '\n';
    size_t n;

    while ((n = fread(buf, 1, sizeof buf, in)) > 0) {
        bytes += n;
        last = buf[n - 1];
        size_t i = 0;
        if (carry_len > 0) {
            while (i < n && !is_space[buf[i]]) i++;
            if (carry_len + i > carry_cap) {
                carry_cap = (carry_len + i) * 2;
                carry = anvil_xrealloc(carry, carry_cap);
            }
            memcpy(carry + carry_len, buf, i);
            carry_len += i;
            if (i == n) continue;
            words++;
            add_word(carry, carry_len);
            carry_len = 0;
        }
        for (;;) {
            while (i < n && is_space[buf[i]]) newlines += buf[i++] == '\n';
            if (i == n) break;
            size_t start = i;
            while (i < n && !is_space[buf[i]]) i++;
            if (i == n) {
                carry_len = i - start;
                if (carry_len > carry_cap) {
                    carry_cap = carry_len * 2;
                    carry = anvil_xrealloc(carry, carry_cap);
                }
                memcpy(carry, buf + start, carry_len);
                break;
            }
            words++;
            add_word(buf + start, i - start);
        }
    }
    if (ferror(in)) anvil_fail("reading the input failed: %s", strerror(errno));
    if (carry_len > 0) {
        words++;
        add_word(carry, carry_len);
    }

    /* Compact the table to its used entries, then sort them. */
    size_t m = 0;
    for (size_t i = 0; i < table_cap; i++)
        if (table[i].hash != 0) table[m++] = table[i];
    qsort(table, m, sizeof *table, by_count_then_bytes);

    uint64_t lines = newlines + (bytes > 0 && last != '\n');
    printf("{\"lines\": %llu, \"words\": %llu, \"bytes\": %llu, \"top\": [",
           (unsigned long long)lines, (unsigned long long)words, (unsigned long long)bytes);
    for (size_t i = 0; i < m && i < (size_t)top; i++) {
        if (i > 0) fputs(", ", stdout);
        fputc('[', stdout);
        anvil_json_string(stdout, arena + table[i].off, table[i].len);
        printf(", %llu]", (unsigned long long)table[i].count);
    }
    puts("]}");
    if (fflush(stdout) != 0) anvil_fail("writing the result failed");
    return 0;
}
