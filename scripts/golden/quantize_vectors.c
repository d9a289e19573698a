/* ggml's own quantizer over a raw float32 matrix: the driver behind fixtures/golden/ggml/.
 *
 *   quantize_vectors TYPE_ID ROWS N_PER_ROW INPUT.f32 IMATRIX.f32|- OUT.bin
 *
 * (stderr ends with the seconds ggml_quantize_chunk took, one thread: `cargo bench --bench
 * quantize -- --ggml DRIVER` times ggml's quantizers with it.)
 *
 * Calls ggml_quantize_init(type) (the i-quants' grids) and then
 * ggml_quantize_chunk(type, input, out, 0, ROWS, N_PER_ROW, imatrix or NULL), exactly the call the
 * golden bytes record, and writes the blocks. Built against ggml-base of the llama.cpp vendored in
 * llama-cpp-python 0.3.36 (ggml 0.25.3) by scripts/golden/ggml-vectors.sh. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "ggml.h"

static float *read_f32(const char *path, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    float *v = malloc(n * sizeof(float));
    if (fread(v, sizeof(float), n, f) != n) { fprintf(stderr, "%s: expected %zu floats\n", path, n); exit(2); }
    fclose(f);
    return v;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s TYPE_ID ROWS N_PER_ROW INPUT.f32 IMATRIX.f32|- OUT.bin\n", argv[0]);
        return 2;
    }
    enum ggml_type type = (enum ggml_type)atoi(argv[1]);
    int64_t rows = atoll(argv[2]), n = atoll(argv[3]);
    float *x = read_f32(argv[4], (size_t)(rows * n));
    float *imatrix = argv[5][0] == '-' ? NULL : read_f32(argv[5], (size_t)n);
    size_t row_bytes = ggml_row_size(type, n);
    void *out = calloc(rows, row_bytes);
    ggml_quantize_init(type);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    size_t written = ggml_quantize_chunk(type, x, out, 0, rows, n, imatrix);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (written != row_bytes * rows) {
        fprintf(stderr, "ggml wrote %zu bytes, expected %zu\n", written, row_bytes * rows);
        return 1;
    }
    FILE *f = fopen(argv[6], "wb");
    if (!f || fwrite(out, 1, written, f) != written || fclose(f) != 0) { perror(argv[6]); return 1; }
    /* the time of ggml_quantize_chunk alone (benches/quantize.rs reads it) */
    fprintf(stderr, "ggml %s: %s %lld x %lld%s in %.6f s\n", ggml_version(), ggml_type_name(type), (long long)rows, (long long)n,
            imatrix ? " with imatrix" : "", (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    return 0;
}
