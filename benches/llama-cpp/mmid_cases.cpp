// moe-mmid-cases: writes a test-backend-ops --test-file with MUL_MAT_ID cases at given expert
// shapes (the built-in perf cases are other models' shapes). Built by build.sh.
//
//   moe-mmid-cases NAME K M EXPERTS USED TOKENS TYPE...   (TYPE: f32 bf16 f16 q8_0 q4_0)
// One line per type:  op type ne[4] n_params n_src {type ne[4] nb[4]}x3 name
// Sources as test_mul_mat_id builds them: as [K, M, E] (weights), b [K, USED, TOKENS] f32,
// ids [USED, TOKENS] i32; out [M, USED, TOKENS] f32.
#include "ggml.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>

static void src(ggml_type t, long long ne0, long long ne1, long long ne2, long long ne3) {
    size_t nb0 = ggml_type_size(t);
    size_t nb1 = ggml_row_size(t, ne0);
    size_t nb2 = nb1 * ne1, nb3 = nb2 * ne2;
    printf(" %d %lld %lld %lld %lld %zu %zu %zu %zu", (int) t, ne0, ne1, ne2, ne3, nb0, nb1, nb2, nb3);
}

int main(int argc, char ** argv) {
    if (argc < 8) {
        fprintf(stderr, "usage: %s NAME K M EXPERTS USED TOKENS TYPE...\n", argv[0]);
        return 2;
    }
    const char * name = argv[1];
    long long K = atoll(argv[2]), M = atoll(argv[3]), E = atoll(argv[4]), U = atoll(argv[5]), N = atoll(argv[6]);
    for (int i = 7; i < argc; i++) {
        ggml_type t;
        if (!strcmp(argv[i], "f32")) t = GGML_TYPE_F32;
        else if (!strcmp(argv[i], "f16")) t = GGML_TYPE_F16;
        else if (!strcmp(argv[i], "bf16")) t = GGML_TYPE_BF16;
        else if (!strcmp(argv[i], "q8_0")) t = GGML_TYPE_Q8_0;
        else if (!strcmp(argv[i], "q4_0")) t = GGML_TYPE_Q4_0;
        else { fprintf(stderr, "unknown type %s\n", argv[i]); return 2; }
        printf("%d %d %lld %lld %lld %lld 0 3", (int) GGML_OP_MUL_MAT_ID, (int) GGML_TYPE_F32, M, U, N, 1LL);
        src(t, K, M, E, 1);
        src(GGML_TYPE_F32, K, U, N, 1);
        src(GGML_TYPE_I32, U, N, 1, 1);
        printf(" %s-%s-K%lld-M%lld-E%lld-top%lld-n%lld\n", name, argv[i], K, M, E, U, N);
    }
    return 0;
}
