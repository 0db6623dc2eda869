/*
 * image:resize — bilinear resize of a binary PGM (P5, grey) or PPM (P6, RGB).
 *
 * Params: width, height (1..16384). Give one or both; when one is missing it
 * follows the input's aspect ratio, rounded to the nearest pixel (at least 1).
 *
 * Input (the first input): a binary Netpbm image. Header = magic, width,
 * height, maxval (1..65535) separated by whitespace, '#' comments to the end
 * of a line allowed between them, then exactly one whitespace byte before the
 * raster. Samples are 1 byte when maxval < 256, else 2 bytes big-endian.
 * Bytes after the raster are ignored.
 *
 * Output: /output/resized.pgm or /output/resized.ppm, same type and maxval.
 * Result (stdout): {"width": W, "height": H, "format": "P5", "maxval": M,
 *                   "output": "resized.pgm"}
 *
 * Sampling, per axis (pixel centres aligned, as OpenCV's INTER_LINEAR):
 *   src = (dst + 0.5) * in_size / out_size - 0.5, clamped to [0, in_size - 1]
 *   i0 = floor(src), i1 = min(i0 + 1, in_size - 1), f = src - i0
 *   top = p[y0][x0] + (p[y0][x1] - p[y0][x0]) * fx   (and bottom from y1)
 *   out = floor(top + (bottom - top) * fy + 0.5)
 * in IEEE double, in exactly that order, so a Python reimplementation gives
 * the same bytes.
 */
#include <math.h>

#include "anvil_guest.h"

#define MAX_SIDE 16384
#define MAX_OUTPUT_SAMPLES (64u << 20)

typedef struct {
    const unsigned char *p, *end;
} Cursor;

static void skip_space_and_comments(Cursor *c) {
    while (c->p < c->end) {
        if (*c->p == '#') {
            while (c->p < c->end && *c->p != '\n') c->p++;
        } else if (isspace(*c->p)) {
            c->p++;
        } else {
            break;
        }
    }
}

static unsigned header_number(Cursor *c, const char *what, unsigned max) {
    skip_space_and_comments(c);
    if (c->p == c->end || !isdigit(*c->p))
        anvil_fail("bad PNM header: expected the %s, a decimal number", what);
    unsigned long v = 0;
    while (c->p < c->end && isdigit(*c->p)) {
        v = v * 10 + (unsigned long)(*c->p++ - '0');
        if (v > max) anvil_fail("bad PNM header: %s larger than %u", what, max);
    }
    if (v == 0) anvil_fail("bad PNM header: %s is 0", what);
    return (unsigned)v;
}

/* Sample i of the raster: 1 byte, or 2 bytes big-endian. */
static inline unsigned sample(const unsigned char *raster, int bps, uint64_t i) {
    return bps == 1 ? raster[i] : (unsigned)(raster[2 * i] << 8 | raster[2 * i + 1]);
}

typedef struct {
    int *i0, *i1;
    double *f;
} Axis;

static Axis axis(unsigned in, unsigned out) {
    Axis a = {anvil_xmalloc(out * sizeof(int)), anvil_xmalloc(out * sizeof(int)),
              anvil_xmalloc(out * sizeof(double))};
    double scale = (double)in / (double)out;
    for (unsigned d = 0; d < out; d++) {
        double s = ((double)d + 0.5) * scale - 0.5;
        if (s < 0) s = 0;
        if (s > (double)(in - 1)) s = (double)(in - 1);
        int i0 = (int)floor(s);
        a.i0[d] = i0;
        a.i1[d] = i0 + 1 < (int)in ? i0 + 1 : (int)in - 1;
        a.f[d] = s - (double)i0;
    }
    return a;
}

