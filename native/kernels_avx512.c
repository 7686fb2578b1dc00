/* AVX-512 (F/BW/VL/DQ) + VNNI kernels: the AVX2 kernel source with vpdpbusd as the int8 dot, which
 * adds u8*s8 quads straight into int32 lanes (no int16 saturation, one instruction instead of three).
 * Dispatched only where CPUID reports all of avx512f/bw/vl/dq/vnni. */
#if defined(__x86_64__) || defined(__i386__)
#define GR_USE_VNNI 1
#define GR_X86_INIT_NAME gr_kernels_init_avx512
#include "kernels_x86.inc"
#endif
