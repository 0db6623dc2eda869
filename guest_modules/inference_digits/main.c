/*
 * inference:digits — classify 8x8 digit images with a small dense network.
 *
 * Inputs:
 *   input 0 (stdin, /input/0)  the images: text, one image per non-blank line,
 *                              n_features comma-separated numbers (for the
 *                              bundled digits model: 64 intensities 0..16,
 *                              row-major, as sklearn's load_digits().data).
 *   input 1 (/input/1)         the model, in the "dense classifier" format
 *                              written by guest_modules/train_digits.py.
 * Params: none.
 * Result (stdout): {"count": N, "predictions": [label, ...]} in input order.
 *
 * Model format (little-endian; see train_digits.py for the full description):
 *   "ANVDENS1", u32 n_layers, u32 n_classes, f64 input_scale,
 *   i32 labels[n_classes], then per layer: u32 n_in, u32 n_out,
 *   u32 activation (0 identity, 1 ReLU), f64 W[n_out][n_in], f64 b[n_out].
 * Prediction = label of the largest last-layer output, the first on ties.
 */
#include <math.h>

#include "anvil_guest.h"

#define MAX_LAYERS 8
#define MAX_WIDTH 4096

typedef struct {
    uint32_t n_in, n_out, activation;
    const double *w, *b;
} Layer;

typedef struct {
    uint32_t n_layers, n_classes;
    double input_scale;
    int32_t *labels;
    Layer layers[MAX_LAYERS];
} Model;

typedef struct {
    const unsigned char *p;
    size_t left;
} Reader;

static const unsigned char *take(Reader *r, size_t n, const char *what) {
    if (r->left < n) anvil_fail("bad model: truncated in %s", what);
    const unsigned char *p = r->p;
    r->p += n;
    r->left -= n;
    return p;
}