int main(int argc, char **argv) {
    anvil_init("image:resize", argc, argv);
    static const char *const params[] = {"width", "height", NULL};
    anvil_check_params(params);
    long long want_w = anvil_param_int("width", 0, 1, MAX_SIDE);
    long long want_h = anvil_param_int("height", 0, 1, MAX_SIDE);
    if (want_w == 0 && want_h == 0) anvil_fail("give param width, height or both");

    size_t len;
    unsigned char *data = anvil_read_all(anvil_input(0), &len);
    Cursor c = {data, data + len};
    if (len < 2 || data[0] != 'P' || (data[1] != '5' && data[1] != '6'))
        anvil_fail("bad PNM header: not a binary PGM or PPM (magic P5 or P6)");
    int channels = data[1] == '5' ? 1 : 3;
    c.p += 2;
    if (c.p < c.end && !isspace(*c.p) && *c.p != '#')
        anvil_fail("bad PNM header: no whitespace after the magic");
    unsigned in_w = header_number(&c, "width", 1u << 20);
    unsigned in_h = header_number(&c, "height", 1u << 20);
    unsigned maxval = header_number(&c, "maxval", 65535);
    if (c.p == c.end || !isspace(*c.p))
        anvil_fail("bad PNM header: no whitespace byte before the raster");
    c.p++;
    int bps = maxval < 256 ? 1 : 2;
    uint64_t in_samples = (uint64_t)in_w * in_h * (uint64_t)channels;
    uint64_t need = in_samples * (uint64_t)bps;
    if ((uint64_t)(c.end - c.p) < need)
        anvil_fail("truncated raster: a %ux%u %s needs %llu bytes, got %zu", in_w, in_h,
                   channels == 1 ? "PGM" : "PPM", (unsigned long long)need, (size_t)(c.end - c.p));

    unsigned out_w = (unsigned)want_w, out_h = (unsigned)want_h;
    if (out_w == 0) out_w = (unsigned)(((uint64_t)in_w * out_h + in_h / 2) / in_h);
    if (out_h == 0) out_h = (unsigned)(((uint64_t)in_h * out_w + in_w / 2) / in_w);
    if (out_w == 0) out_w = 1;
    if (out_h == 0) out_h = 1;
    if (out_w > MAX_SIDE || out_h > MAX_SIDE)
        anvil_fail("output would be %ux%u; at most %d per side", out_w, out_h, MAX_SIDE);
    uint64_t out_samples = (uint64_t)out_w * out_h * (uint64_t)channels;
    if (out_samples > MAX_OUTPUT_SAMPLES)
        anvil_fail("output would have %llu samples; at most %u", (unsigned long long)out_samples,
                   MAX_OUTPUT_SAMPLES);

    const unsigned char *raster = c.p;
    for (uint64_t i = 0; i < in_samples; i++)
        if (sample(raster, bps, i) > maxval) anvil_fail("bad raster: a sample exceeds maxval %u", maxval);

    Axis ax = axis(in_w, out_w), ay = axis(in_h, out_h);
    unsigned char *out = anvil_xmalloc((size_t)(out_samples * (uint64_t)bps));
    size_t k = 0;
    for (unsigned y = 0; y < out_h; y++) {
        size_t r0 = (size_t)ay.i0[y] * in_w * channels;
        size_t r1 = (size_t)ay.i1[y] * in_w * channels;
        double fy = ay.f[y];
        for (unsigned x = 0; x < out_w; x++) {
            size_t a = (size_t)ax.i0[x] * channels, b = (size_t)ax.i1[x] * channels;
            double fx = ax.f[x];
            for (int ch = 0; ch < channels; ch++) {
                double p00 = sample(raster, bps, r0 + a + ch), p01 = sample(raster, bps, r0 + b + ch);
                double p10 = sample(raster, bps, r1 + a + ch), p11 = sample(raster, bps, r1 + b + ch);
                double top = p00 + (p01 - p00) * fx;
                double bottom = p10 + (p11 - p10) * fx;
                double v = floor(top + (bottom - top) * fy + 0.5);
                unsigned s = v < 0 ? 0 : v > maxval ? maxval : (unsigned)v;
                if (bps == 1) {
                    out[k++] = (unsigned char)s;
                } else {
                    out[k++] = (unsigned char)(s >> 8);
                    out[k++] = (unsigned char)(s & 0xff);
                }
            }
        }
    }

    const char *name = channels == 1 ? "resized.pgm" : "resized.ppm";
    FILE *f = anvil_output(name);
    fprintf(f, "P%c\n%u %u\n%u\n", channels == 1 ? '5' : '6', out_w, out_h, maxval);
    fwrite(out, 1, k, f);
    anvil_output_close(f);
    printf("{\"width\": %u, \"height\": %u, \"format\": \"P%c\", \"maxval\": %u, \"output\": \"%s\"}\n",
           out_w, out_h, channels == 1 ? '5' : '6', maxval, name);
    if (fflush(stdout) != 0) anvil_fail("writing the result failed");
    return 0;
}
