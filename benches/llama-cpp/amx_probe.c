// Does AMX work here? cpuid can advertise AMX (amx_tile in /proc/cpuinfo) in a VM that does not
// let it run: llama.cpp built with -march=native then dies on the first Q4_0/Q8_0 matmul
// (ldtilecfg: SIGILL/SIGSEGV). Kept as a record: on the machine where that crash was seen this
// probe prints "AMX ok" (also when the tile ops run on a second thread), so it cannot tell;
// build.sh does not run it and turns AMX off unless LLAMA_AMX=1.
//   gcc -O1 -mamx-tile amx_probe.c -o amx_probe && ./amx_probe
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <immintrin.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tilecfg { unsigned char palette, start; unsigned char rsv[14]; unsigned short colsb[16]; unsigned char rows[16]; };

int main(void) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) {
        puts("arch_prctl(ARCH_REQ_XCOMP_PERM) refused");
        return 1;
    }
    struct tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.colsb[0] = 64;
    cfg.rows[0] = 16;
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_release();
    puts("AMX ok");
    return 0;
}