static uint32_t u32le(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* wasm32 is little-endian, as the file: doubles are copied out as they are. */
static double *f64_array(Reader *r, size_t n, const char *what) {
    double *a = anvil_xmalloc(n * sizeof(double));
    memcpy(a, take(r, n * sizeof(double), what), n * sizeof(double));
    for (size_t i = 0; i < n; i++)
        if (!isfinite(a[i])) anvil_fail("bad model: non-finite value in %s", what);
    return a;
}

static Model load_model(const unsigned char *data, size_t len) {
    Reader r = {data, len};
    Model m = {0};
    if (len < 8 || memcmp(take(&r, 8, "the magic"), "ANVDENS1", 8) != 0)
        anvil_fail("bad model: input 1 is not a dense classifier model (magic ANVDENS1)");
    m.n_layers = u32le(take(&r, 4, "the header"));
    m.n_classes = u32le(take(&r, 4, "the header"));
    memcpy(&m.input_scale, take(&r, 8, "the header"), 8);
    if (m.n_layers < 1 || m.n_layers > MAX_LAYERS)
        anvil_fail("bad model: %u layers (1..%d allowed)", m.n_layers, MAX_LAYERS);
    if (m.n_classes < 1 || m.n_classes > MAX_WIDTH)
        anvil_fail("bad model: %u classes (1..%d allowed)", m.n_classes, MAX_WIDTH);
    if (!isfinite(m.input_scale)) anvil_fail("bad model: input_scale is not finite");
    m.labels = anvil_xmalloc(m.n_classes * sizeof(int32_t));
    memcpy(m.labels, take(&r, 4 * (size_t)m.n_classes, "the labels"), 4 * (size_t)m.n_classes);
    for (uint32_t l = 0; l < m.n_layers; l++) {
        Layer *L = &m.layers[l];
        L->n_in = u32le(take(&r, 4, "a layer header"));
        L->n_out = u32le(take(&r, 4, "a layer header"));
        L->activation = u32le(take(&r, 4, "a layer header"));
        if (L->n_in < 1 || L->n_in > MAX_WIDTH || L->n_out < 1 || L->n_out > MAX_WIDTH)
            anvil_fail("bad model: layer %u is %ux%u (1..%d per side)", l + 1, L->n_in, L->n_out,
                       MAX_WIDTH);
        if (l > 0 && L->n_in != m.layers[l - 1].n_out)
            anvil_fail("bad model: layer %u takes %u values but layer %u gives %u", l + 1, L->n_in,
                       l, m.layers[l - 1].n_out);
        if (L->activation > 1) anvil_fail("bad model: layer %u has unknown activation %u", l + 1, L->activation);
        L->w = f64_array(&r, (size_t)L->n_in * L->n_out, "the weights");
        L->b = f64_array(&r, L->n_out, "the biases");
    }
    if (m.layers[m.n_layers - 1].n_out != m.n_classes)
        anvil_fail("bad model: the last layer gives %u values for %u classes",
                   m.layers[m.n_layers - 1].n_out, m.n_classes);
    if (r.left != 0) anvil_fail("bad model: %zu trailing bytes", r.left);
    return m;
}

static int32_t predict(const Model *m, const double *features, double *a, double *b) {
    for (uint32_t i = 0; i < m->layers[0].n_in; i++) a[i] = features[i] * m->input_scale;
    for (uint32_t l = 0; l < m->n_layers; l++) {
        const Layer *L = &m->layers[l];
        for (uint32_t o = 0; o < L->n_out; o++) {
            const double *w = L->w + (size_t)o * L->n_in;
            double s = 0;
            for (uint32_t i = 0; i < L->n_in; i++) s += w[i] * a[i];
            s += L->b[o];
            b[o] = L->activation == 1 && s < 0 ? 0 : s;
        }
        double *t = a;
        a = b;
        b = t;
    }
    uint32_t best = 0;
    for (uint32_t k = 1; k < m->n_classes; k++)
        if (a[k] > a[best]) best = k;
    return m->labels[best];
}

int main(int argc, char **argv) {
    anvil_init("inference:digits", argc, argv);
    static const char *const params[] = {NULL};
    anvil_check_params(params);

    FILE *model_file = anvil_input_try(1);
    if (model_file == NULL) anvil_fail("input 1 (the model) is missing");
    size_t model_len;
    unsigned char *model_bytes = anvil_read_all(model_file, &model_len);
    Model m = load_model(model_bytes, model_len);
    uint32_t n_features = m.layers[0].n_in;

    double *features = anvil_xmalloc(n_features * sizeof(double));
    double *a = anvil_xmalloc(MAX_WIDTH * sizeof(double)), *b = anvil_xmalloc(MAX_WIDTH * sizeof(double));
    size_t cap = 1024, count = 0;
    int32_t *out = anvil_xmalloc(cap * sizeof(int32_t));

    size_t len;
    char *text = (char *)anvil_read_all(anvil_input(0), &len);
    unsigned long line = 0;
    char *p = text;
    while (p < text + len) {
        char *eol = memchr(p, '\n', (size_t)(text + len - p));
        if (eol == NULL) eol = text + len; /* the last line, without a newline */
        line++;
        *eol = '\0';
        if (eol > p && eol[-1] == '\r') eol[-1] = '\0';
        char *q = p;
        while (*q == ' ' || *q == '\t') q++;
        if (*q != '\0') {
            for (uint32_t i = 0; i < n_features; i++) {
                char *end;
                errno = 0;
                double v = strtod(q, &end);
                if (end == q || !isfinite(v))
                    anvil_fail("line %lu: value %u is not a number", line, i + 1);
                while (*end == ' ' || *end == '\t') end++;
                if (i + 1 < n_features) {
                    if (*end != ',')
                        anvil_fail("line %lu: expected %u comma-separated values, got %u", line,
                                   n_features, i + 1);
                    end++;
                } else if (*end != '\0') {
                    anvil_fail("line %lu: more than %u values", line, n_features);
                }
                features[i] = v;
                q = end;
            }
            if (count == cap) {
                cap *= 2;
                out = anvil_xrealloc(out, cap * sizeof(int32_t));
            }
            out[count++] = predict(&m, features, a, b);
        }
        p = eol + 1;
    }
    if (count == 0) anvil_fail("input 0 holds no images");

    printf("{\"count\": %zu, \"predictions\": [", count);
    for (size_t i = 0; i < count; i++) printf(i ? ", %d" : "%d", (int)out[i]);
    puts("]}");
    if (fflush(stdout) != 0) anvil_fail("writing the result failed");
    return 0;
}
