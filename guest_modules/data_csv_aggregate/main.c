/*
 * data:csv-aggregate — group the rows of a CSV file and aggregate one column.
 *
 * Params:
 *   group_by  (required) name of the column whose values form the groups.
 *   agg       (required) sum | count | mean | min | max.
 *   column    name of the column to aggregate; required unless agg=count.
 *
 * Input (the first input, streamed from stdin): CSV as in RFC 4180. The first
 * record is the header. Fields are separated by ','; a field may be quoted
 * with '"', and then holds commas, line breaks and doubled quotes (""). Records
 * end with "\n" or "\r\n". Blank lines and a leading UTF-8 byte order mark
 * are skipped. Every record must have as many fields as the header. Values of
 * `column` must be decimal numbers (surrounding spaces allowed; inf, nan and
 * hex are refused).
 *
 * Result (stdout): CSV with a header row `<group_by>,<agg>_<column>` (or
 * `<group_by>,count`), then one `group,value` row per group, groups sorted by
 * their bytes ascending. count is an integer; the others print as an integer
 * when integral, else as the shortest decimal that reads back as the same
 * double (sums run in input order).
 *
 * Errors name the line where the bad record starts: "line 7: expected 3
 * fields, got 2", "line 9: unterminated quoted field", ...
 */
#include <math.h>

#include "anvil_guest.h"

#define CHUNK (1 << 16)

enum { AGG_SUM, AGG_COUNT, AGG_MEAN, AGG_MIN, AGG_MAX };

typedef struct {
    uint64_t hash; /* 0 = empty slot */
    uint32_t off, len;
    uint64_t count;
    double sum, min, max;
} Group;

static Group *groups;
static size_t groups_cap, groups_used;
static unsigned char *names; /* arena of group names */
static size_t names_len, names_cap;

/* The record being parsed: field bytes back to back, and where each ends. */
static unsigned char *rec;
static size_t rec_len, rec_cap;
static size_t *ends;
static size_t nfields, ends_cap;

static int agg;
static const char *group_name, *column_name;
static long group_idx = -1, column_idx = -1;
static size_t header_fields; /* 0 until the header was read */
static uint64_t record_line; /* line where the current record starts */

static void groups_grow(void) {
    size_t old_cap = groups_cap;
    Group *old = groups;
    groups_cap = old_cap ? old_cap * 2 : 1 << 10;
    groups = anvil_xmalloc(groups_cap * sizeof *groups);
    memset(groups, 0, groups_cap * sizeof *groups);
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].hash == 0) continue;
        size_t j = old[i].hash & (groups_cap - 1);
        while (groups[j].hash != 0) j = (j + 1) & (groups_cap - 1);
        groups[j] = old[i];
    }
    free(old);
}

static Group *group_for(const unsigned char *s, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    h |= 1;
    if ((groups_used + 1) * 2 > groups_cap) groups_grow();
    size_t j = h & (groups_cap - 1);
    for (;; j = (j + 1) & (groups_cap - 1)) {
        Group *g = &groups[j];
        if (g->hash == 0) break;
        if (g->hash == h && g->len == len && memcmp(names + g->off, s, len) == 0) return g;
    }
    if (names_len + len > UINT32_MAX) anvil_fail("more than 4 GiB of group names");
    if (names_len + len > names_cap) {
        names_cap = (names_len + len) * 2 + 64;
        names = anvil_xrealloc(names, names_cap);
    }
    memcpy(names + names_len, s, len);
    Group *g = &groups[j];
    *g = (Group){.hash = h, .off = (uint32_t)names_len, .len = (uint32_t)len};
    names_len += len;
    groups_used++;
    return g;
}

static const unsigned char *field(size_t i, size_t *len) {
    size_t start = i == 0 ? 0 : ends[i - 1];
    *len = ends[i] - start;
    return rec + start;
}

/* Parse a decimal number. Plain decimals of up to 15 significant digits take
 * an exact fast path (the result equals strtod's); anything else goes to strtod. */
