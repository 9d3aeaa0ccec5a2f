// Included first by every *_avx2.cpp translation unit, inside `#if GK_AVX2_COMPILED`, before its
// kernel header: switches the rest of the unit to AVX2+FMA code generation (see isa.h for why
// these units exist). No include guard on purpose: it must act in every unit that includes it.
#pragma GCC target("avx2,fma")
// The pragma enables the instructions; these macros make the ATen/Sleef headers emit their
// 256-bit code paths, exactly as ATen's own AVX2 kernel builds do.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2 1
#define GK_CPU_ISA avx2
