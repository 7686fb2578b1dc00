/* AVX2 + FMA + F16C kernels (Haswell / Zen and later). Compiled with -mavx2 -mfma -mf16c only;
 * dispatch.c calls into it only after CPUID confirms those features. */
#if defined(__x86_64__) || defined(__i386__)
#define GR_USE_VNNI 0
#define GR_X86_INIT_NAME gr_kernels_init_avx2
#include "kernels_x86.inc"
#endif