static int parse_number(const unsigned char *s, size_t len, double *out) {
    while (len > 0 && (*s == ' ' || *s == '\t')) s++, len--;
    while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t')) len--;
    if (len == 0) return 0;
    static const double pow10[] = {1e0, 1e1, 1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                   1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15};
    size_t i = 0;
    int neg = 0;
    if (s[0] == '-' || s[0] == '+') neg = s[0] == '-', i = 1;
    uint64_t mant = 0;
    int digits = 0, frac = 0, seen_dot = 0, ok = i < len;
    for (; i < len; i++) {
        if (s[i] >= '0' && s[i] <= '9') {
            mant = mant * 10 + (uint64_t)(s[i] - '0');
            digits += mant != 0;
            frac += seen_dot;
        } else if (s[i] == '.' && !seen_dot) {
            seen_dot = 1;
        } else {
            ok = 0;
            break;
        }
    }
    if (ok && digits <= 15 && frac <= 15 && len > (size_t)(seen_dot + (s[0] == '-' || s[0] == '+'))) {
        double v = (double)mant / pow10[frac];
        *out = neg ? -v : v;
        return 1;
    }
    char tmp[128];
    if (len >= sizeof tmp) return 0;
    memcpy(tmp, s, len);
    tmp[len] = '\0';
    for (size_t k = 0; k < len; k++)
        if (tmp[k] == 'x' || tmp[k] == 'X') return 0;
    char *end;
    double v = strtod(tmp, &end);
    if (end != tmp + len || !isfinite(v)) return 0;
    *out = v;
    return 1;
}

static long find_column(const char *name, const char *param) {
    for (size_t i = 0; i < nfields; i++) {
        size_t len;
        const unsigned char *f = field(i, &len);
        if (strlen(name) == len && memcmp(f, name, len) == 0) return (long)i;
    }
    fprintf(stderr, "data:csv-aggregate: param %s: no column named '%s' in the header (columns:",
            param, name);
    for (size_t i = 0; i < nfields; i++) {
        size_t len;
        const unsigned char *f = field(i, &len);
        fprintf(stderr, "%s '%.*s'", i ? "," : "", (int)len, (const char *)f);
    }
    fputs(")\n", stderr);
    exit(1);
}

static void end_record(void) {
    if (header_fields == 0) {
        header_fields = nfields;
        group_idx = find_column(group_name, "group_by");
        if (agg != AGG_COUNT) column_idx = find_column(column_name, "column");
        return;
    }
    if (nfields != header_fields)
        anvil_fail("line %llu: expected %zu fields, got %zu", (unsigned long long)record_line,
                   header_fields, nfields);
    size_t glen;
    const unsigned char *g = field((size_t)group_idx, &glen);
    double v = 0;
    if (column_idx >= 0) {
        size_t vlen;
        const unsigned char *s = field((size_t)column_idx, &vlen);
        if (!parse_number(s, vlen, &v))
            anvil_fail("line %llu: column '%s' is not a number: '%.*s'",
                       (unsigned long long)record_line, column_name, (int)(vlen > 40 ? 40 : vlen),
                       (const char *)s);
    }
    Group *gr = group_for(g, glen);
    if (gr->count == 0) gr->min = gr->max = v;
    gr->count++;
    gr->sum += v;
    if (v < gr->min) gr->min = v;
    if (v > gr->max) gr->max = v;
}

static void push_byte(unsigned char c) {
    if (rec_len == rec_cap) {
        rec_cap = rec_cap ? rec_cap * 2 : 1024;
        rec = anvil_xrealloc(rec, rec_cap);
    }
    rec[rec_len++] = c;
}

static void end_field(void) {
    if (nfields == ends_cap) {
        ends_cap = ends_cap ? ends_cap * 2 : 64;
        ends = anvil_xrealloc(ends, ends_cap * sizeof *ends);
    }
    ends[nfields++] = rec_len;
}

/* Write a CSV field, quoted when it holds a comma, a quote or a line break. */
static void put_field(const unsigned char *s, size_t len) {
    int quote = 0;
    for (size_t i = 0; i < len; i++)
        if (s[i] == ',' || s[i] == '"' || s[i] == '\n' || s[i] == '\r') quote = 1;
    if (!quote) {
        fwrite(s, 1, len, stdout);
        return;
    }
    putchar('"');
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '"') putchar('"');
        putchar(s[i]);
    }
    putchar('"');
}

/* Integral values print as integers; others as the shortest %g that reads back
 * as the same double. */
static void put_number(double v) {
    char buf[40];
    if (v == floor(v) && fabs(v) < 1e17) {
        printf("%.0f", v == 0 ? 0.0 : v); /* no "-0" */
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    fputs(buf, stdout);
}

static int by_name(const void *pa, const void *pb) {
    const Group *a = pa, *b = pb;
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(names + a->off, names + b->off, n);
    if (c != 0) return c;
    return (a->len > b->len) - (a->len < b->len);
}

enum { FIELD_START, UNQUOTED, QUOTED, QUOTE_IN_QUOTED, AFTER_CR };

int main(int argc, char **argv) {
    anvil_init("data:csv-aggregate", argc, argv);
    static const char *const params[] = {"group_by", "agg", "column", NULL};
    anvil_check_params(params);
    group_name = anvil_param("group_by");
    if (group_name == NULL) anvil_fail("param group_by is required");
    const char *agg_name = anvil_param("agg");
    if (agg_name == NULL) anvil_fail("param agg is required (sum, count, mean, min or max)");
    static const char *const agg_names[] = {"sum", "count", "mean", "min", "max"};
    agg = -1;
    for (int i = 0; i < 5; i++)
        if (strcmp(agg_name, agg_names[i]) == 0) agg = i;
    if (agg < 0) anvil_fail("param agg: '%s' is not one of sum, count, mean, min, max", agg_name);
    column_name = anvil_param("column");
    if (column_name == NULL && agg != AGG_COUNT) anvil_fail("param column is required for agg=%s", agg_name);
    groups_grow();

    FILE *in = anvil_input(0);
    static unsigned char buf[CHUNK];
    uint64_t line = 1;
    int state = FIELD_START, in_record = 0, blank_cr = 0;
    size_t n, skip = 0;
    int first_read = 1;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) {
        if (first_read && n >= 3 && memcmp(buf, "\xEF\xBB\xBF", 3) == 0) skip = 3; /* UTF-8 BOM */
        first_read = 0;
        for (size_t i = skip; i < n; i++) {
            unsigned char c = buf[i];
            if (!in_record) {
                if (c == '\n') { /* a blank line */
                    line++;
                    continue;
                }
                in_record = 1;
                blank_cr = c == '\r'; /* maybe a blank "\r\n" line */
                record_line = line;
                rec_len = nfields = 0;
            }
            switch (state) {
            case QUOTE_IN_QUOTED:
                if (c == '"') {
                    push_byte('"');
                    state = QUOTED;
                    break;
                }
                if (c != ',' && c != '\n' && c != '\r')
                    anvil_fail("line %llu: unexpected character after a closing quote",
                               (unsigned long long)record_line);
                /* fall through: a separator ends the field as usual */
            case UNQUOTED:
                if (c != ',' && c != '\n' && c != '\r' && c != '"') {
                    push_byte(c);
                    break;
                }
                if (c == '"' && state == UNQUOTED)
                    anvil_fail("line %llu: quote inside an unquoted field",
                               (unsigned long long)record_line);
                /* fall through */
            case FIELD_START:
                if (c == ',') {
                    end_field();
                    state = FIELD_START;
                } else if (c == '\n') {
                    end_field();
                    end_record();
                    line++;
                    in_record = 0;
                    state = FIELD_START;
                } else if (c == '\r') {
                    state = AFTER_CR;
                } else if (c == '"') {
                    state = QUOTED;
                } else {
                    push_byte(c);
                    state = UNQUOTED;
                }
                break;
            case QUOTED:
                if (c == '"') {
                    state = QUOTE_IN_QUOTED;
                } else {
                    line += c == '\n';
                    push_byte(c);
                }
                break;
            case AFTER_CR:
                if (c != '\n')
                    anvil_fail("line %llu: carriage return not followed by a line feed",
                               (unsigned long long)record_line);
                if (!blank_cr) {
                    end_field();
                    end_record();
                }
                line++;
                in_record = 0;
                state = FIELD_START;
                break;
            }
        }
        skip = 0;
    }
    if (ferror(in)) anvil_fail("reading the input failed: %s", strerror(errno));
    if (state == QUOTED)
        anvil_fail("line %llu: unterminated quoted field", (unsigned long long)record_line);
    if (state == AFTER_CR)
        anvil_fail("line %llu: carriage return not followed by a line feed",
                   (unsigned long long)record_line);
    if (in_record) {
        end_field();
        end_record();
    }
    if (header_fields == 0) anvil_fail("the input is empty: no header row");

    size_t m = 0;
    for (size_t i = 0; i < groups_cap; i++)
        if (groups[i].hash != 0) groups[m++] = groups[i];
    qsort(groups, m, sizeof *groups, by_name);

    put_field((const unsigned char *)group_name, strlen(group_name));
    putchar(',');
    char head[512];
    if (agg == AGG_COUNT) snprintf(head, sizeof head, "count");
    else snprintf(head, sizeof head, "%s_%s", agg_name, column_name);
    put_field((const unsigned char *)head, strlen(head));
    putchar('\n');
    for (size_t i = 0; i < m; i++) {
        Group *g = &groups[i];
        put_field(names + g->off, g->len);
        putchar(',');
        switch (agg) {
        case AGG_COUNT: printf("%llu", (unsigned long long)g->count); break;
        case AGG_SUM: put_number(g->sum); break;
        case AGG_MEAN: put_number(g->sum / (double)g->count); break;
        case AGG_MIN: put_number(g->min); break;
        case AGG_MAX: put_number(g->max); break;
        }
        putchar('\n');
    }
    if (fflush(stdout) != 0) anvil_fail("writing the result failed");
    return 0;
}
